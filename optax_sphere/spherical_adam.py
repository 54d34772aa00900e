"""The spherical-perspective optimizers: Adam-S, Adam-ST, Adam-SRT and SGD-MRT.

Roburin, de Mont-Marin et al. (sec. 4 and app. D-E; the ablation "Adam w/o (a), (ab), (abc)"
of their ICLR version; Roburin's thesis ch. 3). On ungrouped leaves every alias is its base
optimizer (Adam, or SGD with momentum) with coupled L2, as in the papers.

``weight_decay`` is the paper's coupled L2 ``g <- grad + wd x`` on every leaf; on grouped
leaves the transport then decouples it by construction (Roburin et al. eq. 74).

``adam_st``, ``adam_srt`` and ``sgdm_rt`` are fused. The step ``x_{k+1} = x_k - c m_k``
(``c`` a per-group scalar) keeps ``m_k`` in the plane of ``x_k`` and ``x_{k+1}``, where the
RT of eq. 75 is the projection onto the tangent space at ``x_{k+1}`` and T is that projection
times ``r_{k+1} / r_k``. So the transport of ``m_k`` is applied at the start of the next
update, from ``<m_k, x_{k+1}>``, ``||x_{k+1}||^2`` and the previous radius (a scalar per
group in the state): three reductions and one element-wise pass make a whole step, with no
copy of ``x_k`` kept, and the state is one momentum buffer plus scalars per group. They
equal the explicit chains of primitives (``rescale_transport_momentum(chain(
add_decayed_weights(wd), scale_by_standardized_adam(...), scale_by_learning_rate(lr)))`` and
so on), which the tests check; the state holds the momentum before its transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _base, _utils
from optax_sphere.groups import (
    GroupsLike,
    accumulation_dtype,
    group_dot,
    group_sq_norm,
    resolve_groups,
)
from optax_sphere.standardization import (
    init_second_moment,
    scale_by_standardized_adam,
)

__all__ = ["adam_s", "adam_st", "adam_srt", "sgdm_rt", "SgdmRtState", "SphericalAdamState"]

Transport = Literal["t", "rt"]


class SgdmRtState(NamedTuple):
    """State of :func:`sgdm_rt`.

    ``trace``: the momentum buffer ``b_k`` of the last step, in at least float32, kept where
    it was computed: its RT to the current point is applied at the start of the next update
    (see :func:`adam_srt`). ``sq_norm``: ``||x_k||^2`` per group at the last step (shape
    ``()`` for ungrouped leaves).
    """

    count: jax.Array
    trace: Any
    sq_norm: Any


class SphericalAdamState(NamedTuple):
    """State of :func:`adam_st` and :func:`adam_srt`.

    ``mu``: first moment ``m_k`` of the last step, shaped like the params, in at least float32;
    its transport to the current point is applied at the start of the next update.
    ``nu``: second moment, one scalar per group for grouped leaves (``keepdims`` shape) and
    element-wise for the others. ``sq_norm``: ``||x_k||^2`` per group at the last step (shape
    ``()`` for ungrouped leaves). Grouped leaves cost one buffer plus scalars: about half of
    Adam's state.
    """

    count: jax.Array
    mu: Any
    nu: Any
    sq_norm: Any


def _is_static_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == 0


def _transported_momentum_step(
    group: Any,
    g: jax.Array,
    m: jax.Array,
    x: jax.Array,
    prev_sq_norm: jax.Array,
    *,
    beta: Any,
    gamma: Any,
    wd: Any,
    transport: Transport,
    step_coefficient: Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]],
) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """``m_k = beta T(m_{k-1}) + gamma (g + wd x_k)``, ``update = -c m_k`` for one leaf.

    ``m = m_{k-1}`` is the momentum of the previous step, not yet moved: the previous update
    was ``x_k - x_{k-1} = -c m_{k-1}``, so ``m_{k-1}`` lies in the plane of ``x_{k-1}`` and
    ``x_k``, where RT (eq. 75) is the projection onto the tangent space at ``x_k``,
    ``RT(m) = m - <m, x_k> x_k / ||x_k||^2``, and T (eq. 72) is ``(r_k / r_{k-1}) RT(m)``.
    The transport thus needs ``<m, x_k>``, ``||x_k||^2`` and ``r_{k-1}^2`` (kept in the
    state), never ``x_{k-1}``. ``step_coefficient(||g + wd x||^2, r_{k-1}^2 / r_k^2)``
    returns the per-group ``c`` and auxiliary state. Zero-norm groups are not moved.
    Returns ``(update, m_k, aux, ||x_k||^2)``.

    Costs three reductions (``||x||^2``, ``<m, x>``, ``||g + wd x||^2``) and one element-wise
    pass that writes ``m_k``, which the parameter update then reads: every buffer is read and
    written in place, in an order that needs no copy.
    """
    acc = accumulation_dtype(jnp.result_type(g, x))
    g, m, x = g.astype(acc), m.astype(acc), x.astype(acc)
    sq_norm = group_sq_norm(x, group)
    gt = g if _is_static_zero(wd) else g + wd * x
    gt_gt = group_sq_norm(gt, group)
    ok = (prev_sq_norm > 0) & (sq_norm > 0)
    safe_sq_norm = jnp.where(ok, sq_norm, 1)
    safe_prev = jnp.where(ok, prev_sq_norm, 1)
    radial = jnp.where(ok, group_dot(m, x, group) / safe_sq_norm, 0)  # <m, x> / ||x||^2
    ratio = jnp.where(ok, safe_prev / safe_sq_norm, 1)  # r_{k-1}^2 / r_k^2
    momentum_scale = beta if transport == "rt" else beta * jnp.where(ok, jnp.sqrt(1 / ratio), 1)
    if group.size(x.shape) == 1:
        # the tangent space of a 1-element group is {0}: exactly, not up to the rounding
        # of m - (m x / x^2) x (a static branch: other groups take the general formula)
        tangent = jnp.where(ok, jnp.zeros_like(m), m)
    else:
        tangent = m - radial * x
    m_k = momentum_scale * tangent + gamma * gt
    c, aux = step_coefficient(gt_gt, ratio)
    return -c * m_k, m_k, aux, sq_norm


def _init_sq_norm(group: Any, p: jax.Array) -> jax.Array:
    return _utils.zeros_acc(p, () if group is None else group.scalar_shape(p.shape))


def _check_adam(learning_rate, b1, b2, eps, weight_decay) -> None:
    _utils.check_rate("learning_rate", learning_rate)
    _utils.check_beta("b1", b1)
    _utils.check_beta("b2", b2)
    _utils.check_rate("eps", eps)
    _utils.check_rate("weight_decay", weight_decay)


def adam_s(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    mask: Any = None,
    groups: GroupsLike = "unset",
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
    _check_adam(learning_rate, b1, b2, eps, weight_decay)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        scale_by_standardized_adam(b1, b2, eps, groups=groups),
        optax.scale_by_learning_rate(learning_rate),
    )


def _adam_sphere(learning_rate, b1, b2, eps, weight_decay, mask, groups, transport: Transport):
    _check_adam(learning_rate, b1, b2, eps, weight_decay)

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolve_groups(groups, params)
        mu = jax.tree.map(lambda p: _utils.zeros_acc(p), params)
        nu = _utils.map_groups(init_second_moment, grp, params)
        sq_norm = _utils.map_groups(_init_sq_norm, grp, params)
        return SphericalAdamState(jnp.zeros([], jnp.int32), mu, nu, sq_norm)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = _utils.require_params(params, f"adam_s{transport}")
        grp = resolve_groups(groups, params)
        lr = _utils.value_at(learning_rate, state.count)
        wds = _utils.masked_rate(_utils.value_at(weight_decay, state.count), mask, params)
        count = optax.safe_increment(state.count)

        def leaf(group, g, m, v, sq, x, wd):
            acc = accumulation_dtype(jnp.result_type(g, x))
            bc1, bc2 = _utils.bias_corrections(b1, b2, count, acc)
            if group is None:  # plain Adam with coupled L2
                gt = g.astype(acc) + wd * x.astype(acc)
                direction, m, v = _base.adam(gt, m, v, state.count, b1, b2, eps)
                return (-lr * direction).astype(g.dtype), m, v, sq

            def coefficient(gt_gt, ratio):
                v_prev = v * ratio if transport == "rt" else v  # R of the second moment, eq. 21
                v_new = b2 * v_prev + (1 - b2) * gt_gt / group.size(g.shape)
                return lr / bc1 / (jnp.sqrt(v_new / bc2) + eps), v_new

            step, m, v, sq = _transported_momentum_step(
                group,
                g,
                m,
                x,
                sq,
                beta=b1,
                gamma=1 - b1,
                wd=wd,
                transport=transport,
                step_coefficient=coefficient,
            )
            return step.astype(g.dtype), m, v, sq

        out = _utils.map_groups(leaf, grp, updates, state.mu, state.nu, state.sq_norm, params, wds)
        new_updates, mu, nu, sq_norm = _utils.unzip(out, updates, 4)
        return new_updates, SphericalAdamState(count, mu, nu, sq_norm)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_st(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    mask: Any = None,
    groups: GroupsLike = "unset",
) -> optax.GradientTransformation:
    r"""Adam-ST: Adam-S plus transport of the momentum ("Adam w/o (ab)", Roburin's thesis tab. 3.3).

    As :func:`adam_s`, and after each step the first moment is moved to the new point of the
    sphere by the transport of Roburin et al. eq. 72,
    :math:`m_k \leftarrow \langle u_k,u_{k+1}\rangle m_k - \langle m_k,u_{k+1}\rangle u_k`.
    The second moment is not rescaled. Same as ``transport_momentum(adam_s(...))``, fused
    (see the module docstring; state :class:`SphericalAdamState`). ``mask`` as in
    :func:`adam_s`.

    Args:
      learning_rate, b1, b2, eps, weight_decay, mask, groups: as :func:`adam_s`.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.adam_st(1e-3, weight_decay=1e-4, groups={"w": "unit", "b": None})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> sorted(params)
      ['b', 'w']

    References:
      Roburin, de Mont-Marin, Bursuc, Marlet, Pérez and Aubry, "Spherical Perspective on
      Learning with Batch Norm", sec. 4.2 and eq. 72; Roburin's thesis, tab. 3.3.
    """
    return _adam_sphere(learning_rate, b1, b2, eps, weight_decay, mask, groups, "t")


def adam_srt(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    mask: Any = None,
    groups: GroupsLike = "unset",
) -> optax.GradientTransformation:
    r"""Adam-SRT (Roburin et al. sec. 4.2, eqs. 19-21 / 78-80, alg. 1): "Adam w/o (abc)".

    .. math::
        m_k = b_1 \mathrm{RT}(m_{k-1}) + (1-b_1)(\nabla L(x_k) + \lambda x_k),\quad
        v_k = b_2 \frac{r_{k-1}^2}{r_k^2} v_{k-1} + (1-b_2) d^{-1}\|\nabla L(x_k)+\lambda x_k\|^2,\\
        x_{k+1} = x_k - \eta_k \frac{m_k/(1-b_1^{k+1})}{\sqrt{v_k/(1-b_2^{k+1})}+\epsilon},\quad
        \mathrm{RT}(a) = \frac{\langle x_k,x_{k-1}\rangle a
            - \langle x_k,a\rangle x_{k-1}}{\|x_k\|^2}

    per group; plain Adam with coupled L2 on ungrouped leaves. Same as
    ``rescale_transport_momentum(adam_s(...))``, fused (see the module docstring; state
    :class:`SphericalAdamState`). ``mask`` as in :func:`adam_s`.

    Args:
      learning_rate, b1, b2, eps, weight_decay, mask, groups: as :func:`adam_s`.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.adam_srt(1e-3, weight_decay=1e-4, groups={"w": "unit", "b": None})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> sorted(params)
      ['b', 'w']

    References:
      Roburin, de Mont-Marin, Bursuc, Marlet, Pérez and Aubry, "Spherical Perspective on
      Learning with Batch Norm", sec. 4.2, eqs. 19-21 and 78-80, alg. 1.
    """
    return _adam_sphere(learning_rate, b1, b2, eps, weight_decay, mask, groups, "rt")


def sgdm_rt(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    momentum: float = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    mask: Any = None,
    groups: GroupsLike = "unset",
) -> optax.GradientTransformation:
    r"""SGD-MRT (Roburin et al. sec. 4.2 remark, app. E.2): SGD momentum with RT of the momentum.

    .. math::
        b_k = \mu\, \mathrm{RT}(b_{k-1}) + \nabla L(x_k) + \lambda x_k,\quad
        x_{k+1} = x_k - \eta_k b_k

    per group (RT of Roburin et al. eq. 75); ``optax.sgd(lr, momentum)`` with coupled L2 on
    ungrouped leaves. Same as ``rescale_transport_momentum(chain(add_decayed_weights(wd),
    sgd(lr, momentum)))``, fused (see the module docstring). ``mask`` as in :func:`adam_s`.

    Args:
      learning_rate: a number or an ``optax`` schedule of the step count.
      momentum: the momentum coefficient :math:`\mu`.
      weight_decay: coupled L2 :math:`\lambda` (a number or a schedule).
      mask: the leaves that get the L2 term, as in :func:`adam_s`.
      groups: the radially invariant groups; ungrouped leaves get ``optax.sgd(lr, momentum)``
        with coupled L2.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> groups = {"w": "unit", "b": None}
      >>> tx = optax_sphere.sgdm_rt(0.1, momentum=0.9, weight_decay=5e-4, groups=groups)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> sorted(params)
      ['b', 'w']

    References:
      Roburin, de Mont-Marin, Bursuc, Marlet, Pérez and Aubry, "Spherical Perspective on
      Learning with Batch Norm", sec. 4.2 and app. E.2.
    """
    _utils.check_rate("learning_rate", learning_rate)
    _utils.check_beta("momentum", momentum)
    _utils.check_rate("weight_decay", weight_decay)

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolve_groups(groups, params)
        trace = jax.tree.map(lambda p: _utils.zeros_acc(p), params)
        sq_norm = _utils.map_groups(_init_sq_norm, grp, params)
        return SgdmRtState(jnp.zeros([], jnp.int32), trace, sq_norm)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = _utils.require_params(params, "sgdm_rt")
        grp = resolve_groups(groups, params)
        lr = _utils.value_at(learning_rate, state.count)
        wds = _utils.masked_rate(_utils.value_at(weight_decay, state.count), mask, params)

        def leaf(group, g, b, sq, x, wd):
            acc = accumulation_dtype(jnp.result_type(g, x))
            if group is None:  # optax.sgd's momentum with coupled L2
                direction, b = _base.momentum(g.astype(acc) + wd * x.astype(acc), b, momentum)
                return (-lr * direction).astype(g.dtype), b, sq
            step, b, _, sq = _transported_momentum_step(
                group,
                g,
                b,
                x,
                sq,
                beta=momentum,
                gamma=1,
                wd=wd,
                transport="rt",
                step_coefficient=lambda *_: (jnp.asarray(lr, acc), None),
            )
            return step.astype(g.dtype), b, sq

        out = _utils.map_groups(leaf, grp, updates, state.trace, state.sq_norm, params, wds)
        new_updates, trace, sq_norm = _utils.unzip(out, updates, 3)
        return new_updates, SgdmRtState(optax.safe_increment(state.count), trace, sq_norm)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
