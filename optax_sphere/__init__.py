"""optax_sphere: optimizers for the geometry of normalised networks, as optax transformations.

Batch/Layer normalisation makes groups of weights scale-invariant, so only their direction on
a sphere matters. Each fix of the papers is one composable ``optax.GradientTransformation``
over pytrees; the published optimizers are chains of them.
"""

from optax_sphere import geometry, groups, presets
from optax_sphere.groups import Group, per_tensor, per_unit, resolve_groups
from optax_sphere.spherical_adam import SgdmRtState, adam_s, adam_srt, adam_st, sgdm_rt
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
    "adam_s",
    "adam_srt",
    "adam_st",
    "sgdm_rt",
    # the papers' best hyperparameters
    "presets",
]
