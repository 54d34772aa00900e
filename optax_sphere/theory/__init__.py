"""Closed-form predictions of the papers: what a run should look like, to compare against.

:func:`equilibrium`: the rotational equilibrium of seed 002 (Table 1, app. F-I).
"""

from optax_sphere.theory.equilibrium import Equilibrium, equilibrium

__all__ = ["Equilibrium", "equilibrium"]
