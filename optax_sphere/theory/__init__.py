"""Closed-form predictions and equivalences of the papers."""

from optax_sphere.theory.equivalences import l2_equivalent_schedule, sgd_to_adagradg

__all__ = ["l2_equivalent_schedule", "sgd_to_adagradg"]
