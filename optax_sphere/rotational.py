"""Rotational RMS control and the rotational optimizer variants (RVs).

Kosson, Messmer & Jaggi, "Rotational equilibrium" (Kosson et al., sec. 2 and app. M, alg. 1).
With weight decay, the norm of a scale-invariant group converges to an equilibrium where its
expected angular update per step is ``eta_r`` of Table 1 (see :mod:`optax_sphere.theory`).
The rotational wrapper forces that equilibrium from the first step: for each rotational
group ``x`` of initial norm ``N`` and inner direction ``U`` (the inner optimizer's update
without learning rate and weight decay),

1. ``U <- U - <U, x> x / N^2`` (radial part dropped), then ``U <- U - mean(U)`` if ``center``;
2. ``q <- rms_decay q + (1 - rms_decay) ||U||^2`` and ``a = sqrt(q / (1 - rms_decay^t))``;
3. ``x' = x - eta_r N U / (a + eps)``; ``x <- N (x' - mean(x')) / ||x' - mean(x')||``
   (the mean is removed only with ``center``).

So every group rotates by ``eta_r`` on average, whatever its gradient scale, and keeps its
norm. Weight decay of rotational groups acts only through ``eta_r``. Ungrouped leaves get the
plain inner step ``-lr (U + wd x)`` with ``wd = 0`` by default, as in the authors' code.

Cost: once ``U`` is made orthogonal to ``x``, ``||x'||^2`` is known in closed form, so all
per-group scalars of a step come from five sums over ``(U, x)`` (``<U,U>``, ``<U,x>``,
``<x,x>``, ``sum U``, ``sum x``: sibling reductions of the same operands, which XLA can fuse
into one multi-output pass), followed by one element-wise pass ``update = A x + B U + C``
with per-group scalars ``A, B, C``; nothing is reduced after the step. The state added to
the inner optimizer's is two float32 scalars per group (``N`` and ``q``) and a step count.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _base, _utils, registry
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere._paths import check_trees_match
from optax_sphere.geometry import safe_div
from optax_sphere.grouped import GroupResolution, on_groups, resolution_of
from optax_sphere.groups import (
    UNSET,
    Group,
    GroupsLike,
    group_sq_norm,
    group_sum,
    map_groups,
    resolve_groups,
)
from optax_sphere.theory.equilibrium import angular_update

__all__ = [
    "RotationalRmsControlState",
    "rotational_rms_control",
    "center_groups",
    "rv_adamw",
    "rv_sgdm",
    "rv_lion",
    "wrapped_adam_l2",
    "scale_by_adam_l2_direction",
    "ScaleByAdamL2DirectionState",
]


class RotationalRmsControlState(NamedTuple):
    """State of :func:`rotational_rms_control`.

    The state of the grouped leaves (the ``"grouped"`` part of the ``optax.PartitionState``
    of :func:`~optax_sphere.on_groups`; the others hold their base optimizer's): ``norm``, the
    initial norm ``N`` of each group (after centering with ``center``), and ``q``, the
    running mean of ``||U||^2``, both one scalar per group (``keepdims`` shape, at least
    float32); ``inner``: the inner optimizer's state on the grouped leaves.
    """

    count: jax.Array  # shape=(), dtype=jnp.int32
    norm: optax.Updates  # per group (keepdims)
    q: optax.Updates  # per group (keepdims)
    inner: optax.OptState


# Buffers of an inner optimizer's state that mirror the parameters (checked before its step).


def _centred_norm(x: jax.Array, group: Group, center: bool) -> jax.Array:
    x = x.astype(accumulation_dtype(x.dtype))
    s_xx = group_sq_norm(x, group)
    if not center:
        return jnp.sqrt(s_xx)
    d = group.size(x.shape)
    s_x = group_sum(x, group)
    return jnp.sqrt(jnp.maximum(s_xx - s_x * s_x / d, 0))


def center_groups(params: Any, groups: GroupsLike = UNSET) -> Any:
    """Centres every group of ``params`` (mean zero over the group), keeping its norm.

    ``x <- ||x|| (x - mean(x)) / ||x - mean(x)||``: what the authors do to the rotational
    weights once, before training, when the RVs are used with ``center=True`` (Kosson et al.
    app. M, "Centering the weights"). A group that is zero or constant (no centred
    direction) is returned unchanged. Ungrouped leaves are returned unchanged.

    Args:
      params: the parameters.
      groups: the rotational groups.

    Returns:
      The centred parameters (same tree, same dtypes).

    Example:
      >>> import jax.numpy as jnp, optax_sphere
      >>> params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
      >>> out = optax_sphere.center_groups(params, {"w": "unit"})
      >>> [round(float(v), 4) for v in out["w"].sum(axis=0)]
      [0.0, 0.0]
      >>> [round(float(v), 4) for v in jnp.linalg.norm(out["w"], axis=0)]  # the norms kept
      [3.1623, 4.4721]

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, app. M.
    """
    grp = resolve_groups(groups, params)

    def leaf(group, x):
        if group is None:
            return x
        acc = accumulation_dtype(x.dtype)
        xa = x.astype(acc)
        centred = xa - group_sum(xa, group) / group.size(x.shape)
        scale = safe_div(
            jnp.sqrt(group_sq_norm(xa, group)), jnp.sqrt(group_sq_norm(centred, group))
        )
        return jnp.where(scale > 0, scale * centred, xa).astype(x.dtype)

    return map_groups(leaf, grp, params)


def _rotational_step(
    group: Group,
    u: jax.Array,
    x: jax.Array,
    norm: jax.Array,
    q: jax.Array,
    *,
    eta_r: Any,
    rms_decay: Any,
    eps: Any,
    center: bool,
    count: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One rotational step of a group (Kosson et al. alg. 1, lines 9-13), from per-group sums.

    Returns ``(update, q)`` with ``update = x_new - x``.
    """
    acc = accumulation_dtype(jnp.result_type(u, x))
    u, x = u.astype(acc), x.astype(acc)
    d = group.size(x.shape)
    # The reduction pass: three per-group sums of (u, x), five with centring. Each is a
    # reduction of the operands themselves (no broadcast inside), which keeps the direction
    # from being copied before it is reduced.
    s_uu = group_sq_norm(u, group)
    s_ux = group_sum(u * x, group)
    s_xx = group_sq_norm(x, group)
    # The radial coefficient k = <u, x> / N^2 (line 10, with the stored norm N) enters only as
    # kn = k N = <u, x> / N and c k = eta_r kn / a: no 1 / N^2 that a small group would turn
    # into an overflow.
    kn = safe_div(s_ux, norm)
    xn = safe_div(jnp.sqrt(s_xx), norm)  # ||x|| / N (1 on the sphere)
    if center:
        s_u, s_x = group_sum(u, group), group_sum(x, group)
        mu = (s_u - kn * safe_div(s_x, norm)) / d  # mean of u - k x
        x_mean = s_x / d
    else:
        mu = x_mean = jnp.zeros_like(s_uu)
    # u2 = u - k x - mu: its squared norm and inner product with x, expanded. The expansion
    # is a difference of terms; where it is within rounding of their size (a direction that
    # is all common offset or radial, like a constant gradient of 1e15) u2 is not resolved in
    # this precision, and the group is not rotated (only recentred and renormalised).
    terms = s_uu + kn * kn * (2 + xn * xn) + d * mu * mu
    u2_u2 = s_uu - kn * kn * (2 - xn * xn) - d * mu * mu
    resolved = u2_u2 > 64 * jnp.finfo(acc).eps * terms
    u2_u2 = jnp.where(resolved, u2_u2, 0)
    u2_x = s_ux - kn * xn * jnp.sqrt(s_xx) - mu * d * x_mean
    q = rms_decay * q + (1 - rms_decay) * u2_u2  # line 11
    a = jnp.sqrt(q / _base.bias_correction_factor(rms_decay, count, acc)) + eps
    c = jnp.where(resolved, eta_r * norm / a, 0)  # line 12
    c_k = jnp.where(resolved, eta_r * kn / a, 0)  # c k
    # x'' = x - x_mean - c u2 (u2 has mean zero when centred); its norm in closed form.
    r2 = jnp.maximum(s_xx - d * x_mean * x_mean - 2 * c * u2_x + c * c * u2_u2, 0)
    ok = (norm > 0) & (r2 > 0)
    scale = jnp.where(ok, norm / jnp.sqrt(jnp.where(ok, r2, 1)), 1)  # line 13
    c = jnp.where(ok, c, 0)
    # update = scale (x - x_mean - c (u - k x - mu)) - x
    a_x = jnp.where(ok, scale - 1 + scale * c_k, 0)
    b_u = -scale * c
    c_0 = jnp.where(ok, scale * (c * mu - x_mean), 0)
    return a_x * x + b_u * u + c_0, q


def rotational_rms_control(
    inner: optax.GradientTransformation,
    *,
    eta_r: optax.ScalarOrSchedule,
    ungrouped_learning_rate: optax.ScalarOrSchedule,
    rms_decay: float = 0.9,
    center: bool = True,
    rotational_eps: float = 1e-8,
    ungrouped_weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""Rotational RMS control around any inner direction (Kosson et al. app. M, alg. 1).

    ``inner`` gives the update direction ``U`` without learning rate and without weight
    decay (``optax.scale_by_adam()``, ``optax.scale_by_lion()``, ``optax.trace(0.9)``, any
    chain of those). For every rotational group ``x`` of initial norm ``N``:

    .. math::
        U_\perp = U - \frac{\langle U,x\rangle}{N^2} x - \overline{(\cdot)},\quad
        q_t = \beta q_{t-1} + (1-\beta)\|U_\perp\|^2,\quad
        x' = x - \eta_r N \frac{U_\perp}{\sqrt{q_t/(1-\beta^t)} + \epsilon},\quad
        x \leftarrow N \frac{x' - \bar{x}'}{\|x' - \bar{x}'\|}

    (means removed only with ``center``). The returned update is ``x_new - x``. Ungrouped
    leaves get ``-ungrouped_learning_rate (U + ungrouped_weight_decay x)``. The step is
    computed from five per-group sums of ``(U, x)`` and one element-wise pass; a group whose
    ``U_perp`` is below the working precision's resolution of ``U`` (``U`` all common offset
    or radial, such as a
    constant gradient of 1e15) is not rotated that step, only recentred and renormalised.

    The inner optimizer runs on the gradients and parameters cast to
    their accumulation dtype (at least float32), so its moments are
    float32 for bf16 / fp16 parameters; the update comes back in the gradients' dtype.

    Args:
      inner: the direction; it receives ``params`` and any extra arguments.
      eta_r: expected angular update per step (radians): a number or a schedule of the step
        count. Table 1 of Kosson et al. gives the equilibrium value of each optimizer
        (:func:`optax_sphere.theory.equilibrium`); the ``rv_*`` aliases compute it from the
        current learning rate and weight decay.
      ungrouped_learning_rate: step size of the ungrouped leaves (number or schedule).
      rms_decay: decay of the update-norm tracker ``q``, in [0, 1) (authors' final code: 0.9).
      center: remove the mean of each group (Weight Standardization dynamics, the default
        of the authors' code). Parameters should then be centred before training with
        :func:`center_groups`; the first step centres them otherwise.
      rotational_eps: added to the RMS ``a`` (not inside the square root).
      ungrouped_weight_decay: decoupled weight decay of the ungrouped leaves (0 by default;
        rotational groups never get weight decay).
      mask: which ungrouped leaves ``ungrouped_weight_decay`` applies to, as
        ``optax.adamw``'s ``mask`` (``None``: all; a pytree of bools or a callable of the
        params returning one).
      groups: the rotational groups (see :mod:`optax_sphere.groups`):
        :func:`optax_sphere.rotational_groups` for Kosson et al.'s (every linear and
        convolutional kernel per output unit, read from the model), ``"tensor"`` for
        whole-layer (LayerNorm) invariance.

    Returns:
      An ``optax.GradientTransformation`` (state :class:`RotationalRmsControlState`);
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]]), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.rotational_rms_control(
      ...     optax.scale_by_adam(), eta_r=0.01, ungrouped_learning_rate=1e-3,
      ...     groups={"w": "unit", "b": None},
      ... )
      >>> updates, state = tx.update(params, tx.init(params), params)

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, app. M, alg. 1.
    """
    _utils.check_rate("ungrouped_learning_rate", ungrouped_learning_rate)
    _utils.check_rate("ungrouped_weight_decay", ungrouped_weight_decay)
    resolution = resolution_of(groups)
    base = optax.chain(
        inner,
        optax.add_decayed_weights(ungrouped_weight_decay, _utils.view_mask(mask)),
        optax.scale_by_learning_rate(ungrouped_learning_rate),
    )
    return _rotational_control(
        inner,
        base,
        eta_r=eta_r,
        rms_decay=rms_decay,
        center=center,
        rotational_eps=rotational_eps,
        groups=resolution,
    )


def _rotational_control(
    inner: optax.GradientTransformation,
    base: optax.GradientTransformation,
    *,
    eta_r: optax.ScalarOrSchedule,
    rms_decay: float,
    center: bool,
    rotational_eps: float,
    groups: GroupsLike | GroupResolution,
) -> optax.GradientTransformationExtraArgs:
    """Alg. 1's rotational control of ``inner``'s direction on the grouped leaves, and the
    optax optimizer ``base`` on the others (:func:`~optax_sphere.on_groups`)."""
    _utils.check_rate("eta_r", eta_r)
    _utils.check_beta("rms_decay", rms_decay)
    _utils.check_rate("rotational_eps", rotational_eps)
    inner = optax.with_extra_args_support(inner)
    resolution = resolution_of(groups)

    def init_fn(params: optax.Params) -> optax.OptState:
        if any(isinstance(p, jax.ShapeDtypeStruct) for p in jax.tree.leaves(params)):
            # abstract parameters (to build a sharded state without allocating): the initial
            # norms need values, so the state is abstract too, as jax.eval_shape gives it
            return jax.eval_shape(init_fn, params)
        grp = resolution(params)
        return RotationalRmsControlState(
            count=jnp.zeros([], jnp.int32),
            norm=map_groups(lambda group, p: _centred_norm(p, group, center), grp, params),
            q=_utils.group_zeros(grp, params),
            inner=inner.init(_utils.to_accumulation(params)),
        )

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        params = _utils.require_params(params, "rotational_rms_control")
        check_trees_match(params, updates, state.norm, state.q)
        # the inner direction and its moments in at least float32 (bf16 / fp16 params)
        direction, inner_state = _utils.inner_update(
            inner, updates, state.inner, params, extra_args
        )
        grp = resolution(params)
        count = optax.safe_increment(state.count)
        rate = _utils.value_at(eta_r, state.count)

        def leaf(group, u, norm, q, x, g):
            step, q = _rotational_step(
                group,
                u,
                x,
                norm,
                q,
                eta_r=rate,
                rms_decay=rms_decay,
                eps=rotational_eps,
                center=center,
                count=count,
            )
            return step.astype(g.dtype), q  # the update in the gradient's dtype

        out = map_groups(
            leaf, grp, direction, state.norm, state.q, params, updates, trace_once=True
        )
        new_updates, q = _utils.unzip(out, direction, 2)
        return new_updates, RotationalRmsControlState(count, state.norm, q, inner_state)

    rotation = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return on_groups(rotation, base, resolution)


# --------------------------------------------------------------------------------------
# Equilibrium angular updates of Table 1 (Kosson et al.), as functions of the step count.


def _equilibrium_eta_r(
    kind: str,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    **coefficients: float,
) -> optax.ScalarOrSchedule:
    """Table 1's angular update (:func:`~optax_sphere.theory.equilibrium.angular_update`) at
    the current learning rate and weight decay: a number, or a schedule if either is one."""
    if not callable(learning_rate) and not callable(weight_decay):
        return angular_update(kind, learning_rate, weight_decay, **coefficients)
    return lambda count: angular_update(
        kind,
        _utils.value_at(learning_rate, count),
        _utils.value_at(weight_decay, count),
        **coefficients,
    )


def _check_rv(learning_rate, weight_decay, rotational_eps, ungrouped_weight_decay) -> None:
    """Build-time checks shared by the RV aliases, under the names the user passed."""
    _utils.check_rate("learning_rate", learning_rate)
    _utils.check_rate("weight_decay", weight_decay)
    _utils.check_rate("rotational_eps", rotational_eps)
    if ungrouped_weight_decay is not None:
        _utils.check_rate("ungrouped_weight_decay", ungrouped_weight_decay)


def _ungrouped_decay(weight_decay, ungrouped_weight_decay):
    """The ungrouped leaves' decay: the base optimizer's ``weight_decay`` unless given."""
    return weight_decay if ungrouped_weight_decay is None else ungrouped_weight_decay


def _rotational_variant(
    direction: optax.GradientTransformation,
    base: optax.GradientTransformation,
    kind: str,
    coefficients: dict[str, float],
    *,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    eta_r: optax.ScalarOrSchedule | None,
    rms_decay: float,
    center: bool,
    rotational_eps: float,
    groups: GroupsLike | GroupResolution,
) -> optax.GradientTransformationExtraArgs:
    """The body shared by the RV aliases, once their arguments are checked: Table 1's
    ``eta_r`` of ``kind`` for the current learning rate and weight decay unless given, the
    rotational control of ``direction`` on the groups and the optax optimizer ``base`` (the
    one the alias extends) on the other leaves."""
    if eta_r is None:
        eta_r = _equilibrium_eta_r(kind, learning_rate, weight_decay, **coefficients)
    return _rotational_control(
        direction,
        base,
        eta_r=eta_r,
        rms_decay=rms_decay,
        center=center,
        rotational_eps=rotational_eps,
        groups=groups,
    )


def rv_adamw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: optax.ScalarOrSchedule = 1e-2,
    rms_decay: float = 0.9,
    center: bool = True,
    eta_r: optax.ScalarOrSchedule | None = None,
    rotational_eps: float = 1e-8,
    ungrouped_weight_decay: optax.ScalarOrSchedule | None = None,
    mask: Any = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""RV-AdamW (Kosson et al. app. M): Adam's direction under rotational RMS control.

    The positional arguments are ``optax.adamw``'s (``learning_rate, b1, b2, eps``); the others
    are keyword-only, so that a positional call never means something else than in optax.

    Rotational groups rotate by :math:`\hat\eta_r = \sqrt{2\eta\lambda(1-b_1)/(1+b_1)}` per step on
    average (Table 1, the AdamW equilibrium for the current, possibly scheduled, ``learning_rate``
    and ``weight_decay``) at fixed norm; ``weight_decay`` acts only through :math:`\hat\eta_r`.
    Ungrouped leaves get ``optax.adamw(learning_rate, b1, b2, eps, weight_decay, mask=mask)``
    (``ungrouped_weight_decay`` replaces its decay), so that with nothing grouped the alias is
    exactly ``optax.adamw``, as REQ gives its non-rotational weights. ``eta_r`` overrides
    the Table 1 value. See :func:`rotational_rms_control` for ``rms_decay``, ``center``,
    ``rotational_eps`` and ``groups``. State: ``optax.scale_by_adam``'s (moments in at least
    float32) plus two float32 scalars per group and a step count.

    Args:
      learning_rate: a number or an ``optax`` schedule; sets the rotational groups'
        :math:`\hat\eta_r` and the ungrouped leaves' step.
      b1, b2, eps: Adam's moment decays and denominator term, as ``optax.adamw``'s.
      weight_decay: :math:`\lambda` of the equilibrium the rotational groups are held at.
      rms_decay: decay of the tracker of :math:`\|U_\perp\|^2` (:func:`rotational_rms_control`).
      center: remove each group's mean from its direction and its weights.
      eta_r: overrides Table 1's angular update (a number or a schedule).
      rotational_eps: added to the RMS of :math:`U_\perp`.
      ungrouped_weight_decay: the ungrouped leaves' weight decay (decoupled, as AdamW's);
        ``None``: ``weight_decay``, optax's.
      mask: which ungrouped leaves get the weight decay, as ``optax.adamw``'s ``mask``.
      groups: the rotational groups: Kosson et al.'s are every linear and convolutional
        kernel per output unit, one layer of a stack at a time, which
        ``optax_sphere.rotational_groups(model, *example)`` reads from the model (any
        layout, Flax linen, flax.nnx, Equinox); ungrouped leaves get the base optimizer.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optax_sphere
      >>> def model(p, x):  # a two-layer MLP, kernels (in, out)
      ...     return jax.nn.gelu(x @ p["w"] + p["b"]) @ p["head"]
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "head": jnp.ones((2, 1))}
      >>> groups = optax_sphere.rotational_groups(model, params, jnp.ones((4, 3)))
      >>> groups.grouped
      ['head', 'w']
      >>> tx = optax_sphere.rv_adamw(1e-3, weight_decay=1e-2, groups=groups)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'head', 'w']

    References:
      Kosson, Messmer and Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning
      Across Neural Networks", app. M, alg. 1 and Table 1.
    """
    _utils.check_beta("b1", b1)
    _utils.check_beta("b2", b2)
    _utils.check_rate("eps", eps)
    _check_rv(learning_rate, weight_decay, rotational_eps, ungrouped_weight_decay)
    adamw = registry.BASES["adamw"](
        learning_rate,
        _ungrouped_decay(weight_decay, ungrouped_weight_decay),
        b1=b1,
        b2=b2,
        eps=eps,
        mask=_utils.view_mask(mask),
    )
    return _rotational_variant(
        optax.scale_by_adam(b1, b2, eps),
        adamw,
        "adamw",
        {"b1": b1},
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        eta_r=eta_r,
        rms_decay=rms_decay,
        center=center,
        rotational_eps=rotational_eps,
        groups=groups,
    )


def rv_sgdm(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    momentum: float = 0.9,
    *,
    weight_decay: optax.ScalarOrSchedule = 5e-4,
    rms_decay: float = 0.9,
    center: bool = True,
    eta_r: optax.ScalarOrSchedule | None = None,
    rotational_eps: float = 1e-8,
    ungrouped_weight_decay: optax.ScalarOrSchedule | None = None,
    mask: Any = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""RV-SGDM (Kosson et al. app. M): SGD momentum's direction under rotational RMS control.

    Direction ``b <- momentum b + grad`` (``optax.trace``); rotational groups rotate by
    :math:`\hat\eta_r = \sqrt{2\eta\lambda/(1+\alpha)}` per step on average (Table 1).
    Ungrouped leaves get SGD momentum with coupled L2 ``ungrouped_weight_decay`` (``None``:
    ``weight_decay``, so that with nothing grouped the alias is
    ``chain(add_decayed_weights(weight_decay, mask), sgd(learning_rate, momentum))``; 0: plain
    SGD momentum), as the authors' code.

    Args:
      learning_rate: a number or an ``optax`` schedule; sets the rotational groups'
        :math:`\hat\eta_r` and the ungrouped leaves' step.
      momentum: SGD's momentum coefficient :math:`\alpha`.
      weight_decay, rms_decay, center, eta_r, rotational_eps, groups: as :func:`rv_adamw`.
      ungrouped_weight_decay: the ungrouped leaves' weight decay (coupled L2, as the authors'
        code); ``None``: ``weight_decay``.
      mask: which ungrouped leaves get the L2, as ``optax.add_decayed_weights``'s ``mask``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> layer = lambda p, x: x @ p["w"] + p["b"]
      >>> groups = optax_sphere.rotational_groups(layer, params, jnp.ones((4, 3)))  # w per unit
      >>> tx = optax_sphere.rv_sgdm(0.1, 0.9, weight_decay=5e-4, groups=groups)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'w']

    References:
      Kosson, Messmer and Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning
      Across Neural Networks", app. M, alg. 1 and Table 1.
    """
    _utils.check_beta("momentum", momentum)
    _check_rv(learning_rate, weight_decay, rotational_eps, ungrouped_weight_decay)
    sgdm = registry.BASES["sgdm"](
        learning_rate,
        momentum,
        weight_decay=_ungrouped_decay(weight_decay, ungrouped_weight_decay),
        mask=_utils.view_mask(mask),
    )
    return _rotational_variant(
        optax.trace(momentum),
        sgdm,
        "sgdm",
        {"momentum": momentum},
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        eta_r=eta_r,
        rms_decay=rms_decay,
        center=center,
        rotational_eps=rotational_eps,
        groups=groups,
    )


def _scale_by_lion_sign(b1: float, b2: float) -> optax.GradientTransformation:
    """``optax.scale_by_lion`` (hard sign, same state), except that a non-finite
    ``c = b1 m + (1 - b1) g`` is passed on instead of its sign: ``sign(inf) = 1`` would turn an
    Inf gradient, and the Inf it leaves in ``m`` for good, into ordinary steps."""

    def init_fn(params: optax.Params) -> optax.OptState:
        mu = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        del params

        def direction(g, m):
            c = (1.0 - b1) * g + b1 * m
            return jnp.where(jnp.isfinite(c), jnp.sign(c), c)

        new_updates = jax.tree.map(direction, updates, state.mu)
        mu = optax.tree.update_moment(updates, state.mu, b2, 1)
        return new_updates, optax.ScaleByLionState(optax.safe_increment(state.count), mu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rv_lion(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    weight_decay: optax.ScalarOrSchedule = 1.0,
    rms_decay: float = 0.9,
    center: bool = True,
    eta_r: optax.ScalarOrSchedule | None = None,
    rotational_eps: float = 1e-8,
    ungrouped_weight_decay: optax.ScalarOrSchedule | None = None,
    mask: Any = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""RV-Lion (Kosson et al. app. M): Lion's sign direction under rotational RMS control.

    Rotational groups rotate by :math:`\hat\eta_r = \sqrt{\pi\eta\lambda}
    \sqrt{(1-b_1)^2 + b_1^2(1-b_2)/(1+b_2)}` per step on average (Table 1, eq. 72).
    Ungrouped leaves get ``optax.lion(learning_rate, b1, b2, weight_decay, mask=mask)``
    (``ungrouped_weight_decay`` replaces its decay): with nothing grouped, the alias is
    ``optax.lion``.

    Args:
      learning_rate: a number or an ``optax`` schedule; sets the rotational groups'
        :math:`\hat\eta_r` and the ungrouped leaves' step.
      b1, b2: Lion's interpolation and momentum decays, as ``optax.lion``'s.
      weight_decay, rms_decay, center, eta_r, rotational_eps, groups: as :func:`rv_adamw`.
      ungrouped_weight_decay: the ungrouped leaves' weight decay (decoupled, as Lion's);
        ``None``: ``weight_decay``.
      mask: which ungrouped leaves get the weight decay, as ``optax.lion``'s ``mask``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> layer = lambda p, x: x @ p["w"] + p["b"]
      >>> groups = optax_sphere.rotational_groups(layer, params, jnp.ones((4, 3)))  # w per unit
      >>> tx = optax_sphere.rv_lion(1e-4, weight_decay=1.0, groups=groups)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'w']

    References:
      Kosson, Messmer and Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning
      Across Neural Networks", app. M, alg. 1 and eq. 72.
    """
    _utils.check_beta("b1", b1)
    _utils.check_beta("b2", b2)
    _check_rv(learning_rate, weight_decay, rotational_eps, ungrouped_weight_decay)
    # optax.lion, with the sign kept off non-finite values
    lion = optax.chain(
        _scale_by_lion_sign(b1, b2),
        optax.add_decayed_weights(
            _ungrouped_decay(weight_decay, ungrouped_weight_decay), _utils.view_mask(mask)
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _rotational_variant(
        _scale_by_lion_sign(b1, b2),
        lion,
        "lion",
        {"b1": b1, "b2": b2},
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        eta_r=eta_r,
        rms_decay=rms_decay,
        center=center,
        rotational_eps=rotational_eps,
        groups=groups,
    )


class ScaleByAdamL2DirectionState(NamedTuple):
    """State of :func:`scale_by_adam_l2_direction`: Adam's moments (at least float32)."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    mu: optax.Updates  # like the params
    nu: optax.Updates  # like the params


def scale_by_adam_l2_direction(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    ungrouped_weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformation:
    r"""The gradient part of Adam+L2's update (Kosson et al. eqs. 73-75, authors' wrapper code).

    On grouped leaves the second moment sees the L2-regularised gradient, the first moment
    only the loss gradient (the L2 part of the update is weight decay, replaced by the
    rotational control): :math:`m_t = b_1 m_{t-1} + (1-b_1) g_t`,
    :math:`v_t = b_2 v_{t-1} + (1-b_2)(g_t + \lambda x)^2`,
    :math:`U = \hat m_t / (\sqrt{\hat v_t} + \epsilon)`. Ungrouped leaves get the full Adam
    direction with coupled L2 ``ungrouped_weight_decay``. Needs ``params``.

    Args:
      b1, b2, eps: Adam's decays and denominator term.
      weight_decay: the L2 :math:`\lambda` the grouped leaves' second moment sees.
      ungrouped_weight_decay: the coupled L2 of the ungrouped leaves.
      groups: the rotational groups.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]]), "b": jnp.zeros(2)}
      >>> groups = {"w": "unit", "b": None}
      >>> tx = optax_sphere.rotational_rms_control(
      ...     optax_sphere.scale_by_adam_l2_direction(weight_decay=1e-4, groups=groups),
      ...     eta_r=0.01, ungrouped_learning_rate=1e-3, groups=groups,
      ... )
      >>> updates, state = tx.update(params, tx.init(params), params)

    References:
      Kosson et al., "Rotational Equilibrium", ICML 2024, eqs. 73-75 and app. M.
    """
    _utils.check_beta("b1", b1)
    _utils.check_beta("b2", b2)
    _utils.check_rate("eps", eps)
    _utils.check_rate("weight_decay", weight_decay)
    _utils.check_rate("ungrouped_weight_decay", ungrouped_weight_decay)

    resolution = resolution_of(groups)
    direction = _adam_l2_direction(b1, b2, eps, weight_decay, resolution)
    adam = optax.chain(
        optax.add_decayed_weights(ungrouped_weight_decay), optax.scale_by_adam(b1, b2, eps)
    )
    return on_groups(direction, adam, resolution)


def _adam_l2_direction(
    b1: float, b2: float, eps: float, weight_decay: Any, resolution: GroupResolution
) -> optax.GradientTransformationExtraArgs:
    """:func:`scale_by_adam_l2_direction` on the grouped leaves."""
    _utils.check_beta("b1", b1)
    _utils.check_beta("b2", b2)
    _utils.check_rate("eps", eps)
    _utils.check_rate("weight_decay", weight_decay)

    def init_leaf(group, p):
        return _utils.zeros_acc(p), _utils.zeros_acc(p)  # two buffers: a state is donatable

    def update_leaf(count, group, g, m, v, x):
        wd = _utils.value_at(weight_decay, count)
        acc = accumulation_dtype(jnp.result_type(g, x))
        dtype, g, x = g.dtype, g.astype(acc), x.astype(acc)
        m, v = _base.adam_moments(g, g + wd * x, m, v, b1, b2)
        direction = _base.adam_direction(m, v, optax.safe_increment(count), b1, b2, eps)
        return direction.astype(dtype), m, v

    return _utils.stateful_per_group(
        "scale_by_adam_l2_direction",
        resolution,
        ScaleByAdamL2DirectionState,
        init_leaf,
        update_leaf,
    )


def wrapped_adam_l2(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: optax.ScalarOrSchedule = 1e-2,
    rms_decay: float = 0.9,
    center: bool = True,
    eta_r: optax.ScalarOrSchedule | None = None,
    rotational_eps: float = 1e-8,
    ungrouped_weight_decay: optax.ScalarOrSchedule | None = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""The "wrapped Adam+L2" RV (Kosson et al. sec. 3, Table 2 last column, app. O).

    Adam+L2's direction (:func:`scale_by_adam_l2_direction`: L2 ``weight_decay`` inside the
    second moment) with the balanced angular update of AdamW,
    :math:`\hat\eta_r = \sqrt{2\eta\lambda(1-b_1)/(1+b_1)}`, instead of Adam+L2's own
    equilibrium, which depends on the gradient norm (eq. 84, 87). Ungrouped leaves get Adam
    with coupled L2 ``ungrouped_weight_decay`` (by default ``weight_decay``, so that with
    nothing grouped the alias is its base, Adam+L2; 0: plain Adam there).

    Args:
      learning_rate: a number or an ``optax`` schedule; sets the rotational groups'
        :math:`\hat\eta_r` and the ungrouped leaves' step.
      b1, b2, eps: Adam's moment decays and denominator term.
      weight_decay, rms_decay, center, eta_r, rotational_eps, groups: as :func:`rv_adamw`.
      ungrouped_weight_decay: the ungrouped leaves' weight decay (coupled L2); ``None``:
        ``weight_decay``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> groups = {"w": "unit", "b": None}
      >>> tx = optax_sphere.wrapped_adam_l2(1e-3, weight_decay=1e-2, groups=groups)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'w']

    References:
      Kosson, Messmer and Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning
      Across Neural Networks", sec. 3, Table 2 and app. O.
    """
    _check_rv(learning_rate, weight_decay, rotational_eps, ungrouped_weight_decay)
    resolution = resolution_of(groups)
    adam = registry.BASES["adam"](
        learning_rate, _ungrouped_decay(weight_decay, ungrouped_weight_decay), b1=b1, b2=b2, eps=eps
    )
    return _rotational_variant(
        _adam_l2_direction(b1, b2, eps, weight_decay, resolution),
        adam,
        "adamw",
        {"b1": b1},
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        eta_r=eta_r,
        rms_decay=rms_decay,
        center=center,
        rotational_eps=rotational_eps,
        groups=resolution,
    )
