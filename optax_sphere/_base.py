"""The base optimizers' steps on single leaves, by optax's own transformations, and their
directions computed a second time from the state after the step (for per-group sums).

The leaves outside every group get the optimizer an alias extends (Adam, SGD with momentum,
AdaGrad) unchanged; its mathematics lives in optax. These helpers run optax's transformation
on one leaf with the alias's own state arrays, so that each family's module keeps only its
per-group mathematics. ``count`` is the state's count *before* the step, as optax's states
hold it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def adam(
    g: jax.Array, mu: jax.Array, nu: jax.Array, count: jax.Array, b1: Any, b2: Any, eps: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``optax.scale_by_adam(b1, b2, eps)`` on one leaf: ``(direction, mu, nu)``."""
    direction, state = optax.scale_by_adam(b1, b2, eps).update(
        g, optax.ScaleByAdamState(count, mu, nu)
    )
    return direction, state.mu, state.nu


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


def momentum(
    g: jax.Array, trace: jax.Array, decay: Any, nesterov: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``optax.trace(decay, nesterov)`` on one leaf: ``(direction, trace)``; the direction is
    the new trace (``g + decay trace'`` with Nesterov), as in ``optax.sgd``."""
    direction, state = optax.trace(decay, nesterov).update(g, optax.TraceState(trace))
    return direction, state.trace


# --------------------------------------------------------------------------------------------
# A direction computed a second time, for per-group sums alone.
#
# A wrapper that needs per-group sums of its inner direction ``p`` (``<p, x>``, ``||p||^2``)
# and the update from ``p`` would have XLA write ``p`` out to memory, since a value with
# several consumers is not fused into them. Computing ``p`` a second time from the inner
# state after the step (through a barrier, so that XLA keeps the two apart) lets each copy
# be fused into its consumers: ``p`` is never written, and no full-size temporary is
# allocated per step.

#: ``(gradients, new_inner_state, anchors) -> direction`` on the leaves whose anchor is not
#: None (the others are not read). Every scalar in it goes through :func:`anchored`.
DirectionAgain = Callable[[optax.Updates, Any, Any], optax.Updates]


def anchored(value: Any, anchor: jax.Array, dtype: Any) -> jax.Array:
    """``value`` (a scalar) as an array of a leaf's per-group shape computed from ``anchor``
    (per-group values of that leaf; where one is NaN, the leaf's sums are NaN anyway).

    A scalar inside per-group sums must not be a constant or a value shared by several
    leaves: XLA broadcasts it once per shape for all its users, and a broadcast with several
    users is written out in full before XLA:CPU's reduction kernels read it.
    """
    return jnp.where(jnp.isnan(anchor), jnp.zeros([], dtype), jnp.asarray(value, dtype))


def trace_direction_again(momentum: Any, nesterov: bool) -> DirectionAgain:
    """``optax.trace``'s direction from its new trace: the trace, or ``g + momentum trace``."""

    def direction(updates: optax.Updates, state: optax.TraceState, anchors: Any) -> Any:
        if not nesterov:
            return state.trace

        def leaf(anchor, g, t):
            if anchor is None:
                return t
            return g.astype(t.dtype) + anchored(momentum, anchor, t.dtype) * t

        return jax.tree.map(leaf, anchors, updates, state.trace, is_leaf=_is_none)

    return direction


def _is_none(x: Any) -> bool:
    return x is None
