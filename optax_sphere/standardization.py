"""Standardisation (S): Adam with a per-group scalar second moment.

Roburin et al. sec. 4.1 (eq. 15) and app. D.1 (eqs. 60-63); Roburin's thesis eq. 3.66. Adam's
element-wise division vector ``b_k`` deforms the gradient of a radially invariant group and
pushes it out of the tangent space (phenomenon (a)). Standardisation replaces the vector
second moment by one scalar per group, the second moment of the gradient norm,

    v_k = b2 v_{k-1} + (1 - b2) d^-1 ||g_k||^2,

which keeps Adam's scheduling effect (``sqrt(v_k) = d^-1/2 ||sqrt(v_vector)||``, eq. 60)
without the deformation. Ungrouped leaves follow ``optax.scale_by_adam`` itself (split off
with :func:`~optax_sphere.on_groups`; a group of one element is exactly Adam), so with
``groups=None`` this is ``optax.scale_by_adam``.

:func:`adam_s` is Adam-S, the published optimizer that is this fix alone ("Adam w/o (a)").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from optax_sphere import _base, _utils
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.grouped import on_groups, resolution_of
from optax_sphere.groups import UNSET, GroupsLike, group_sq_norm

__all__ = [
    "adam_s",
    "ScaleByStandardizedAdamState",
    "scale_by_standardized_adam",
    "standardized_second_moment",
]


class ScaleByStandardizedAdamState(NamedTuple):
    """State of :func:`scale_by_standardized_adam`.

    ``mu``: first moment, shaped like the grouped leaves, in at least float32. ``nu``: second
    moment, one scalar per group (``keepdims`` shape), in at least float32. The ungrouped
    leaves' moments are ``optax.scale_by_adam``'s, in the ``"ungrouped"`` part of the
    ``optax.PartitionState`` of :func:`~optax_sphere.on_groups`.
    """

    count: jax.Array  # shape=(), dtype=jnp.int32
    mu: optax.Updates  # like the grouped leaves
    nu: optax.Updates  # per group (keepdims)


def standardized_second_moment(g: jax.Array, group: Any) -> jax.Array:
    """``d^-1 ||g||^2`` per group (``keepdims``, in at least float32)."""
    return group_sq_norm(g, group) / group.size(g.shape)


def scale_by_standardized_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformation:
    r"""Adam with a standardised (per-group scalar) second moment: Adam-S direction.

    .. math::
        m_k = b_1 m_{k-1} + (1-b_1) g_k,\quad
        v_k = b_2 v_{k-1} + (1-b_2)\, d^{-1}\|g_k\|^2,\quad
        \Delta_k = \frac{m_k / (1-b_1^{k+1})}{\sqrt{v_k/(1-b_2^{k+1})} + \epsilon}

    Roburin et al. eq. 61-63. Compose with ``optax.add_decayed_weights`` before it (coupled L2,
    as in the paper) and ``optax.scale_by_learning_rate`` after it.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the per-group second moment, in [0, 1).
      eps: added to ``sqrt(v_hat)``.
      groups: radially invariant groups (see :mod:`optax_sphere.groups`).

    Returns:
      An ``optax.GradientTransformation`` (state :class:`ScaleByStandardizedAdamState`).

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax.chain(
      ...     optax_sphere.scale_by_standardized_adam(groups={"w": "unit", "b": None}),
      ...     optax.scale_by_learning_rate(1e-3),
      ... )
      >>> state = tx.init(params)
      >>> state[0].inner_states["grouped"].inner_state.nu["w"].shape  # one scalar per group
      (1, 2)

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 4.1, eqs.
      15 and 60-63.
    """
    _utils.check_beta("b1", b1)
    _utils.check_beta("b2", b2)
    _utils.check_rate("eps", eps)

    resolution = resolution_of(groups)

    def init_leaf(group, p):
        return _utils.zeros_acc(p), _utils.zeros_acc(p, group.scalar_shape(p.shape))

    def update_leaf(count, group, g, m, v, *_):
        g_acc = g.astype(accumulation_dtype(g.dtype))
        m = optax.tree.update_moment(g_acc, m, b1, 1)
        v = optax.tree.update_moment(standardized_second_moment(g, group), v, b2, 1)
        direction = _base.adam_direction(m, v, optax.safe_increment(count), b1, b2, eps)
        return direction.astype(g.dtype), m, v

    # the groups are resolved against ``params`` when given; without them (as optax's
    # scale_by_adam may be called), against the updates, which have the same tree
    standardized = _utils.stateful_per_group(
        "scale_by_standardized_adam",
        resolution,
        ScaleByStandardizedAdamState,
        init_leaf,
        update_leaf,
        needs_params=False,
    )
    return on_groups(standardized, optax.scale_by_adam(b1, b2, eps), resolution)


def adam_s(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    mask: Any = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformation:
    r"""Adam-S: Adam with a standardised second moment (Roburin et al. sec. 4.1, eqs. 61-63).

    .. math::
        g_k = \nabla L(x_k) + \lambda x_k,\quad m_k = b_1 m_{k-1} + (1-b_1) g_k,\quad
        v_k = b_2 v_{k-1} + (1-b_2) d^{-1}\|g_k\|^2,\\
        x_{k+1} = x_k - \eta_k \frac{m_k/(1-b_1^{k+1})}{\sqrt{v_k/(1-b_2^{k+1})}+\epsilon}

    per group (``v_k`` a scalar per group); plain Adam with coupled L2 on ungrouped leaves.
    "Adam w/o (a)" of Roburin et al. (ICLR version). ``learning_rate`` and ``weight_decay`` may be
    schedules; ``mask`` selects the leaves that get the L2 term, as ``optax.adamw``'s (a pytree
    of bools or a callable of the params; ``None``: every leaf, as in the paper).

    Args:
      learning_rate: a number or an ``optax`` schedule of the step count.
      b1: decay of the first moment.
      b2: decay of the second moment (one scalar per group, a tensor per ungrouped leaf).
      eps: added to the root of the second moment.
      weight_decay: coupled L2 :math:`\lambda` (a number or a schedule).
      mask: the leaves that get the L2 term, as ``optax.adamw``'s (a pytree of bools or a
        callable of the params; ``None``: every leaf, as in the paper).
      groups: the radially invariant groups (:func:`optax_sphere.find_groups`, a spec rule
        such as ``"unit"``, or a pytree of per-leaf specs); ungrouped leaves get plain Adam.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.adam_s(1e-3, weight_decay=1e-4, groups={"w": "unit", "b": None})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> sorted(params)
      ['b', 'w']

    References:
      Roburin, de Mont-Marin, Bursuc, Marlet, Pérez and Aubry, "Spherical Perspective on
      Learning with Batch Norm", sec. 4.1, eqs. 61-63.
    """
    _utils.check_adam(learning_rate, b1, b2, eps, weight_decay)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        scale_by_standardized_adam(b1, b2, eps, groups=groups),
        optax.scale_by_learning_rate(learning_rate),
    )
