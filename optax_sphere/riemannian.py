"""Cho & Lee's optimizers on the sphere: SGD-G and Adam-G, fused, as their code does them.

Cho & Lee ("Riemannian approach to batch normalization", NeurIPS 2017, alg. 1 and 2) keep each
radially invariant group on the unit sphere: the Riemannian gradient with the orthogonality
penalty and its clipping, a momentum in the tangent space, the exponential map and the
parallel transport of the momentum along the geodesic. All per-group scalars of a step come
from one reduction pass over ``(g, m, x)``, then element-wise passes. SGD-G and Adam-G keep
their momentum as ``m + c x`` (one ``c`` per group), so that the step writes the new momentum
over the old one and then the new point from it and the point alone, with no copy of either
(see ``_geodesic_step``). The leaves off the sphere follow SGD with Nesterov momentum
(``ungrouped_learning_rate``, ``ungrouped_momentum``), as in the authors' code.

Zero-norm groups have no direction: the aliases leave them (and their moments) unchanged.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _base, _utils, geometry, registry
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.grouped import on_groups, resolution_of
from optax_sphere.groups import UNSET, Group, GroupsLike, group_dot

__all__ = ["sgdg", "adamg", "SgdgState", "AdamgState"]


class _Sums(NamedTuple):
    """The six per-group inner products of ``(g, m, x)`` (one reduction pass)."""

    gg: jax.Array
    gx: jax.Array
    xx: jax.Array
    mx: jax.Array
    mm: jax.Array
    mg: jax.Array


def _sums(group: Group, g: jax.Array, m: jax.Array, x: jax.Array) -> _Sums:
    dot = lambda a, b: group_dot(a, b, group)
    return _Sums(dot(g, g), dot(g, x), dot(x, x), dot(m, x), dot(m, m), dot(m, g))


def _orthogonality_gradient(x: jax.Array, group: Group, omega: float) -> jax.Array:
    """Gradient of Cho & Lee's regulariser ``(omega / 2) ||Y Y^T - I||_F^2`` with ``Y`` the
    matrix whose rows are the unit vectors of the groups of the leaf: ``2 omega (Y Y^T Y - Y)``.
    """
    group_axes = group.axes
    other = tuple(a for a in range(x.ndim) if a not in group_axes)
    perm = other + group_axes
    xt = jnp.transpose(x, perm)
    n = math.prod(x.shape[a] for a in other)
    y = xt.reshape(n, -1)
    y = geometry.safe_div(y, jnp.sqrt(jnp.sum(y * y, axis=1, keepdims=True)))
    grad = 2 * omega * ((y @ y.T) @ y - y)
    return jnp.transpose(grad.reshape(xt.shape), tuple(perm.index(i) for i in range(x.ndim)))


def _check_ungrouped(learning_rate, momentum) -> None:
    if learning_rate is not None:
        _utils.check_rate("ungrouped_learning_rate", learning_rate)
    _utils.check_beta("ungrouped_momentum", momentum)


def _check_sphere_args(learning_rate, grad_clip, omega) -> None:
    _utils.check_rate("learning_rate", learning_rate)
    if grad_clip is not None and not _utils.is_traced(grad_clip) and not grad_clip > 0:
        raise ValueError(f"`grad_clip` must be > 0 or None, got {grad_clip!r}.")
    _utils.check_rate("omega", omega)


#: Cho & Lee normalise every vector as ``v / (||v|| + 1e-8)`` (``gutils.unit``): the point
#: ``y = unit(x)``, the direction of the exponential map and of the parallel transport.
UNIT_EPS = 1e-8


def _riemannian_grad_sums(group, g, stored, c, x, grad_clip, omega):
    """``g`` with the regulariser, the six sums (of the momentum ``m = stored - c x``),
    ``1 / (r + 1e-8)``, ``<g,y>`` (``y`` the point ``x / (r + 1e-8)`` of Cho & Lee's code)
    and the clip factor ``k`` such that the clipped tangent gradient is
    ``h = k (g - <g,y> y)``."""
    if _utils.is_traced(omega) or omega != 0:
        g = g + _orthogonality_gradient(x, group, omega)
    s = _momentum_sums(_sums(group, g, stored, x), c)
    inv_r = jnp.where(s.xx > 0, 1.0 / (jnp.sqrt(s.xx) + UNIT_EPS), 0.0)
    gu = s.gx * inv_r
    # ||g - <g,y> y||^2, with ||y||^2 = xx / (r + eps)^2 just below 1
    hh = jnp.maximum(s.gg - gu * gu * (2 - s.xx * inv_r * inv_r), 0)
    if grad_clip is None:
        k = jnp.ones_like(hh)
    else:
        k = jnp.minimum(1.0, geometry.safe_div(grad_clip, jnp.sqrt(hh)))
        k = jnp.where(hh > 0, k, 1.0)
    return g, s, inv_r, gu, hh, k


def _per_group(coefs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Per-group coefficients computed once, not once per element.

    XLA fuses cheap-looking producers of a broadcast into the element-wise loop that
    consumes them, so ``cos``/``sin`` of a per-group angle would be evaluated for every
    element (10x the step time on CPU). A reduction is never fused into its consumer: adding
    a zero slice through one keeps the values and makes XLA materialise them.
    """
    stacked = jnp.stack(jnp.broadcast_arrays(*coefs))
    stacked = jnp.sum(jnp.stack([stacked, jnp.zeros_like(stacked)]), axis=0)
    return tuple(stacked[i] for i in range(len(coefs)))


def _momentum_sums(s: _Sums, c: jax.Array) -> _Sums:
    """The sums of the momentum ``m = S - c x`` from those of its stored form ``S``."""
    return s._replace(
        mx=s.mx - c * s.xx,
        mm=s.mm - 2 * c * s.mx + c * c * s.xx,
        mg=s.mg - c * s.gx,
    )


def _geodesic_step(
    g, stored, c, x, s, inv_r, a_m, a_g, a_x, norm, angle, sign, eps_dir, self_transport, in_place
):  # fmt: skip
    """One exponential-map step and the exact parallel transport of the direction.

    The momentum is kept as ``S = m + c x`` (``c``: one scalar per group), so that the step
    writes the new momentum over the old one and then the new point from it and the point
    alone: no value is read after it is overwritten, and XLA copies no donated buffer.

    The direction is ``D = a_m m + a_g g + a_x x`` (tangent at ``u = x / r``, norm ``norm``);
    the point ``y = x / (r + 1e-8)`` moves along ``sign * D / (norm + eps_dir)`` by ``angle``
    (``eps_dir``: Cho & Lee's ``1e-8`` in the units of ``D``):
    ``y' = y cos(angle) + f D`` with ``f = sign sin(angle) / (norm + eps_dir)``. The direction
    is moved by their parallel transports with ``rho = norm / (norm + eps_dir)``: along itself
    (``gpt2``, ``self_transport``), ``Gamma(D) = rho D cos(angle) - sign norm sin(angle) y``;
    or as another vector (``gpt``), ``Gamma(D) = D (1 - rho^2 (1 - cos(angle))) - sign norm
    rho sin(angle) y``; both are ``D cos - sign norm sin y`` without the eps.

    Both lie in the plane of ``y`` and ``D``: ``Gamma(D) = d D + e y``. The new stored form
    is ``S' = Gamma(D) + c' y'`` with ``c' = sign t (norm + eps_dir)``, ``t = tan(angle / 2)``
    (0 past two thirds of a half turn), so ``S' = K D + (e + c' cos) y`` with
    ``K = d + t sin(angle)``: 1 without the eps, at least ``rho`` up to two thirds of a half
    turn and at most ``-rho / 2`` past it (where ``rho`` is 1 to within ``1e-7``: an angle
    that large needs ``norm >> eps_dir``). ``D`` is recovered from ``S'`` and ``y`` dividing
    by ``K``, and ``y' = y cos + f D`` takes ``f / K`` (at most ``2 angle / norm``), so this
    order is as well conditioned as the plain one at every angle (recovering ``D`` from
    ``Gamma(D)`` alone would divide by ``cos``).

    ``in_place=False`` (parameters below the accumulation dtype, whose rounding would enter
    ``m = S - c x``): ``c' = 0`` and both outputs from ``(x, m, g)``, as two element-wise
    combinations. The per-group coefficients are materialised first (:func:`_per_group`).
    Zero-norm groups: no step, ``m`` kept (``c' = 0``).

    Returns:
      The update of the point, the new ``S`` and the new ``c``.
    """
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    ok = s.xx > 0
    f = sign * geometry.safe_div(sin, norm + eps_dir)  # D coefficient of the new point
    rho = geometry.safe_div(norm, norm + eps_dir)
    if self_transport:
        d_coef, y_coef = rho * cos, -sign * norm * sin
    else:
        d_coef, y_coef = 1 - rho * rho * (1 - cos), -sign * norm * rho * sin
    zero = jnp.zeros_like(cos)
    # in terms of the stored S: m = S - c x
    a_x = a_x - a_m * c
    if in_place:
        t = jnp.where(cos >= -0.5, sin / jnp.maximum(1 + cos, 0.5), zero)
        c_new = jnp.where(ok, sign * t * (norm + eps_dir), zero)
        k = d_coef + t * sin
        e_new = y_coef + c_new * cos
    else:
        c_new, k, e_new = zero, d_coef, y_coef
    store_coefs = (  # S' = K D + e' y
        jnp.where(ok, k * a_m, 1),
        jnp.where(ok, k * a_g, zero),
        jnp.where(ok, k * a_x + e_new * inv_r, -c),
    )
    if in_place:
        q = geometry.safe_div(f, k)  # y' = (cos - q e') y + q S'
        coefs = _per_group(store_coefs + (jnp.where(ok, (cos - q * e_new) * inv_r - 1, zero),
                                          jnp.where(ok, q, zero)))  # fmt: skip
        sm, sg, sx, ux, us = coefs
        stored = sm * stored + sg * g + sx * x
        return ux * x + us * stored, stored, c_new
    step_coefs = (
        jnp.where(ok, f * a_m, zero),
        jnp.where(ok, f * a_g, zero),
        jnp.where(ok, inv_r * cos - 1 + f * a_x, zero),
    )
    sm, sg, sx, um, ug, ux = _per_group(store_coefs + step_coefs)
    return um * stored + ug * g + ux * x, sm * stored + sg * g + sx * x, c_new


def _tangent_momentum(stored: Any, offset: Any, params: Any) -> Any:
    """``stored - offset * params`` on the grouped leaves, ``stored`` elsewhere."""
    return jax.tree.map(
        lambda c, s, x: s if isinstance(c, optax.MaskedNode) else s - c * x.astype(s.dtype),
        offset,
        stored,
        params,
        is_leaf=lambda v: isinstance(v, optax.MaskedNode),
    )


class SgdgState(NamedTuple):
    """State of :func:`sgdg`: step count, ``momentum`` and ``momentum_offset``.

    On grouped leaves the momentum is Cho & Lee's tangent buffer without the learning rate,
    ``B = M / eta``, kept as ``momentum = B + momentum_offset * params`` (one offset per
    group), the form the step writes in place; read ``B`` with :meth:`tangent_momentum`.
    The leaves off the sphere hold ``optax.sgd``'s trace in the ``"ungrouped"`` part of the
    ``optax.PartitionState`` of :func:`~optax_sphere.on_groups`.
    """

    count: jax.Array  # shape=(), dtype=jnp.int32
    momentum: optax.Updates  # like the grouped leaves: m + momentum_offset * x
    momentum_offset: optax.Updates  # per group (keepdims)

    def tangent_momentum(self, params: optax.Params) -> optax.Updates:
        """The momentum ``B`` of every leaf, tangent at ``params`` on the grouped ones."""
        return _tangent_momentum(self.momentum, self.momentum_offset, params)


def sgdg(
    learning_rate: optax.ScalarOrSchedule = 0.2,
    momentum: float = 0.9,
    *,
    grad_clip: float | None = None,
    omega: float = 0.0,
    ungrouped_learning_rate: optax.ScalarOrSchedule | None = None,
    ungrouped_momentum: float = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    rate_per: str = "unit",
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD-G of Cho & Lee (2017, alg. 1), as their code does it, per group:

    .. math::
        u = x/\|x\|,\quad h = \mathrm{clip}(g - \langle g,u\rangle u),\quad
        B \leftarrow \mu B - h,\quad
        x \leftarrow u\cos(\eta_k\|B\|) + \frac{B}{\|B\|}\sin(\eta_k\|B\|),\quad
        B \leftarrow \Gamma(B)

    with ``clip`` the per-group clipping to norm ``grad_clip`` (None: off) and :math:`\Gamma`
    the exact parallel transport along the geodesic just followed. Cho & Lee keep the
    learning rate inside the buffer (``M = eta B``); the buffer here is ``B``, as
    ``optax.sgd``'s trace, so that a learning-rate schedule (or ``inject_hyperparams``) scales
    the step being taken, as in optax: both are the same for a constant learning rate. The
    groups live on the
    unit sphere from the first step on. ``omega > 0`` adds the gradient of the orthogonality
    regulariser ``(omega/2) ||Y Y^T - I||^2`` (``Y``: rows = unit vectors of the groups of a
    leaf) before the projection. Ungrouped leaves (biases, norm scales, a classifier head) get
    what Cho & Lee give the weights off the sphere (sec. 5): SGD with Nesterov momentum,
    ``optax.sgd(ungrouped_learning_rate, ungrouped_momentum, nesterov=True)``, at
    ``learning_rate`` unless ``ungrouped_learning_rate`` is given (Cho & Lee give it 0.01 for
    a sphere learning rate of 0.2).
    Every normalisation is Cho & Lee's ``v / (||v|| + 1e-8)`` (``gutils.unit``: the point,
    the direction of the exponential map and of the transport), so that the trajectories of
    their code are reproduced to rounding in float64. Equal, up to that ``1e-8``, for a
    constant learning rate, no clipping and unit-norm groups, to
    ``transport_momentum(chain(project_tangent(), optax.sgd(lr, momentum),
    retract_to_sphere("exp")), exact=True)`` on the groups.

    The rate is one unit's (``rate_per="unit"``): a group of ``k`` units
    (:attr:`~optax_sphere.Group.units`: a LayerNorm layer's kernel found per tensor holds all
    its units) takes :math:`\eta_k / k`. On a unit-norm group of ``k`` units the tangent
    gradient is about ``k`` times a unit's (``sqrt(k)`` times as large per unit, over
    ``sqrt(k)`` times as many units), so one rate turns every group by about the same angle per
    step whatever its size (``docs/recipes.md``); on Cho & Lee's groups, one per unit, it is
    their rate.

    Args:
      learning_rate: the sphere's learning rate (a number or an ``optax`` schedule), one
        unit's: Cho & Lee's 0.2 by default.
      momentum: the momentum coefficient, transported along the geodesic.
      grad_clip: clip the norm of each group's tangent gradient to it (``None``: off).
      omega: weight of Cho & Lee's orthogonality regulariser (0: off).
      weight_decay: coupled L2 of the leaves off the sphere, before their SGD (on the sphere
        an L2 term is radial, and the Riemannian gradient drops it).
      mask: the leaves off the sphere that get the L2 term, as ``optax.adamw``'s ``mask``.
      ungrouped_learning_rate, ungrouped_momentum: SGD with Nesterov momentum for the leaves
        off the sphere (Cho & Lee's treatment of the other parameters). ``None``: the
        ``learning_rate`` given, so that with nothing grouped the optimizer is
        ``optax.sgd(learning_rate, ungrouped_momentum, nesterov=True)``. Cho & Lee use 0.2 on
        the sphere and 0.01 off it: ``sgdg(0.2, ungrouped_learning_rate=0.01)``.
      rate_per: ``"unit"`` (a group of ``k`` units takes ``learning_rate / k``; ``init``
        warns, naming them, where the units of a group are not known) or ``"group"`` (every
        group at ``learning_rate``, alg. 1's formula on any group).
      groups: the groups kept on the sphere.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.sgdg(0.2, 0.9, groups={"w": "unit", "b": None})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'w']

    References:
      Cho and Lee, "Riemannian approach to batch normalization", NeurIPS 2017 (SGD-G).
    """
    _check_sphere_args(learning_rate, grad_clip, omega)
    _utils.check_beta("momentum", momentum)
    _check_ungrouped(ungrouped_learning_rate, ungrouped_momentum)
    _utils.check_rate_per(rate_per)
    _utils.check_rate("weight_decay", weight_decay)
    resolution = resolution_of(groups)

    def init_leaf(group, p):
        return _utils.zeros_acc(p), _utils.group_zero(group, p)

    def on_init(grp, params):
        _utils.warn_unknown_units("sgdg", rate_per, grp, params, stacklevel=7)

    def update_leaf(lr, group, g, m, c, x):
        acc = accumulation_dtype(jnp.result_type(g, x))
        g, x32 = g.astype(acc), x.astype(acc)
        lr = _utils.group_rate(lr, group, rate_per)
        g, s, inv_r, gu, hh, k = _riemannian_grad_sums(group, g, m, c, x32, grad_clip, omega)
        # B' = mu B - k (g - <g,u> u); its norm from the sums
        mh = s.mg - gu * s.mx * inv_r
        mm = jnp.maximum(momentum**2 * s.mm - 2 * momentum * k * mh + k * k * hh, 0)
        norm = jnp.sqrt(mm)
        # B' = a_m B + a_g g + a_x x; the point moves by the angle lr ||B'||
        a_g = -k
        # Cho & Lee's buffer is lr B: its unit vector's eps is 1e-8 / lr in units of B
        step, stored, c = _geodesic_step(
            g, m, c, x32, s, inv_r, momentum, a_g, -a_g * gu * inv_r, norm, lr * norm, 1.0,
            geometry.safe_div(UNIT_EPS, jnp.asarray(lr, acc)), True, x.dtype == acc,
        )  # fmt: skip
        return step.astype(x.dtype), stored, c

    sphere = _utils.stateful_per_group(
        "sgdg",
        resolution,
        SgdgState,
        init_leaf,
        update_leaf,
        prepare=lambda count, params: _utils.value_at(learning_rate, count),
        on_init=on_init,
    )
    return on_groups(
        sphere,
        _off_sphere(learning_rate, ungrouped_learning_rate, ungrouped_momentum, weight_decay, mask),
        resolution,
    )


class AdamgState(NamedTuple):
    """State of :func:`adamg` on the grouped leaves: step count, first moment ``mu`` (shaped
    like them), second moment ``nu`` and ``mu_offset`` (one scalar per group each). The
    leaves off the sphere hold ``optax.sgd``'s trace in the ``"ungrouped"`` part of the
    ``optax.PartitionState`` of :func:`~optax_sphere.on_groups`.

    On grouped leaves the first moment ``m`` is kept as ``mu = m + mu_offset * params``, the
    form the step writes in place; read ``m`` with :meth:`tangent_momentum`.
    """

    count: jax.Array  # shape=(), dtype=jnp.int32
    mu: optax.Updates  # like the grouped leaves: m + mu_offset * x
    nu: optax.Updates  # per group (keepdims)
    mu_offset: optax.Updates  # per group (keepdims)

    def tangent_momentum(self, params: optax.Params) -> optax.Updates:
        """The first moment ``m`` of every leaf, tangent at ``params`` on the grouped ones."""
        return _tangent_momentum(self.mu, self.mu_offset, params)


def adamg(
    learning_rate: optax.ScalarOrSchedule = 0.05,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    *,
    grad_clip: float | None = None,
    omega: float = 0.0,
    ungrouped_learning_rate: optax.ScalarOrSchedule | None = None,
    ungrouped_momentum: float = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam-G of Cho & Lee (2017, alg. 2), as their code does it, per group:

    .. math::
        h = \mathrm{clip}(g - \langle g,u\rangle u),\quad m \leftarrow b_1 m + (1-b_1) h,\quad
        v \leftarrow b_2 v + (1-b_2)\|h\|^2,\\
        \Delta = -\eta_k \frac{\sqrt{1-b_2^k}}{1-b_1^k} \frac{m}{\sqrt{v + \epsilon}},\quad
        x \leftarrow u\cos\|\Delta\| + \frac{\Delta}{\|\Delta\|}\sin\|\Delta\|,\quad
        m \leftarrow \Gamma(m)

    ``v`` is one scalar per group, a sum of squares (not a mean), with ``eps`` inside the
    root; :math:`\Gamma` is the exact parallel transport along the geodesic followed.
    ``grad_clip``, ``omega`` and the ungrouped leaves (SGD with Nesterov momentum at
    ``ungrouped_learning_rate``, by default ``learning_rate``, Cho & Lee sec. 5) as in
    :func:`sgdg`; ``nu`` holds nothing for them.

    Args:
      learning_rate: the sphere's learning rate (a number or an ``optax`` schedule).
      b1, b2: decays of the first moment and of the per-group scalar second moment.
      eps: inside the root of the second moment, as Cho & Lee's code.
      grad_clip, omega, ungrouped_learning_rate, ungrouped_momentum, weight_decay, mask: as
        :func:`sgdg`.
      groups: the groups kept on the sphere.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.adamg(0.05, groups={"w": "unit", "b": None})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'w']

    References:
      Cho and Lee, "Riemannian approach to batch normalization", NeurIPS 2017 (Adam-G).
    """
    _check_sphere_args(learning_rate, grad_clip, omega)
    _utils.check_beta("b1", b1)
    _utils.check_beta("b2", b2)
    _utils.check_rate("eps", eps)
    _check_ungrouped(ungrouped_learning_rate, ungrouped_momentum)
    _utils.check_rate("weight_decay", weight_decay)
    resolution = resolution_of(groups)

    def init_leaf(group, p):
        return _utils.zeros_acc(p), _utils.group_zero(group, p), _utils.group_zero(group, p)

    def prepare(count, params):
        return _utils.value_at(learning_rate, count), optax.safe_increment(count)

    def update_leaf(context, group, g, m, v, c, x):
        lr, count = context
        acc = accumulation_dtype(jnp.result_type(g, x))
        g, x32 = g.astype(acc), x.astype(acc)
        bc1, bc2 = _base.bias_corrections(b1, b2, count, acc)
        g, s, inv_r, gu, hh, k = _riemannian_grad_sums(group, g, m, c, x32, grad_clip, omega)
        mh = s.mg - gu * s.mx * inv_r
        mm = jnp.maximum(b1**2 * s.mm + 2 * b1 * (1 - b1) * k * mh + ((1 - b1) * k) ** 2 * hh, 0)
        v_new = b2 * v + (1 - b2) * k * k * hh
        norm = jnp.sqrt(mm)
        scale = lr * jnp.sqrt(bc2) / bc1 / jnp.sqrt(v_new + eps)  # step = -scale m'
        angle = scale * norm
        # m' = a_m m + a_g g + a_x x
        a_g = (1 - b1) * k
        step, stored, c = _geodesic_step(
            g, m, c, x32, s, inv_r, b1, a_g, -a_g * gu * inv_r, norm, angle, -1.0,
            geometry.safe_div(UNIT_EPS, scale), False, x.dtype == acc,
        )  # fmt: skip
        return step.astype(x.dtype), stored, jnp.where(s.xx > 0, v_new, v), c

    sphere = _utils.stateful_per_group(
        "adamg", resolution, AdamgState, init_leaf, update_leaf, prepare=prepare
    )
    return on_groups(
        sphere,
        _off_sphere(learning_rate, ungrouped_learning_rate, ungrouped_momentum, weight_decay, mask),
        resolution,
    )


def _off_sphere(
    learning_rate: Any, ungrouped_learning_rate: Any, momentum: float, weight_decay: Any, mask: Any
) -> optax.GradientTransformation:
    """The leaves off the sphere: SGD with Nesterov momentum (Cho & Lee's code), after
    coupled L2 on those ``mask`` selects (registry's ``"sgdm"``)."""
    rate = learning_rate if ungrouped_learning_rate is None else ungrouped_learning_rate
    return registry.BASES["sgdm"](
        rate, momentum, nesterov=True, weight_decay=weight_decay, mask=_utils.view_mask(mask)
    )
