"""The spherical-perspective optimizers: Adam-S, Adam-ST, Adam-SRT and SGD-MRT.

Roburin, de Mont-Marin et al. (seed 000 sec. 4 and app. D-E; seed 001, the ablation
"Adam w/o (a), (ab), (abc)"; thesis 003 ch. 3). On ungrouped leaves every alias is its base
optimizer (Adam, or SGD with momentum) with coupled L2, as in the papers.

``weight_decay`` is the paper's coupled L2 ``g <- grad + wd x`` on every leaf; on grouped
leaves the transport then decouples it by construction (seed 000 eq. 74).

``adam_st``, ``adam_srt`` and ``sgdm_rt`` are fused: the step ``x_{k+1} = x_k - c m_k``
(``c`` a per-group scalar) lets every inner product that R and T need expand into inner
products of ``x_k``, ``m_{k-1}`` and ``grad_k``, so one reduction pass and one element-wise
pass make a whole step, and the state is one momentum buffer plus one scalar per group.
They equal the explicit chains of primitives (``rescale_transport_momentum(chain(
add_decayed_weights(wd), scale_by_standardized_adam(...), scale_by_learning_rate(lr)))``
and so on), which the tests check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _utils
from optax_sphere.groups import (
    GroupsLike,
    accumulation_dtype,
    group_dot,
    resolve_groups,
)
from optax_sphere.standardization import (
    ScaleByStandardizedAdamState,
    init_second_moment,
    scale_by_standardized_adam,
)

__all__ = ["adam_s", "adam_st", "adam_srt", "sgdm_rt", "SgdmRtState"]

Transport = Literal["t", "rt"]


class SgdmRtState(NamedTuple):
    """State of :func:`sgdm_rt`: step count and the momentum buffer ``trace``."""

    count: jax.Array
    trace: Any


def _fused_momentum_step(
    group: Any,
    g: jax.Array,
    m: jax.Array,
    x: jax.Array,
    *,
    beta: Any,
    gamma: Any,
    wd: Any,
    transport: Transport,
    step_coefficient: Callable[[jax.Array], tuple[jax.Array, Any]],
) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """One step of ``m_k = beta m + gamma (g + wd x)``, ``x' = x - c m_k``, then T or RT of m_k.

    ``step_coefficient(||g + wd x||^2)`` returns the per-group ``c`` and auxiliary state.
    All per-group scalars come from six inner products of ``(g, m, x)`` (one pass).
    Returns ``(update, transported m_k, aux, ||x||^2 / ||x'||^2)``.
    """
    acc = accumulation_dtype(jnp.result_type(g, x))
    g, m, x = g.astype(acc), m.astype(acc), x.astype(acc)

    def dot(a, b):
        return group_dot(a, b, group)

    s_gg, s_gx, s_xx = dot(g, g), dot(g, x), dot(x, x)
    s_mx, s_mm, s_mg = dot(m, x), dot(m, m), dot(m, g)
    gt_gt = s_gg + 2 * wd * s_gx + wd**2 * s_xx  # ||g + wd x||^2
    c, aux = step_coefficient(gt_gt)
    mk_x = beta * s_mx + gamma * (s_gx + wd * s_xx)  # <m_k, x>
    mk_mk = beta**2 * s_mm + 2 * beta * gamma * (s_mg + wd * s_mx) + gamma**2 * gt_gt
    x_x1 = s_xx - c * mk_x  # <x, x'>
    mk_x1 = mk_x - c * mk_mk  # <m_k, x'>
    x1_x1 = jnp.maximum(s_xx - 2 * c * mk_x + c**2 * mk_mk, 0)  # ||x'||^2
    m_k = beta * m + gamma * (g + wd * x)
    # sqrt of each factor, not of the product: the product of squared norms overflows float32
    # for norms above ~1e9 (the RT denominator ||x'||^2 itself is fine up to ~1e19).
    den = x1_x1 if transport == "rt" else jnp.sqrt(s_xx) * jnp.sqrt(x1_x1)
    ok = (s_xx > 0) & (x1_x1 > 0)
    safe_den = jnp.where(ok, den, 1)
    # per-group coefficients first, then one element-wise pass: O(1) factors, no overflow
    m_new = jnp.where(ok, (x_x1 / safe_den) * m_k - (mk_x1 / safe_den) * x, m_k)
    ratio = jnp.where(ok, s_xx / jnp.where(ok, x1_x1, 1), 1)
    return -c * m_k, m_new, aux, ratio


def _check_adam(learning_rate, b1, b2, eps, weight_decay) -> None:
    _utils.check_rate("learning_rate", learning_rate)
    _utils.check_beta("b1", b1)
    _utils.check_beta("b2", b2)
    _utils.check_rate("eps", eps)
    _utils.check_rate("weight_decay", weight_decay)


def adam_s(
    learning_rate: _utils.Hyper = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: _utils.Hyper = 0.0,
    *,
    groups: GroupsLike = "unit",
) -> optax.GradientTransformation:
    r"""Adam-S: Adam with a standardised second moment (seed 000 sec. 4.1, eqs. 61-63).

    .. math::
        g_k = \nabla L(x_k) + \lambda x_k,\quad m_k = b_1 m_{k-1} + (1-b_1) g_k,\quad
        v_k = b_2 v_{k-1} + (1-b_2) d^{-1}\|g_k\|^2,\\
        x_{k+1} = x_k - \eta_k \frac{m_k/(1-b_1^{k+1})}{\sqrt{v_k/(1-b_2^{k+1})}+\epsilon}

    per group (``v_k`` a scalar per group); plain Adam with coupled L2 on ungrouped leaves.
    "Adam w/o (a)" of seed 001. ``learning_rate`` and ``weight_decay`` may be schedules.
    """
    _check_adam(learning_rate, b1, b2, eps, weight_decay)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        scale_by_standardized_adam(b1, b2, eps, groups=groups),
        optax.scale_by_learning_rate(learning_rate),
    )


def _adam_sphere(learning_rate, b1, b2, eps, weight_decay, groups, transport: Transport):
    _check_adam(learning_rate, b1, b2, eps, weight_decay)

    def init_fn(params):
        grp = resolve_groups(groups, params)
        mu = jax.tree.map(lambda p: _utils.zeros_acc(p), params)
        nu = _utils.map_groups(init_second_moment, grp, params)
        return ScaleByStandardizedAdamState(jnp.zeros([], jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        params = _utils.require_params(params, f"adam_s{transport}")
        grp = resolve_groups(groups, params)
        lr = _utils.value_at(learning_rate, state.count)
        wd = _utils.value_at(weight_decay, state.count)
        count = optax.safe_increment(state.count)

        def leaf(group, g, m, v, x):
            acc = accumulation_dtype(jnp.result_type(g, x))
            bc1, bc2 = _utils.bias_corrections(b1, b2, count, acc)
            if group is None:  # plain Adam with coupled L2
                gt = g.astype(acc) + wd * x.astype(acc)
                m = b1 * m + (1 - b1) * gt
                v = b2 * v + (1 - b2) * gt * gt
                step = -lr * (m / bc1) / (jnp.sqrt(v / bc2) + eps)
                return step.astype(g.dtype), m, v

            def coefficient(gt_gt):
                v_new = b2 * v + (1 - b2) * gt_gt / group.size(g.shape)
                return lr / bc1 / (jnp.sqrt(v_new / bc2) + eps), v_new

            step, m, v, ratio = _fused_momentum_step(
                group,
                g,
                m,
                x,
                beta=b1,
                gamma=1 - b1,
                wd=wd,
                transport=transport,
                step_coefficient=coefficient,
            )
            if transport == "rt":
                v = v * ratio
            return step.astype(g.dtype), m, v

        out = _utils.map_groups(leaf, grp, updates, state.mu, state.nu, params)
        new_updates, mu, nu = _utils.unzip(out, updates, 3)
        return new_updates, ScaleByStandardizedAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adam_st(
    learning_rate: _utils.Hyper = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: _utils.Hyper = 0.0,
    *,
    groups: GroupsLike = "unit",
) -> optax.GradientTransformation:
    r"""Adam-ST: Adam-S plus transport of the momentum ("Adam w/o (ab)", seed 001 / 003 tab. 3.3).

    As :func:`adam_s`, and after each step the first moment is moved to the new point of the
    sphere by the transport of seed 000 eq. 72,
    :math:`m_k \leftarrow \langle u_k,u_{k+1}\rangle m_k - \langle m_k,u_{k+1}\rangle u_k`.
    The second moment is not rescaled. Same as
    ``transport_momentum(adam_s(...))``, fused into one reduction pass.
    """
    return _adam_sphere(learning_rate, b1, b2, eps, weight_decay, groups, "t")


def adam_srt(
    learning_rate: _utils.Hyper = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: _utils.Hyper = 0.0,
    *,
    groups: GroupsLike = "unit",
) -> optax.GradientTransformation:
    r"""Adam-SRT (seed 000 sec. 4.2, eqs. 19-21 / 78-80, alg. 1): "Adam w/o (abc)".

    .. math::
        m_k = b_1 \mathrm{RT}(m_{k-1}) + (1-b_1)(\nabla L(x_k) + \lambda x_k),\quad
        v_k = b_2 \frac{r_{k-1}^2}{r_k^2} v_{k-1} + (1-b_2) d^{-1}\|\nabla L(x_k)+\lambda x_k\|^2,\\
        x_{k+1} = x_k - \eta_k \frac{m_k/(1-b_1^{k+1})}{\sqrt{v_k/(1-b_2^{k+1})}+\epsilon},\quad
        \mathrm{RT}(a) = \frac{\langle x_k,x_{k-1}\rangle a
            - \langle x_k,a\rangle x_{k-1}}{\|x_k\|^2}

    per group; plain Adam with coupled L2 on ungrouped leaves. Same as
    ``rescale_transport_momentum(adam_s(...))``, fused into one reduction pass.
    """
    return _adam_sphere(learning_rate, b1, b2, eps, weight_decay, groups, "rt")


def sgdm_rt(
    learning_rate: _utils.Hyper = 0.1,
    momentum: float = 0.9,
    weight_decay: _utils.Hyper = 0.0,
    *,
    groups: GroupsLike = "unit",
) -> optax.GradientTransformation:
    r"""SGD-MRT (seed 000 sec. 4.2 remark, app. E.2): SGD momentum with RT of the momentum.

    .. math::
        b_k = \mu\, \mathrm{RT}(b_{k-1}) + \nabla L(x_k) + \lambda x_k,\quad
        x_{k+1} = x_k - \eta_k b_k

    per group (RT of seed 000 eq. 75); ``optax.sgd(lr, momentum)`` with coupled L2 on
    ungrouped leaves. Same as ``rescale_transport_momentum(chain(add_decayed_weights(wd),
    sgd(lr, momentum)))``, fused into one reduction pass.
    """
    _utils.check_rate("learning_rate", learning_rate)
    _utils.check_beta("momentum", momentum)
    _utils.check_rate("weight_decay", weight_decay)

    def init_fn(params):
        resolve_groups(groups, params)
        trace = jax.tree.map(lambda p: _utils.zeros_acc(p), params)
        return SgdmRtState(jnp.zeros([], jnp.int32), trace)

    def update_fn(updates, state, params=None):
        params = _utils.require_params(params, "sgdm_rt")
        grp = resolve_groups(groups, params)
        lr = _utils.value_at(learning_rate, state.count)
        wd = _utils.value_at(weight_decay, state.count)

        def leaf(group, g, b, x):
            acc = accumulation_dtype(jnp.result_type(g, x))
            if group is None:
                b = momentum * b + g.astype(acc) + wd * x.astype(acc)
                return (-lr * b).astype(g.dtype), b
            step, b, _, _ = _fused_momentum_step(
                group,
                g,
                b,
                x,
                beta=momentum,
                gamma=1,
                wd=wd,
                transport="rt",
                step_coefficient=lambda _: (jnp.asarray(lr, acc), None),
            )
            return step.astype(g.dtype), b

        out = _utils.map_groups(leaf, grp, updates, state.trace, params)
        new_updates, trace = _utils.unzip(out, updates, 2)
        return new_updates, SgdmRtState(optax.safe_increment(state.count), trace)

    return optax.GradientTransformation(init_fn, update_fn)
