"""optax_sphere: optimizers for the geometry of normalised networks, as optax transformations.

Batch/Layer normalisation makes groups of weights scale-invariant, so only their direction on
a sphere matters. Each fix of the papers is one composable ``optax.GradientTransformation``
over pytrees; the published optimizers are chains of them.
"""

from optax_sphere import gains, geometry, groups, presets, theory
from optax_sphere.groups import Group, per_tensor, per_unit, resolve_groups
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
from optax_sphere.spherical_adam import (
    SgdmRtState,
    SphericalAdamState,
    adam_s,
    adam_srt,
    adam_st,
    sgdm_rt,
)
from optax_sphere.standardization import (
    ScaleByStandardizedAdamState,
    scale_by_standardized_adam,
)
from optax_sphere.transport import (
    rescale_momentum,
    rescale_transport_momentum,
    transport_momentum,
)
from optax_sphere.weight_decay import coupled_weight_decay, decoupled_weight_decay

# isort: split
# diagnostics
from optax_sphere import diagnostics, plots
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

__version__ = "0.1.0"

__all__ = [
    # groups and geometry
    "Group",
    "geometry",
    "groups",
    "per_tensor",
    "per_unit",
    "resolve_groups",
    # primitives
    "ScaleByStandardizedAdamState",
    "coupled_weight_decay",
    "decoupled_weight_decay",
    "rescale_momentum",
    "rescale_transport_momentum",
    "scale_by_standardized_adam",
    "transport_momentum",
    # aliases
    "SgdmRtState",
    "SphericalAdamState",
    "adam_s",
    "adam_srt",
    "adam_st",
    "sgdm_rt",
    # the papers' best hyperparameters
    "presets",
    # rotational equilibrium (seed 002)
    "RotationalRmsControlState",
    "ScaleByAdamL2DirectionState",
    "center_groups",
    "gains",
    "rotational_rms_control",
    "rv_adamw",
    "rv_lion",
    "rv_sgdm",
    "scale_by_adam_l2_direction",
    "theory",
    "wrapped_adam_l2",
    # diagnostics
    "GeometryStats",
    "History",
    "MonitorState",
    "MonitoredState",
    "adam_step_scale",
    "diagnostics",
    "find_monitor_state",
    "geometry_stats",
    "metrics",
    "monitor",
    "monitored",
    "plots",
]

# manifold optimizers: PSI metric, sphere retraction, AdamP/SGDP projection
from optax_sphere.projection import (  # noqa: E402
    ScaleInvariantProjectionState,
    adamp,
    scale_invariant_projection,
    sgdp,
)
from optax_sphere.psi import PsiSgdState, psi_sgd, psi_sgdm, scale_by_psi_metric  # noqa: E402
from optax_sphere.retraction import (  # noqa: E402
    AdagradgState,
    AdamgState,
    SgdgState,
    adagradg,
    adamg,
    project_tangent,
    retract_to_sphere,
    sgdg,
)

__all__ += [
    "AdagradgState",
    "AdamgState",
    "PsiSgdState",
    "ScaleInvariantProjectionState",
    "SgdgState",
    "adagradg",
    "adamg",
    "adamp",
    "project_tangent",
    "psi_sgd",
    "psi_sgdm",
    "retract_to_sphere",
    "scale_by_psi_metric",
    "scale_invariant_projection",
    "sgdg",
    "sgdp",
    "theory",
]
