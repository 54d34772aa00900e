"""Pieces of the base optimizers that the groups' fused steps share, by optax's own helpers.

The leaves outside every group get the optimizer an alias extends (Adam, SGD with momentum,
AdaGrad) itself, split off by :func:`~optax_sphere.on_groups`. The groups' fused steps share
the base's pieces: Adam's moments and bias corrections by optax's helpers, and optax's
momentum on one leaf with the group's own buffer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def adam_moments(
    g_first: jax.Array, g_second: jax.Array, mu: jax.Array, nu: jax.Array, b1: Any, b2: Any
) -> tuple[jax.Array, jax.Array]:
    """Adam's moving moments with optax's helpers, the first of ``g_first`` and the second
    of ``g_second``: ``(mu, nu)``, not bias-corrected."""
    return (
        optax.tree.update_moment(g_first, mu, b1, 1),
        optax.tree.update_moment_per_elem_norm(g_second, nu, b2, 2),
    )


def bias_corrected(moment: jax.Array, decay: Any, count: jax.Array) -> jax.Array:
    """``moment / (1 - decay^count)`` (``optax.tree.bias_correction``), ``count`` after the
    step's increment."""
    return optax.tree.bias_correction(moment, decay, count)


def bias_correction_factor(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``1 - decay^count`` in ``dtype`` (float64 stays float64), for a fused formula that
    divides by it itself; ``count`` after the step's increment."""
    return 1 - jnp.asarray(decay, dtype) ** count.astype(dtype)


def bias_corrections(b1: Any, b2: Any, count: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Adam's ``1 - b1^k`` and ``1 - b2^k`` in ``dtype``."""
    return bias_correction_factor(b1, count, dtype), bias_correction_factor(b2, count, dtype)


def adam_direction(
    mu: jax.Array, nu: jax.Array, count: jax.Array, b1: Any, b2: Any, eps: Any
) -> jax.Array:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` from its moments, bias-corrected with
    optax's helper (``count`` after the step's increment); ``nu`` may be a per-group scalar
    (Adam-S) and ``mu`` a look-ahead (Nesterov)."""
    return bias_corrected(mu, b1, count) / (jnp.sqrt(bias_corrected(nu, b2, count)) + eps)


def momentum(
    g: jax.Array, trace: jax.Array, decay: Any, nesterov: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``optax.trace(decay, nesterov)`` on one leaf: ``(direction, trace)``; the direction is
    the new trace (``g + decay trace'`` with Nesterov), as in ``optax.sgd``."""
    direction, state = optax.trace(decay, nesterov).update(g, optax.TraceState(trace))
    return direction, state.trace
