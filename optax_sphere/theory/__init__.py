"""Closed-form predictions and equivalences of the papers: what a run should look like.

* :func:`equilibrium`: the rotational equilibrium of seed 002 (Table 1, app. F-I).
* :func:`sgd_to_adagradg`, :func:`l2_equivalent_schedule`: the optimizers and schedules that
  follow SGD with L2 on radially invariant weights (seed 000 Theorem 4, seed 003 eq. 3.44).
"""

from optax_sphere.theory.equilibrium import Equilibrium, equilibrium
from optax_sphere.theory.equivalences import l2_equivalent_schedule, sgd_to_adagradg

__all__ = ["Equilibrium", "equilibrium", "l2_equivalent_schedule", "sgd_to_adagradg"]
