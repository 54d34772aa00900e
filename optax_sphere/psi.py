"""PSI metric scaling: SGD on the manifold of positively scale-equivalent weights.

Yi, "Accelerating training of batch normalization: a manifold perspective" (Yi et al.). For
a group ``w`` whose scale does not change the network function, the quotient (PSI) manifold
with the metric of eq. 6, ``<xi_1, xi_2>_w = <xi_1, xi_2> / ||w||^2``, has the Riemannian
gradient (eq. 7)

    ``grad_w L = ||w||^2 nabla_w L``

and the retraction ``R_w(xi) = w + xi`` (eq. 8), so PSI-SGD (eq. 10) and PSI-SGDM (eq. 11,
alg. 1) are SGD / SGD with momentum applied to the metric-scaled gradient on grouped leaves
and plain SGD elsewhere. Theorem 1: runs started from ``W`` and ``T_a(W)`` (every group scaled
by its own ``a_i > 0``, momentum included) stay related by ``T_a`` at every step.

Rates per unit: the step of eq. 10 turns a group by ``eta ||w|| ||grad||``, the norm of the
gradient on its unit sphere times ``eta``, which for a group of ``k`` units (a LayerNorm layer's
kernel, one group) is about ``k`` times a unit's. With ``rate_per="unit"`` (the default) a
group of ``k`` units (:attr:`~optax_sphere.Group.units`) takes ``eta / k``, so that one rate
means the same angle per step at every group size; on Yi et al.'s groups, one per filter, it is
their rate. Theorem 1 holds as stated (``k`` is a constant of each group).

Overflow safeguard (Yi et al. sec. 6): the norms grow, so a group whose norm exceeds
``max_norm`` is renormalised. Here the group and its momentum are both multiplied by
``1 / ||w_k||`` after the step, which is ``T_a`` of Theorem 1: the iterate stays
scale-equivalent to the one without the safeguard, so the network function is unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _base, _utils
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere._paths import check_trees_match
from optax_sphere.grouped import on_groups, resolution_of
from optax_sphere.groups import UNSET, GroupsLike, group_sq_norm, map_groups

__all__ = ["PsiSgdState", "scale_by_psi_metric", "psi_sgd", "psi_sgdm"]


def _metric_scaled(sq_norm: jax.Array, g: jax.Array) -> jax.Array:
    """``||x||^2 g``, exactly 0 where ``g`` is 0: the Riemannian gradient of a zero gradient
    is zero even when ``||x||^2`` overflowed to Inf (``Inf * 0`` would be NaN). A NaN or Inf
    gradient still gives a non-finite result."""
    return jnp.where(g == 0, jnp.zeros_like(g), sq_norm * g)


def scale_by_psi_metric(
    *, rate_per: str = "unit", groups: GroupsLike = UNSET
) -> optax.GradientTransformation:
    """Riemannian gradient of the PSI manifold (Yi et al. eq. 7): ``g <- ||x||^2 g`` per group,
    divided by the units ``k`` a group holds (``rate_per="unit"``, module docstring).

    Stateless; needs ``params``. Ungrouped leaves pass through. Put it first in a chain (for
    example before ``optax.sgd``) to move any Euclidean optimizer onto the PSI manifold.

    Args:
      rate_per: ``"unit"``: ``g <- ||x||^2 g / k`` on a group of ``k`` units
        (:attr:`~optax_sphere.Group.units`; ``init`` warns where they are not known), so that
        the rate that follows is one unit's; ``"group"``: eq. 7 on every group as it is.
      groups: the groups (see :func:`resolve_groups`).

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> groups = {"w": "unit", "b": None}
      >>> tx = optax.chain(optax_sphere.scale_by_psi_metric(groups=groups), optax.sgd(0.1))
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> updates["w"].shape
      (3, 2)

    References:
      Yi, "Accelerating Training of Batch Normalization: A Manifold Perspective", eq. 7.
    """

    _utils.check_rate_per(rate_per)

    def leaf(group, g, x):
        sq = _utils.group_rate(group_sq_norm(x, group), group, rate_per)
        return _metric_scaled(sq, g.astype(accumulation_dtype(g.dtype))).astype(g.dtype)

    return _utils.stateless_per_group(
        "scale_by_psi_metric",
        groups,
        leaf,
        on_init=lambda grp, params: _utils.warn_unknown_units(
            "scale_by_psi_metric", rate_per, grp, params
        ),
    )


class PsiSgdState(NamedTuple):
    """State of :func:`psi_sgd` / :func:`psi_sgdm`: step count and the momentum ``trace``
    (an empty tuple without momentum), in the accumulation dtype (>= float32)."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    trace: optax.Updates  # like the grouped leaves; () without momentum


def psi_sgdm(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    momentum: float = 0.9,
    *,
    nesterov: bool = False,
    max_norm: float | None = 1e4,
    rate_per: str = "unit",
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformation:
    r"""PSI-SGDM (Yi et al. alg. 1, eq. 11): SGD with momentum on the PSI manifold.

    .. math::
        b_k = \mu b_{k-1} + \|w_k\|^2 \nabla_{w} L,\quad w_{k+1} = w_k - \eta_k b_k

    per group (``optax.sgd``'s momentum form, which is alg. 1's for a constant learning rate),
    and ``optax.sgd(learning_rate, momentum, nesterov)`` on ungrouped leaves. Equal to
    ``chain(scale_by_psi_metric(groups), optax.sgd(...))`` with ``max_norm=None``, in one
    reduction pass (the group norms) and one element-wise pass. With ``max_norm``, a group
    whose norm ``||w_k||`` exceeds it is scaled, with its momentum, by ``1 / ||w_k||`` after
    the step (module docstring). ``learning_rate`` may be a schedule.

    Args:
      learning_rate: a number or an ``optax`` schedule of the step count.
      momentum: the momentum coefficient :math:`\mu`.
      nesterov: Nesterov momentum, as ``optax.sgd``'s.
      max_norm: a group whose norm exceeds it is scaled back by ``1 / ||w||`` (``None``: off).
      rate_per: ``"unit"`` (a group of ``k`` units takes ``learning_rate / k``, module
        docstring) or ``"group"`` (eq. 11 on every group as it is).
      groups: the radially invariant groups; ungrouped leaves get ``optax.sgd``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.psi_sgdm(0.1, 0.9, groups={"w": "unit", "b": None})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'w']

    References:
      Yi, "Accelerating Training of Batch Normalization: A Manifold Perspective", alg. 1 and eq. 11.
    """
    _utils.check_rate("learning_rate", learning_rate)
    if momentum is not None:
        _utils.check_beta("momentum", momentum)
    if max_norm is not None:
        _utils.check_rate("max_norm", max_norm)
        if not _utils.is_traced(max_norm) and not max_norm > 0:
            raise ValueError(f"`max_norm` must be > 0 or None, got {max_norm!r}.")
    # an array momentum (inject_hyperparams: concrete at init, traced in update) may be
    # non-zero: keep the buffer, so that init and update agree on the state's structure
    # momentum=None (psi_sgd, as optax.sgd): no buffer, whatever inject_hyperparams does
    keep_trace = momentum is not None and (
        nesterov or isinstance(momentum, jax.Array) or _utils.is_traced(momentum) or momentum != 0
    )

    _utils.check_rate_per(rate_per)

    resolution = resolution_of(groups)

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolution(params)
        _utils.warn_unknown_units("psi_sgdm", rate_per, grp, params, stacklevel=6)
        trace = jax.tree.map(lambda p: _utils.zeros_acc(p), params) if keep_trace else ()
        return PsiSgdState(jnp.zeros([], jnp.int32), trace)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = _utils.require_params(params, "psi_sgdm")
        check_trees_match(params, updates, *([state.trace] if keep_trace else []))
        grp = resolution(params)
        lr = _utils.value_at(learning_rate, state.count)
        trace = state.trace if keep_trace else jax.tree.map(lambda _: None, updates)

        def leaf(group, g, t, x):
            acc = accumulation_dtype(jnp.result_type(g, x))
            g = g.astype(acc)
            sq = group_sq_norm(x, group)
            metric = _utils.group_rate(sq, group, rate_per)  # ||w||^2 / k
            scale = None
            if max_norm is not None:
                # per group: 1 / ||w_k|| above max_norm, else 1 (T_a of Theorem 1)
                over = sq > max_norm**2
                scale = jnp.where(over, jax.lax.rsqrt(jnp.where(over, sq, 1)), 1)
                g = _metric_scaled(scale * metric, g)
            else:
                g = _metric_scaled(metric, g)
            # the step reads the *new* trace, as optax.sgd does, so that the trace is
            # updated in place and read once
            if keep_trace:
                direction, t = _base.momentum(
                    g, t if scale is None else scale * t, momentum, nesterov
                )
            else:
                direction = g
            step = -lr * direction
            if scale is not None:
                step = step + (scale - 1) * x.astype(acc)
            return step.astype(x.dtype), t

        out = map_groups(leaf, grp, updates, trace, params, trace_once=True)
        new_updates, new_trace = _utils.unzip(out, updates, 2)
        return new_updates, PsiSgdState(
            optax.safe_increment(state.count), new_trace if keep_trace else ()
        )

    sphere = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    sgd = optax.sgd(learning_rate, momentum if keep_trace else None, nesterov=nesterov)
    return on_groups(sphere, sgd, resolution)


def psi_sgd(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    momentum: float | None = None,
    *,
    max_norm: float | None = 1e4,
    rate_per: str = "unit",
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformation:
    r"""PSI-SGD (Yi et al. eq. 10): ``w_{k+1} = w_k - \eta_k \|w_k\|^2 \nabla_w L`` per group.

    :func:`psi_sgdm` without momentum by default (``momentum=None``, as ``optax.sgd``: no
    momentum buffer is kept, also under ``optax.inject_hyperparams``); plain SGD on ungrouped
    leaves. ``max_norm`` as in :func:`psi_sgdm`.

    Args:
      learning_rate: a number or an ``optax`` schedule of the step count.
      momentum: ``None`` (no momentum buffer) or a coefficient, as ``optax.sgd``'s.
      max_norm: a group whose norm exceeds it is scaled back by ``1 / ||w||`` (``None``: off).
      rate_per: as in :func:`psi_sgdm`.
      groups: the radially invariant groups; ungrouped leaves get plain SGD.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.psi_sgd(0.1, groups={"w": "unit", "b": None})
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> updates["w"][0]  # ||w||^2 g per unit: 3 x 1 for a unit of three ones
      Array([-0.3, -0.3], dtype=float32)

    References:
      Yi, "Accelerating Training of Batch Normalization: A Manifold Perspective", eq. 10.
    """
    return psi_sgdm(learning_rate, momentum, max_norm=max_norm, rate_per=rate_per, groups=groups)
