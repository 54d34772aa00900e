"""optax_sphere: optimizers for the geometry of normalised networks, as optax transformations.

Batch/Layer normalisation makes groups of weights scale-invariant, so only their direction on
a sphere matters. Each fix of the papers is one composable ``optax.GradientTransformation``
over pytrees; the published optimizers are chains of them.
"""

from optax_sphere import diagnostics, discovery, geometry, groups, plots, presets, theory
from optax_sphere._paths import path_str
from optax_sphere.diagnostics import (
    GeometryStats,
    History,
    MonitoredState,
    MonitorState,
    adam_step_scale,
    find_monitor_state,
    geometry_stats,
    metrics,
    monitor,
    monitored,
)
from optax_sphere.discovery import (
    FoundGroups,
    GroupReport,
    check_groups,
    find_groups,
    matrix_groups,
    rotational_groups,
)
from optax_sphere.grouped import GroupResolution, grouped_state, on_groups
from optax_sphere.groups import (
    Group,
    GroupRule,
    per_tensor,
    per_unit,
    per_unit_out_first,
    resolve_groups,
)
from optax_sphere.hyperball import HyperballState, adamh, hyperball, muonh
from optax_sphere.norm_growth import (
    ScaleInvariantProjectionState,
    adamp,
    scale_invariant_projection,
    sgdp,
)
from optax_sphere.psi import PsiSgdState, psi_sgd, psi_sgdm, scale_by_psi_metric
from optax_sphere.retraction import project_tangent, retract_to_sphere
from optax_sphere.riemannian import AdamgState, SgdgState, adamg, sgdg
from optax_sphere.rotational import (
    RotationalRmsControlState,
    ScaleByAdamL2DirectionState,
    center_groups,
    rotational_rms_control,
    rv_adamw,
    rv_lion,
    rv_sgdm,
    scale_by_adam_l2_direction,
    wrapped_adam_l2,
)
from optax_sphere.spherical_adagrad import AdagradgState, adagradg
from optax_sphere.standardization import (
    ScaleByStandardizedAdamState,
    adam_s,
    scale_by_standardized_adam,
)
from optax_sphere.transport import (
    SgdmRtState,
    SphericalAdamState,
    adam_srt,
    adam_st,
    rescale_momentum,
    rescale_transport_momentum,
    sgdm_rt,
    transport_momentum,
)
from optax_sphere.weight_decay import coupled_weight_decay, decoupled_weight_decay

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``gains`` needs Flax's module systems: imported on first use, so that importing
    # optax_sphere imports neither flax.linen nor flax.nnx
    if name == "gains":
        import importlib

        return importlib.import_module("optax_sphere.gains")
    raise AttributeError(f"module 'optax_sphere' has no attribute {name!r}")


__all__ = [
    "GroupRule",
    "GroupResolution",
    "grouped_state",
    "on_groups",
    # submodules
    "diagnostics",
    "discovery",
    "gains",
    "geometry",
    "groups",
    "plots",
    "presets",
    "theory",
    # groups
    "FoundGroups",
    "Group",
    "GroupReport",
    "find_groups",
    "check_groups",
    "rotational_groups",
    "matrix_groups",
    "per_tensor",
    "per_unit",
    "per_unit_out_first",
    "resolve_groups",
    "path_str",
    # primitives: spherical Adam family (Roburin et al.)
    "ScaleByStandardizedAdamState",
    "coupled_weight_decay",
    "decoupled_weight_decay",
    "rescale_momentum",
    "rescale_transport_momentum",
    "scale_by_standardized_adam",
    "transport_momentum",
    # primitives: manifolds (PSI metric, sphere retraction, AdamP projection)
    "ScaleInvariantProjectionState",
    "project_tangent",
    "retract_to_sphere",
    "scale_by_psi_metric",
    "scale_invariant_projection",
    # primitives: rotational equilibrium (Kosson et al.)
    "RotationalRmsControlState",
    "ScaleByAdamL2DirectionState",
    "center_groups",
    "rotational_rms_control",
    "scale_by_adam_l2_direction",
    # primitives: hyperball (Wen et al.)
    "HyperballState",
    "hyperball",
    # aliases
    "AdagradgState",
    "AdamgState",
    "PsiSgdState",
    "SgdgState",
    "SgdmRtState",
    "SphericalAdamState",
    "adagradg",
    "adam_s",
    "adam_srt",
    "adam_st",
    "adamg",
    "adamh",
    "adamp",
    "muonh",
    "psi_sgd",
    "psi_sgdm",
    "rv_adamw",
    "rv_lion",
    "rv_sgdm",
    "sgdg",
    "sgdm_rt",
    "sgdp",
    "wrapped_adam_l2",
    # diagnostics
    "GeometryStats",
    "History",
    "MonitorState",
    "MonitoredState",
    "adam_step_scale",
    "find_monitor_state",
    "geometry_stats",
    "metrics",
    "monitor",
    "monitored",
]
