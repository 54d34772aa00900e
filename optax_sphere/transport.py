"""Rescale (R) and transport (T) of the momentum between two steps.

Roburin et al. sec. 4.2 and app. D.2. Momentum accumulated on a radially invariant group mixes
gradients taken at other radii (phenomenon (c)) and at other points of the sphere, whose
tangent spaces differ (phenomena (b1), (b2)). After each step ``x_k -> x_{k+1}`` these
wrappers move the momentum held in the state of any inner optimizer:

* R (eq. 69): ``a <- (r_k / r_{k+1}) a``, and a second moment ``v <- (r_k / r_{k+1})^2 v``
  (eq. 21);
* T (eq. 72): ``a <- <u_k,u_{k+1}> a - <a,u_{k+1}> u_k`` (the published formula), or the exact
  parallel transport of the sphere with ``exact=True``;
* RT (eq. 75): both at once, ``(<x_{k+1},x_k> a - <x_{k+1},a> x_k) / ||x_{k+1}||^2``.

The inner transformation must produce the *final* update (learning rate included), since
the wrappers need ``x_{k+1} = x_k + update``: this is where the paper applies them too
(Roburin et al. alg. 1, lines 10-11). Momentum buffers are the state fields named ``mu``, ``trace``
or ``momentum`` (optax's Adam, ``trace`` / SGD momentum, and this library's own), second
moments the fields named ``nu``; both must be shaped like the params. The wrappers add no
state of their own: the state is the inner state. Ungrouped leaves are left untouched.

``transport_momentum(rescale_momentum(inner))`` equals ``rescale_transport_momentum(inner)``
(R and T commute, eq. 75).

The published optimizers that are mostly this fix: Adam-ST, Adam-SRT and SGD-MRT (Roburin et
al. sec. 4.2, app. E; the ablation "Adam w/o (ab), (abc)" of their ICLR version; Roburin's
thesis ch. 3). On ungrouped leaves each is its base optimizer (Adam, or SGD with momentum)
with coupled L2, as in the papers; ``weight_decay`` is the paper's coupled L2
``g <- grad + wd x`` on every leaf, which the transport decouples on grouped leaves by
construction (eq. 74).

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

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _base, _utils, geometry, registry
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.grouped import on_groups, resolution_of
from optax_sphere.groups import (
    UNSET,
    GroupsLike,
    group_dot,
    group_sq_norm,
    map_groups,
)

__all__ = [
    "adam_st",
    "adam_srt",
    "sgdm_rt",
    "SgdmRtState",
    "SphericalAdamState",
    "MOMENTUM_FIELDS",
    "SECOND_MOMENT_FIELDS",
    "rescale_momentum",
    "transport_momentum",
    "rescale_transport_momentum",
]

MOMENTUM_FIELDS = _utils.MOMENTUM_FIELDS
SECOND_MOMENT_FIELDS = _utils.SECOND_MOMENT_FIELDS

Op = Callable[[Any, Any, Any, Any], Any]


def _momentum_geometry(
    inner: optax.GradientTransformation,
    op: Op,
    rescale_second_moment: bool,
    groups: GroupsLike,
    momentum_fields: Sequence[str],
    name: str,
) -> optax.GradientTransformationExtraArgs:
    inner = optax.with_extra_args_support(inner)
    momentum_fields = tuple(momentum_fields)

    resolution = resolution_of(groups)

    def init_fn(params: optax.Params) -> optax.OptState:
        resolution(params)  # validate the spec against the params now
        state = inner.init(params)
        _, found = _utils.map_state_fields(
            state, momentum_fields, jax.tree.structure(params), lambda t: t
        )
        if not found:
            raise ValueError(
                f"{name}: the inner transformation's state has no momentum field shaped like the "
                f"params (looked for NamedTuple fields {momentum_fields}); wrap an optimizer "
                "that keeps momentum, such as optax.sgd(lr, momentum) or an Adam."
            )
        return state

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        params = _utils.require_params(params, name)
        _utils.check_state_matches(params, updates, state, momentum_fields)
        grp = resolution(params)
        new_updates, state = inner.update(updates, state, params, **extra_args)
        new_params = optax.apply_updates(params, new_updates)
        treedef = jax.tree.structure(params)

        def move(tree):
            return map_groups(
                lambda g, a, x0, x1: a if g is None else op(a, x0, x1, g).astype(a.dtype),
                grp,
                tree,
                params,
                new_params,
                trace_once=True,
            )

        def rescale_sq(tree):
            def leaf(g, v, x0, x1):
                if g is None:
                    return v
                ratio = geometry.safe_div(group_sq_norm(x0, g), group_sq_norm(x1, g))
                return (v * ratio.astype(v.dtype)).astype(v.dtype)

            return map_groups(leaf, grp, tree, params, new_params, trace_once=True)

        state, _ = _utils.map_state_fields(state, momentum_fields, treedef, move)
        if rescale_second_moment:
            state, _ = _utils.map_state_fields(state, SECOND_MOMENT_FIELDS, treedef, rescale_sq)
        return new_updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rescale_momentum(
    inner: optax.GradientTransformation,
    *,
    groups: GroupsLike = UNSET,
    momentum_fields: Sequence[str] = MOMENTUM_FIELDS,
) -> optax.GradientTransformationExtraArgs:
    """R (Roburin et al. eq. 69, 21): after each step, momentum ``*= r_k / r_{k+1}`` and second
    moment ``*= (r_k / r_{k+1})^2`` per group, in the state of ``inner``.

    Args:
      inner: the whole optimizer, learning rate included (its update is ``x_{k+1} - x_k``).
      groups: the radially invariant groups.
      momentum_fields: the state fields of ``inner`` that hold momentum buffers.

    Returns:
      An ``optax.GradientTransformation`` with ``inner``'s state; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.rescale_momentum(
      ...     optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3)),
      ...     groups={"w": "unit", "b": None},
      ... )
      >>> updates, state = tx.update(params, tx.init(params), params)

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eqs. 21 and 69.
    """
    return _momentum_geometry(
        inner, geometry.rescale, True, groups, momentum_fields, "rescale_momentum"
    )


def transport_momentum(
    inner: optax.GradientTransformation,
    *,
    groups: GroupsLike = UNSET,
    exact: bool = False,
    momentum_fields: Sequence[str] = MOMENTUM_FIELDS,
) -> optax.GradientTransformationExtraArgs:
    """T (Roburin et al. eq. 72): after each step, moves the momentum of ``inner`` from ``u_k`` to
    ``u_{k+1}``: ``a <- <u_k,u_{k+1}> a - <a,u_{k+1}> u_k``.

    With ``exact=True`` the momentum is projected on the tangent space at ``u_k`` and moved by
    the exact parallel transport of the sphere (:func:`optax_sphere.geometry.parallel_transport`),
    which preserves its norm; the default is the formula of the paper (what its results used).

    Args:
      inner, groups, momentum_fields: as :func:`rescale_momentum`.
      exact: the exact parallel transport of the sphere instead of eq. 72.

    Returns:
      An ``optax.GradientTransformation`` with ``inner``'s state; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.transport_momentum(
      ...     optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3)),
      ...     groups={"w": "unit", "b": None},
      ... )
      >>> updates, state = tx.update(params, tx.init(params), params)

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eq. 72.
    """
    op = geometry.parallel_transport if exact else geometry.transport
    return _momentum_geometry(inner, op, False, groups, momentum_fields, "transport_momentum")


def rescale_transport_momentum(
    inner: optax.GradientTransformation,
    *,
    groups: GroupsLike = UNSET,
    momentum_fields: Sequence[str] = MOMENTUM_FIELDS,
) -> optax.GradientTransformationExtraArgs:
    """RT (Roburin et al. eq. 75): ``a <- (<x_{k+1},x_k> a - <x_{k+1},a> x_k) / ||x_{k+1}||^2`` on
    the momentum and ``v <- v ||x_k||^2 / ||x_{k+1}||^2`` on the second moment of ``inner``.

    Args:
      inner, groups, momentum_fields: as :func:`rescale_momentum`.

    Returns:
      An ``optax.GradientTransformation`` with ``inner``'s state; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.rescale_transport_momentum(
      ...     optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3)),
      ...     groups={"w": "unit", "b": None},
      ... )
      >>> updates, state = tx.update(params, tx.init(params), params)

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eqs. 21 and 75.
    """
    return _momentum_geometry(
        inner,
        geometry.rescale_transport,
        True,
        groups,
        momentum_fields,
        "rescale_transport_momentum",
    )


Transport = Literal["t", "rt"]


class SgdmRtState(NamedTuple):
    """State of :func:`sgdm_rt`.

    ``trace``: the momentum buffer ``b_k`` of the last step on the grouped leaves, in at
    least float32, kept where it was computed: its RT to the current point is applied at the
    start of the next update (see :func:`adam_srt`). ``sq_norm``: ``||x_k||^2`` per group at
    the last step. The ungrouped leaves' state is ``optax.sgd``'s, in the ``"ungrouped"`` part
    of the ``optax.PartitionState`` of :func:`~optax_sphere.on_groups`.
    """

    count: jax.Array  # shape=(), dtype=jnp.int32
    trace: optax.Updates  # like the grouped leaves
    sq_norm: optax.Updates  # per group (keepdims)


class SphericalAdamState(NamedTuple):
    """State of :func:`adam_st` and :func:`adam_srt`.

    ``mu``: first moment ``m_k`` of the last step, shaped like the grouped leaves, in at least
    float32; its transport to the current point is applied at the start of the next update.
    ``nu``: second moment, one scalar per group (``keepdims`` shape). ``sq_norm``:
    ``||x_k||^2`` per group at the last step. Grouped leaves cost one buffer plus scalars:
    about half of Adam's state. The ungrouped leaves' state is ``optax.adam``'s, in the
    ``"ungrouped"`` part of the ``optax.PartitionState`` of :func:`~optax_sphere.on_groups`.
    """

    count: jax.Array  # shape=(), dtype=jnp.int32
    mu: optax.Updates  # like the grouped leaves
    nu: optax.Updates  # per group (keepdims)
    sq_norm: optax.Updates  # per group (keepdims)


def _is_static_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == 0


def _transported_momentum_step(
    group: Any,
    g: jax.Array,
    m: jax.Array,
    x: jax.Array,
    prev_sq_norm: jax.Array,
    *,
    decay: Any,
    gamma: Any,
    wd: Any,
    transport: Transport,
    step_coefficient: Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]],
) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """``m_k = decay T(m_{k-1}) + gamma (g + wd x_k)``, ``update = -c m_k`` for one leaf.

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
    momentum_scale = decay if transport == "rt" else decay * jnp.where(ok, jnp.sqrt(1 / ratio), 1)
    if group.size(x.shape) == 1:
        # the tangent space of a 1-element group is {0}: exactly, not up to the rounding
        # of m - (m x / x^2) x (a static branch: other groups take the general formula)
        m_k = momentum_scale * jnp.where(ok, jnp.zeros_like(m), m) + gamma * gt
    else:
        # momentum_scale (m - radial x) + gamma (g + wd x), with the x terms gathered into one
        # per-group coefficient: g + wd x is then only read inside the reduction above, so
        # XLA does not write it out as a temporary
        x_coef = (
            -momentum_scale * radial
            if _is_static_zero(wd)
            else gamma * wd - momentum_scale * radial
        )
        m_k = momentum_scale * m + gamma * g + x_coef * x
    c, aux = step_coefficient(gt_gt, ratio)
    return -c * m_k, m_k, aux, sq_norm


def _adam_sphere(learning_rate, b1, b2, eps, weight_decay, mask, groups, transport: Transport):
    _utils.check_adam(learning_rate, b1, b2, eps, weight_decay)
    resolution = resolution_of(groups)

    def init_leaf(group, p):
        per_group = group.scalar_shape(p.shape)
        return _utils.zeros_acc(p), _utils.zeros_acc(p, per_group), _utils.zeros_acc(p, per_group)

    def prepare(count, params):
        return _utils.value_at(learning_rate, count), optax.safe_increment(count)

    def decays(count, params):
        return (_utils.masked_rate(_utils.value_at(weight_decay, count), mask, params),)

    def update_leaf(context, group, g, m, v, sq, x, wd):
        lr, count = context
        acc = accumulation_dtype(jnp.result_type(g, x))
        bc1, bc2 = _base.bias_corrections(b1, b2, count, acc)

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
            decay=b1,
            gamma=1 - b1,
            wd=wd,
            transport=transport,
            step_coefficient=coefficient,
        )
        return step.astype(g.dtype), m, v, sq

    sphere = _utils.stateful_per_group(
        f"adam_s{transport}",
        resolution,
        SphericalAdamState,
        init_leaf,
        update_leaf,
        prepare=prepare,
        extra_trees=decays,
    )
    adam = registry.BASES["adam"](
        learning_rate, weight_decay, b1=b1, b2=b2, eps=eps, mask=_utils.view_mask(mask)
    )
    return on_groups(sphere, adam, resolution)


def adam_st(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    mask: Any = None,
    groups: GroupsLike = UNSET,
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
    groups: GroupsLike = UNSET,
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
    groups: GroupsLike = UNSET,
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

    resolution = resolution_of(groups)

    def init_leaf(group, p):
        return _utils.zeros_acc(p), _utils.zeros_acc(p, group.scalar_shape(p.shape))

    def prepare(count, params):
        return _utils.value_at(learning_rate, count)

    def decays(count, params):
        return (_utils.masked_rate(_utils.value_at(weight_decay, count), mask, params),)

    def update_leaf(context, group, g, b, sq, x, wd):
        lr = context
        acc = accumulation_dtype(jnp.result_type(g, x))
        step, b, _, sq = _transported_momentum_step(
            group,
            g,
            b,
            x,
            sq,
            decay=momentum,
            gamma=1,
            wd=wd,
            transport="rt",
            step_coefficient=lambda *_: (jnp.asarray(lr, acc), None),
        )
        return step.astype(g.dtype), b, sq

    sphere = _utils.stateful_per_group(
        "sgdm_rt",
        resolution,
        SgdmRtState,
        init_leaf,
        update_leaf,
        prepare=prepare,
        extra_trees=decays,
    )
    sgdm = registry.BASES["sgdm"](
        learning_rate, momentum, weight_decay=weight_decay, mask=_utils.view_mask(mask)
    )
    return on_groups(sphere, sgdm, resolution)
