"""Norm growth: momentum inflates the norm of scale-invariant weights. AdamP / SGDP drop the
radial part of the update of weights detected as scale-invariant.

Heo et al., "AdamP: Slowing down the slowdown for momentum optimizers on scale-invariant
weights" (ICLR 2021), as in the authors' code. The radial component of a momentum update makes
the norm of a scale-invariant weight grow fast, which shrinks its effective step. For each
grouped leaf, with ``x`` the weights and ``g`` the raw gradient:

1. per group (output unit), ``cos = |<g, x>| / max(||g|| ||x||, eps)``; if the largest
   ``cos`` of the leaf is below ``delta / sqrt(d)`` (``d`` the group size), the weights are
   taken as scale-invariant per group and the update ``p`` becomes
   ``p - <p, x_n> x_n`` with ``x_n = x / (||x|| + eps)`` per group;
2. otherwise the same test on the whole leaf (``d`` = its size), and the same projection with
   the whole leaf as one vector;
3. a leaf that was projected gets the decoupled weight decay scaled by ``wd_ratio``.

Ungrouped leaves are never projected and get the full weight decay.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _base, _utils
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.grouped import on_groups, resolution_of
from optax_sphere.groups import UNSET, Group, GroupsLike, group_dot, map_groups

__all__ = ["ScaleInvariantProjectionState", "scale_invariant_projection", "adamp", "sgdp"]


class ScaleInvariantProjectionState(NamedTuple):
    """Step count (for a ``weight_decay`` schedule) and the state of the inner direction."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    inner_state: optax.OptState


class _Decision(NamedTuple):
    unit_hit: jax.Array  # leaf scalar: projected per group
    layer_hit: jax.Array  # leaf scalar: projected as one vector (when not per group)
    unit_sq: jax.Array  # (||x|| + eps)^2 per group
    layer_sq: jax.Array  # (||x|| + eps)^2 of the leaf
    gx: jax.Array  # <g, x> per group


def _decide(group: Group, g: jax.Array, x: jax.Array, delta: float, eps: float) -> _Decision:
    """The two tests of the module docstring, from one pass over ``(g, x)``."""
    # ||g||^2 of g seen through a barrier: the inner Adam squares g too, and XLA would
    # otherwise merge the two squares and write g * g out as a full-size temporary
    g_own = jax.lax.optimization_barrier(g)
    s_gx, s_gg, s_xx = (
        group_dot(g, x, group),
        group_dot(g_own, g_own, group),
        group_dot(x, x, group),
    )
    unit_hit = jnp.max(jnp.abs(s_gx) / jnp.maximum(jnp.sqrt(s_gg * s_xx), eps)) < delta / math.sqrt(
        group.size(x.shape)
    )
    # layer sums from the per-group sums (the barrier keeps XLA from turning them back into
    # full-size reductions of the products)
    l_gx, l_gg, l_xx = (jnp.sum(s) for s in jax.lax.optimization_barrier((s_gx, s_gg, s_xx)))
    if len(group.axes) == x.ndim:  # the group is the whole leaf: the layer test repeats it
        layer_hit = unit_hit
    else:
        cos_layer = jnp.abs(l_gx) / jnp.maximum(jnp.sqrt(l_gg * l_xx), eps)
        layer_hit = cos_layer < delta / math.sqrt(x.size)
    unit_sq, layer_sq = (jnp.sqrt(s_xx) + eps) ** 2, (jnp.sqrt(l_xx) + eps) ** 2
    return _Decision(unit_hit, layer_hit, unit_sq, layer_sq, s_gx)


def _project(
    group: Group, p: jax.Array, x: jax.Array, d: _Decision, s_px: jax.Array | None = None
) -> jax.Array:
    """``p - <p, x_n> x_n`` with ``x_n = x / (||x|| + eps)`` per group or per leaf, or ``p``.

    ``s_px``: ``<p, x>`` per group when known without reducing ``p``.
    """
    s_px = jax.lax.optimization_barrier(group_dot(p, x, group) if s_px is None else s_px)
    coef = jnp.where(
        d.unit_hit, s_px / d.unit_sq, jnp.where(d.layer_hit, jnp.sum(s_px) / d.layer_sq, 0)
    )
    return p - coef * x


def scale_invariant_projection(
    inner: optax.GradientTransformation,
    *,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    eps: float = 1e-8,
    project_momentum: bool = False,
    mask: Any = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""Projection of AdamP / SGDP (Heo et al. 2021, alg. 1-2) around an update direction.

    ``inner`` maps the raw gradient to an update direction ``p`` (no learning rate, no weight
    decay, e.g. ``optax.scale_by_adam()``). On grouped leaves detected as scale-invariant from
    the raw gradient (module docstring), ``p <- p - <p, x_n> x_n``; then the decoupled decay
    ``p <- p + r \lambda x`` is added, with ``r = wd_ratio`` on projected leaves and 1
    elsewhere. Put ``optax.scale_by_learning_rate(lr)`` after it. ``weight_decay`` may be a
    schedule; ``mask`` selects the leaves that get it, as ``optax.adamw``'s (a pytree of
    bools or a callable of the params; ``None``: every leaf).

    ``project_momentum=True`` also projects the momentum buffers of ``inner`` (state fields
    ``mu``, ``trace``, ``momentum``), as SGDP without Nesterov does in the authors' code, where
    the update *is* the buffer and is projected in place.

    ``inner`` runs on the gradients and parameters cast to
    their accumulation dtype (at least float32), so its moments are
    float32 for bf16 / fp16 parameters; the update comes back in the gradients' dtype.

    Args:
      inner: the update direction (no learning rate, no weight decay).
      delta: threshold of the cosine test, scaled by ``1 / sqrt(d)``.
      wd_ratio: weight-decay factor of the projected leaves.
      weight_decay: the decoupled decay :math:`\lambda` (a number or a schedule).
      eps: in the cosine and in the normalisation of ``x``.
      project_momentum: also project ``inner``'s momentum buffers (SGDP without Nesterov).
      mask: the leaves that get the weight decay.
      groups: the groups the test runs on.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax.chain(
      ...     optax_sphere.scale_invariant_projection(
      ...         optax.scale_by_adam(), groups={"w": "unit", "b": None}
      ...     ),
      ...     optax.scale_by_learning_rate(1e-3),
      ... )
      >>> updates, _ = tx.update(params, tx.init(params), params)

    References:
      Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
      Weights", ICLR 2021, alg. 1-2 and eq. 12.
    """
    return _projection(
        inner,
        None,
        delta=delta,
        wd_ratio=wd_ratio,
        weight_decay=weight_decay,
        eps=eps,
        project_momentum=project_momentum,
        mask=mask,
        groups=groups,
    )


def _projection(
    inner: optax.GradientTransformation,
    nesterov_momentum: float | None,
    *,
    delta: float,
    wd_ratio: float,
    weight_decay: optax.ScalarOrSchedule,
    eps: float,
    project_momentum: bool,
    mask: Any,
    groups: GroupsLike,
) -> optax.GradientTransformationExtraArgs:
    """:func:`scale_invariant_projection`. ``nesterov_momentum``: ``inner`` is
    ``optax.trace(nesterov_momentum, nesterov=True)``, whose direction is
    ``p = g + nesterov_momentum b`` with ``b`` its new trace.

    The direction feeds two passes, the per-group sums ``<p, x>`` and the update, and XLA
    writes a value with two consumers out to memory for both to read: a full-size temporary
    every step. For SGDP with Nesterov momentum the sums are instead
    ``<g, x> + nesterov_momentum <b, x>``, the first from the scale-invariance test and the
    second a reduction of the trace, which is in the state anyway; ``p`` then has one
    consumer, the update, and is never written (13 passes instead of 15). AdamP's direction
    has no such split (``benchmarks/README.md``).
    """
    _utils.check_rate("delta", delta)
    _utils.check_rate("wd_ratio", wd_ratio)
    _utils.check_rate("weight_decay", weight_decay)
    _utils.check_rate("eps", eps)
    inner = optax.with_extra_args_support(inner)
    resolution = resolution_of(groups)

    def init_fn(params: optax.Params) -> optax.OptState:
        resolution(params)
        return ScaleInvariantProjectionState(
            jnp.zeros([], jnp.int32), inner.init(_utils.to_accumulation(params))
        )

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        params = _utils.require_params(params, "scale_invariant_projection")
        # the inner direction and its moments in at least float32 (bf16 / fp16 params)
        direction, inner_state = _utils.inner_update(
            inner, updates, state.inner_state, params, extra_args
        )
        grp = resolution(params)
        decays = _utils.masked_rate(_utils.value_at(weight_decay, state.count), mask, params)

        def decide(group, g, x):
            acc = accumulation_dtype(jnp.result_type(g, x))
            return _decide(group, g.astype(acc), x.astype(acc), delta, eps)

        decisions = map_groups(decide, grp, updates, params, trace_once=True)
        # what the direction is built from: its new trace for SGDP with Nesterov
        traces = direction if nesterov_momentum is None else inner_state.trace

        def leaf(group, p, x, d, g, decay, b):
            acc = accumulation_dtype(jnp.result_type(p, x))
            p32, x32 = p.astype(acc), x.astype(acc)
            ratio = jnp.where(d.unit_hit | d.layer_hit, wd_ratio, 1)
            s_px = None
            if nesterov_momentum is not None:
                s_px = d.gx + nesterov_momentum * group_dot(b.astype(acc), x32, group)
            # the update in the gradient's dtype
            projected = _project(group, p32, x32, d, s_px)
            return (projected + ratio * decay * x32).astype(g.dtype)

        new_updates = map_groups(
            leaf, grp, direction, params, decisions, updates, decays, traces, trace_once=True
        )
        if project_momentum:

            def project_tree(tree):
                return map_groups(
                    lambda group, m, x, d: _project(group, m, x.astype(m.dtype), d).astype(m.dtype),
                    grp,
                    tree,
                    params,
                    decisions,
                    trace_once=True,
                )

            inner_state, _ = _utils.map_state_fields(
                inner_state, _utils.MOMENTUM_FIELDS, jax.tree.structure(params), project_tree
            )
        return new_updates, ScaleInvariantProjectionState(
            optax.safe_increment(state.count), inner_state
        )

    projection = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    # off the groups: the inner direction and the decoupled decay, as AdamW / SGDW
    decayed = optax.chain(inner, optax.add_decayed_weights(weight_decay, _utils.view_mask(mask)))
    return on_groups(projection, decayed, resolution)


def _scale_by_adam_torch(b1, b2, eps, nesterov) -> optax.GradientTransformation:
    """Adam direction as the AdamP code computes it: ``m' / (sqrt(v / bc2) + eps) / bc1`` with
    ``m' = m`` or, with Nesterov, ``b1 m + (1 - b1) g`` (same ``bc1``)."""
    if not nesterov:
        return optax.scale_by_adam(b1, b2, eps)

    def init_fn(params: optax.Params) -> optax.OptState:
        mu = jax.tree.map(lambda p: _utils.zeros_acc(p), params)
        nu = jax.tree.map(lambda p: _utils.zeros_acc(p), params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), mu, nu)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        del params
        count = optax.safe_increment(state.count)

        def leaf(g, m, v):
            g32 = g.astype(accumulation_dtype(g.dtype))
            m, v = _base.adam_moments(g32, g32, m, v, b1, b2)
            look_ahead = optax.tree.update_moment(g32, m, b1, 1)
            step = _base.adam_direction(look_ahead, v, count, b1, b2, eps)
            return step.astype(g.dtype), m, v

        out = jax.tree.map(leaf, updates, state.mu, state.nu)
        new_updates, mu, nu = _utils.unzip(out, updates, 3)
        return new_updates, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamp(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
    mask: Any = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformation:
    r"""AdamP (Heo et al. 2021, alg. 2), as in the authors' code.

    .. math::
        p_k = \frac{m_k / (1 - b_1^k)}{\sqrt{v_k / (1 - b_2^k)} + \epsilon},\quad
        x_{k+1} = x_k - \eta_k\left(\Pi(p_k) + r_k \lambda x_k\right)

    with Adam's element-wise moments of the raw gradient, :math:`\Pi` the projection of
    :func:`scale_invariant_projection` and :math:`r_k` = ``wd_ratio`` where it projected, 1
    elsewhere. ``weight_decay`` is AdamW-style (decoupled, multiplied by the learning rate).
    ``nesterov`` uses :math:`b_1 m_k + (1-b_1) g_k` in place of :math:`m_k`.
    ``learning_rate`` and ``weight_decay`` may be schedules; ``mask`` selects the leaves that get
    the decay, as ``optax.adamw``'s.

    Args:
      learning_rate: a number or an ``optax`` schedule of the step count.
      b1, b2, eps: Adam's moment decays and denominator term, as ``optax.adamw``'s.
      weight_decay: decoupled weight decay :math:`\lambda` (a number or a schedule).
      delta: a leaf is projected when the cosine between its gradient and its weights is below
        ``delta / sqrt(dim)`` (the authors' test of scale invariance).
      wd_ratio: the factor :math:`r_k` of the weight decay where the update was projected.
      nesterov: Nesterov momentum.
      mask: the leaves that get the weight decay, as ``optax.adamw``'s.
      groups: the groups the projection acts on; ungrouped leaves get AdamW.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.adamp(1e-3, weight_decay=1e-2, groups={"w": "unit", "b": None})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'w']

    References:
      Heo, Chun, Oh, Han, Yun, Kim, Uh and Ha, "AdamP: Slowing Down the Slowdown for Momentum
      Optimizers on Scale-invariant Weights", ICLR 2021, alg. 2.
    """
    _utils.check_rate("learning_rate", learning_rate)
    _utils.check_beta("b1", b1)
    _utils.check_beta("b2", b2)
    _utils.check_rate("eps", eps)
    # Adam's direction is written out once for the sums <p, x> and the update: computed a
    # second time inside the sums (as SGDP's), it was slower in a whole train step
    return optax.chain(
        scale_invariant_projection(
            _scale_by_adam_torch(b1, b2, eps, nesterov),
            delta=delta,
            wd_ratio=wd_ratio,
            weight_decay=weight_decay,
            eps=eps,
            mask=mask,
            groups=groups,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def sgdp(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    eps: float = 1e-8,
    mask: Any = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformation:
    r"""SGDP (Heo et al. 2021, alg. 1), as in the authors' code.

    .. math::
        b_k = \mu b_{k-1} + g_k,\quad p_k = b_k \text{ (or } g_k + \mu b_k
        \text{ with Nesterov)},\quad
        x_{k+1} = x_k - \eta_k\left(\Pi(p_k) + r_k \frac{\lambda}{1-\mu} x_k\right)

    with :math:`\Pi` and :math:`r_k` as in :func:`adamp`. The weight decay is decoupled and
    divided by ``1 - momentum`` as in the authors' code (the stationary size of coupled L2
    through the momentum). Without Nesterov the update is the buffer itself, so the buffer is
    kept projected (``project_momentum=True``), as the in-place projection of the authors' code
    does. ``learning_rate`` and ``weight_decay`` may be schedules; ``mask`` as in :func:`adamp`.

    Args:
      learning_rate: a number or an ``optax`` schedule of the step count.
      momentum: the momentum coefficient :math:`\mu`.
      nesterov: Nesterov momentum, as ``optax.sgd``'s.
      weight_decay: decoupled weight decay :math:`\lambda` (a number or a schedule).
      delta, wd_ratio: as in :func:`adamp`.
      eps: guards the cosine of the projection test.
      mask: the leaves that get the weight decay, as ``optax.adamw``'s.
      groups: the groups the projection acts on; ungrouped leaves get SGD with momentum.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.sgdp(0.1, 0.9, weight_decay=1e-4, groups={"w": "unit", "b": None})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'w']

    References:
      Heo, Chun, Oh, Han, Yun, Kim, Uh and Ha, "AdamP: Slowing Down the Slowdown for Momentum
      Optimizers on Scale-invariant Weights", ICLR 2021, alg. 1.
    """
    _utils.check_rate("learning_rate", learning_rate)
    _utils.check_beta("momentum", momentum)
    _utils.check_rate("weight_decay", weight_decay)
    if callable(weight_decay):
        decay = lambda count: weight_decay(count) / (1 - momentum)
    else:
        decay = weight_decay / (1 - momentum)
    return optax.chain(
        _projection(
            optax.trace(decay=momentum, nesterov=nesterov),
            momentum if nesterov else None,
            delta=delta,
            wd_ratio=wd_ratio,
            weight_decay=decay,
            eps=eps,
            project_momentum=not nesterov,
            mask=mask,
            groups=groups,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
