"""Closed-form predictions and equivalences of the papers: what a run should look like.

* :func:`equilibrium`: the rotational equilibrium of Kosson et al. (Table 1, app. F-I).
* :func:`sgd_to_adagradg`, :func:`l2_equivalent_schedule`: the optimizers and schedules that
  follow SGD with L2 on radially invariant weights (Roburin et al. Theorem 4,
  Roburin's thesis eq. 3.44).
"""

from optax_sphere.theory.equilibrium import Equilibrium, equilibrium
from optax_sphere.theory.equivalences import l2_equivalent_schedule, sgd_to_adagradg

__all__ = ["Equilibrium", "equilibrium", "l2_equivalent_schedule", "sgd_to_adagradg"]
