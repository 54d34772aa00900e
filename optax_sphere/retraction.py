"""Optimisation on the sphere itself: retraction, and the optimizers that stay on the sphere.

A radially invariant group only matters through ``u = x / ||x||``, so one may optimise ``u``
directly on the unit sphere (Cho & Lee, "Riemannian approach to batch normalization", NeurIPS
2017; Roburin's thesis sec. 3.4.2). The pieces:

* :func:`project_tangent`: the Riemannian gradient of the sphere, ``g - <g, u> u``;
* :func:`retract_to_sphere`: the last link of a chain, which maps ``x + Delta`` back onto the
  sphere, by projection ``x_hat / ||x_hat||`` or by the exponential map;
* exact parallel transport of a momentum: ``transport_momentum(..., exact=True)``;
* the aliases :func:`sgdg`, :func:`adamg` (Cho & Lee, as their code does it) and
  :func:`adagradg` (Roburin's thesis sec. 3.4.2, AdamG* of Roburin et al. sec. 3.2), fused: all
  per-group scalars of a step come from one reduction pass over ``(g, m, x)``, then element-wise
  passes. SGD-G and Adam-G keep their momentum as ``m + c x`` (one ``c`` per group), so that
  the step writes the new momentum over the old one and then the new point from it and the
  point alone, with no copy of either (see ``_geodesic_step``).

Zero-norm groups have no direction: the aliases leave them (and their moments) unchanged.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _base, _utils, geometry
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere._paths import path_str
from optax_sphere.groups import Group, GroupsLike, group_dot, resolve_groups

__all__ = [
    "project_tangent",
    "retract_to_sphere",
    "sgdg",
    "adamg",
    "adagradg",
    "SgdgState",
    "AdamgState",
    "AdagradgState",
]

Method = Literal["projection", "exp"]


def project_tangent(groups: GroupsLike = "unset") -> optax.GradientTransformation:
    """Riemannian gradient of the sphere: ``g <- g - <g, u> u`` per group, ``u = x / ||x||``.

    Stateless; needs ``params``. Ungrouped leaves pass through.

    Args:
      groups: the groups (see :func:`resolve_groups`).

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.project_tangent(groups={"w": "unit", "b": None})
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> float(jnp.abs(jnp.sum(updates["w"] * params["w"], axis=0)).max())  # tangent
      0.0

    References:
      Cho and Lee, "Riemannian approach to batch normalization", NeurIPS 2017, sec. 3.
    """
    return _utils.stateless_per_group(
        "project_tangent",
        groups,
        lambda group, g, x: geometry.tangent_part(g, x, group).astype(g.dtype),
    )


def retract_to_sphere(
    method: Method = "projection",
    *,
    radius: float = 1.0,
    groups: GroupsLike = "unset",
) -> optax.GradientTransformation:
    r"""Retraction onto the sphere of radius ``radius``: put it last in a chain.

    With ``x`` the params and ``Delta`` the incoming (final) update, per group:

    * ``"projection"`` (Roburin's thesis sec. 3.4.2): ``x' = radius * (x + Delta) / ||x + Delta||``;
    * ``"exp"`` (Cho & Lee 2017): the exponential map of the sphere from ``u = x / ||x||``
      along the tangent part of ``Delta`` measured in angle, ``v = Delta_perp / ||x||``:
      ``x' = radius (u cos|v| + (v/|v|) sin|v|)``. The radial part of ``Delta`` is dropped.

    Returns the update ``x' - x``. Both agree to first order in ``|v|``. Ungrouped leaves pass
    through. To move a momentum along with the point, wrap the whole chain in
    ``transport_momentum(..., exact=True)`` (exact parallel transport on the sphere).

    Args:
      method: ``"projection"`` or ``"exp"``.
      radius: the radius of the sphere.
      groups: the groups kept on the sphere.

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((4, 2)) / 2, "b": jnp.zeros(2)}
      >>> tx = optax.chain(
      ...     optax.sgd(0.1), optax_sphere.retract_to_sphere(groups={"w": "unit", "b": None})
      ... )
      >>> grads = {"w": jnp.arange(8.0).reshape(4, 2), "b": jnp.ones(2)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)
      >>> jnp.linalg.norm(new["w"], axis=0).round(6).tolist()
      [1.0, 1.0]

    References:
      Roburin, PhD thesis, sec. 3.4.2 (projection); Cho and Lee, NeurIPS 2017, eq. 9 (exp).
    """
    if method not in ("projection", "exp"):
        raise ValueError(f"`method` must be 'projection' or 'exp', got {method!r}.")
    if not radius > 0:
        raise ValueError(f"`radius` must be > 0, got {radius!r}.")

    def leaf(group, delta, x):
        acc = accumulation_dtype(jnp.result_type(delta, x))
        d, x32 = delta.astype(acc), x.astype(acc)
        if method == "projection":
            new = geometry.project_to_sphere(x32 + d, group, radius)
        else:
            r = jnp.sqrt(group_dot(x32, x32, group))
            u = geometry.safe_div(x32, r)
            v = geometry.safe_div(geometry.tangent_part(d, x32, group), r)
            new = radius * geometry.exp_map(u, v, group)
        return (new - x32).astype(delta.dtype)

    return _utils.stateless_per_group("retract_to_sphere", groups, leaf)


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


def _traced(value: Any) -> bool:
    """True for a hyperparameter traced by ``optax.inject_hyperparams`` (known at run time)."""
    return isinstance(value, jax.core.Tracer)


def _check_ungrouped(learning_rate, momentum) -> None:
    if learning_rate is not None:
        _utils.check_rate("ungrouped_learning_rate", learning_rate)
    _utils.check_beta("ungrouped_momentum", momentum)


class _PaperDefault(float):
    """A default hyperparameter that knows it was not given, so that ``init`` can say what it
    assumes (a plain float everywhere else, ``optax.inject_hyperparams`` included)."""


#: SGD-G's default learning rate: Cho & Lee's, for one group per filter or unit
SGDG_LEARNING_RATE = _PaperDefault(0.2)


def _warn_default_rate_on_tensor_groups(grp: Any, params: Any) -> None:
    """Warns when SGD-G's default rate meets groups that span a whole tensor of ndim >= 2."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    whole = [
        f"'{path_str(path)}' {tuple(p.shape)}"
        for (path, p), group in zip(flat, treedef.flatten_up_to(grp))
        if isinstance(group, Group) and p.ndim >= 2 and len(group.axes) == p.ndim
    ]
    if whole:
        warnings.warn(
            f"sgdg: the default learning_rate={float(SGDG_LEARNING_RATE)} is Cho & Lee's for one "
            f"group per filter or unit, but {', '.join(whole)} are grouped per tensor: the "
            "tangent gradient of a unit-norm tensor is larger than a unit's (by about the "
            "square root of its number of units), so 0.2 turns these groups too far per step "
            "and can diverge. Pass learning_rate= explicitly (smaller) for per-tensor groups.",
            stacklevel=3,
        )


def _check_sphere_args(learning_rate, grad_clip, omega) -> None:
    _utils.check_rate("learning_rate", learning_rate)
    if grad_clip is not None and not _traced(grad_clip) and not grad_clip > 0:
        raise ValueError(f"`grad_clip` must be > 0 or None, got {grad_clip!r}.")
    _utils.check_rate("omega", omega)


#: ``optax.adagrad``'s default ``eps`` (inside the root), for the leaves off the sphere.
_ADAGRAD_EPS = 1e-7

#: Cho & Lee normalise every vector as ``v / (||v|| + 1e-8)`` (``gutils.unit``): the point
#: ``y = unit(x)``, the direction of the exponential map and of the parallel transport.
UNIT_EPS = 1e-8


def _riemannian_grad_sums(group, g, stored, c, x, grad_clip, omega):
    """``g`` with the regulariser, the six sums (of the momentum ``m = stored - c x``),
    ``1 / (r + 1e-8)``, ``<g,y>`` (``y`` the point ``x / (r + 1e-8)`` of Cho & Lee's code)
    and the clip factor ``k`` such that the clipped tangent gradient is
    ``h = k (g - <g,y> y)``."""
    if _traced(omega) or omega != 0:
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
    Other leaves: SGD's trace, and no offset (``optax.MaskedNode()``).
    """

    count: jax.Array
    momentum: Any
    momentum_offset: Any

    def tangent_momentum(self, params: optax.Params) -> optax.Updates:
        """The momentum ``B`` of every leaf, tangent at ``params`` on the grouped ones."""
        return _tangent_momentum(self.momentum, self.momentum_offset, params)


def sgdg(
    learning_rate: optax.ScalarOrSchedule = SGDG_LEARNING_RATE,
    momentum: float = 0.9,
    *,
    grad_clip: float | None = None,
    omega: float = 0.0,
    ungrouped_learning_rate: optax.ScalarOrSchedule | None = None,
    ungrouped_momentum: float = 0.9,
    groups: GroupsLike = "unset",
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

    Args:
      learning_rate: the sphere's learning rate (a number or an ``optax`` schedule). The
        default, Cho & Lee's 0.2, is for one group per filter or unit: ``init`` warns when
        it meets groups that span a whole tensor, which it turns too far per step.
      momentum: the momentum coefficient, transported along the geodesic.
      grad_clip: clip the norm of each group's tangent gradient to it (``None``: off).
      omega: weight of Cho & Lee's orthogonality regulariser (0: off).
      ungrouped_learning_rate, ungrouped_momentum: SGD with Nesterov momentum for the leaves
        off the sphere (Cho & Lee's treatment of the other parameters). ``None``: the
        ``learning_rate`` given, so that with nothing grouped the optimizer is
        ``optax.sgd(learning_rate, ungrouped_momentum, nesterov=True)``. Cho & Lee use 0.2 on
        the sphere and 0.01 off it: ``sgdg(0.2, ungrouped_learning_rate=0.01)``.
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
    off_sphere_rate = learning_rate if ungrouped_learning_rate is None else ungrouped_learning_rate

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolve_groups(groups, params)
        if isinstance(learning_rate, _PaperDefault):
            _warn_default_rate_on_tensor_groups(grp, params)
        return SgdgState(
            jnp.zeros([], jnp.int32),
            jax.tree.map(_utils.zeros_acc, params),
            _utils.group_zeros(grp, params),
        )

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = _utils.require_params(params, "sgdg")
        grp = resolve_groups(groups, params)
        lr = _utils.value_at(learning_rate, state.count)
        ulr = _utils.value_at(off_sphere_rate, state.count)

        def leaf(group, g, m, c, x):
            acc = accumulation_dtype(jnp.result_type(g, x))
            g, x32 = g.astype(acc), x.astype(acc)
            if group is None:
                # off the sphere: SGD with Nesterov momentum (Cho & Lee), optax.sgd's
                direction, m = _base.momentum(g, m, ungrouped_momentum, nesterov=True)
                step = -ulr * direction
                return step.astype(x.dtype), m, c
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

        out = _utils.map_groups(leaf, grp, updates, state.momentum, state.momentum_offset, params)
        new_updates, mom, offset = _utils.unzip(out, updates, 3)
        return new_updates, SgdgState(optax.safe_increment(state.count), mom, offset)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AdamgState(NamedTuple):
    """State of :func:`adamg`: step count, first moment ``mu`` (shaped like the params),
    second moment ``nu`` and ``mu_offset`` (one scalar per group each on grouped leaves;
    ``optax.MaskedNode()`` elsewhere, whose ``mu`` is SGD's trace).

    On grouped leaves the first moment ``m`` is kept as ``mu = m + mu_offset * params``, the
    form the step writes in place; read ``m`` with :meth:`tangent_momentum`.
    """

    count: jax.Array
    mu: Any
    nu: Any
    mu_offset: Any

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
    groups: GroupsLike = "unset",
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
      grad_clip, omega, ungrouped_learning_rate, ungrouped_momentum: as :func:`sgdg`.
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
    off_sphere_rate = learning_rate if ungrouped_learning_rate is None else ungrouped_learning_rate

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolve_groups(groups, params)
        mu = jax.tree.map(_utils.zeros_acc, params)
        return AdamgState(
            jnp.zeros([], jnp.int32),
            mu,
            _utils.group_zeros(grp, params),
            _utils.group_zeros(grp, params),
        )

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = _utils.require_params(params, "adamg")
        grp = resolve_groups(groups, params)
        lr = _utils.value_at(learning_rate, state.count)
        ulr = _utils.value_at(off_sphere_rate, state.count)
        count = optax.safe_increment(state.count)

        def leaf(group, g, m, v, c, x):
            acc = accumulation_dtype(jnp.result_type(g, x))
            g, x32 = g.astype(acc), x.astype(acc)
            if group is None:
                # off the sphere: SGD with Nesterov momentum (Cho & Lee), optax.sgd's
                direction, m = _base.momentum(g, m, ungrouped_momentum, nesterov=True)
                step = -ulr * direction
                return step.astype(x.dtype), m, v, c
            bc1, bc2 = _utils.bias_corrections(b1, b2, count, acc)
            g, s, inv_r, gu, hh, k = _riemannian_grad_sums(group, g, m, c, x32, grad_clip, omega)
            mh = s.mg - gu * s.mx * inv_r
            mm = jnp.maximum(
                b1**2 * s.mm + 2 * b1 * (1 - b1) * k * mh + ((1 - b1) * k) ** 2 * hh, 0
            )
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

        out = _utils.map_groups(leaf, grp, updates, state.mu, state.nu, state.mu_offset, params)
        new_updates, mu, nu, offset = _utils.unzip(out, updates, 4)
        return new_updates, AdamgState(count, mu, nu, offset)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AdagradgState(NamedTuple):
    """State of :func:`adagradg`: step count and the second moment ``nu`` (one scalar per
    group on grouped leaves, element-wise elsewhere)."""

    count: jax.Array
    nu: Any


def adagradg(
    learning_rate: optax.ScalarOrSchedule = 0.7,
    decay: float = 1.0,
    v0: Any = 1.0,
    *,
    groups: GroupsLike = "unset",
) -> optax.GradientTransformation:
    r"""AdaGradG (Roburin's thesis sec. 3.4.2; AdamG* of Roburin et al. sec. 3.2), per group:

    .. math::
        \hat x_{k+1} = x_k - \eta_k \frac{\nabla L(x_k)}{\sqrt{v_k}},\quad
        x_{k+1} = \frac{\hat x_{k+1}}{\|\hat x_{k+1}\|},\quad
        v_{k+1} = \beta v_k + \|\nabla L(x_k)\|^2

    Adam without momentum (``b1 = 0``), without bias correction, with the second moment of the
    *previous* step and an initial ``v_0 > 0``, constrained to the unit sphere by projection.
    Theorem 4 (Roburin et al.; Roburin's thesis): SGD with L2 started from ``r_0 u_0`` follows, to
    second order in the step, AdaGradG started from ``u_0`` with the hyperparameters of
    :func:`optax_sphere.theory.sgd_to_adagradg`. ``decay`` (:math:`\beta`) is in ``(0, 1]`` (1: no
    decay, as AdaGrad). ``v0`` is a number or a pytree like the params whose leaves broadcast to the
    per-group scalar shape (a per-group ``v_0``, as Theorem 4 gives for groups of different radii).
    Ungrouped leaves get ``optax.adagrad``'s step (the accumulator of the current step, ``eps =
    1e-7`` inside the root; started at ``v_0``, decayed by ``decay``), so that no step there exceeds
    the learning rate.

    Args:
      learning_rate: the step (a number or an ``optax`` schedule).
      decay: decay of the per-group accumulator of squared tangent-gradient norms (1: AdaGrad).
      v0: the accumulator's initial value (a number, or per group).
      groups: the groups kept on the sphere; ungrouped leaves follow ``optax.adagrad``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.adagradg(0.7, groups={"w": "unit", "b": None})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'w']

    References:
      Roburin, de Mont-Marin, Bursuc, Marlet, Pérez and Aubry, "Spherical Perspective on
      Learning with Batch Norm", Theorem 4; Roburin, PhD thesis, sec. 3.4.2.
    """
    _utils.check_rate("learning_rate", learning_rate)
    if not _traced(decay) and not 0 < decay <= 1:
        raise ValueError(f"`decay` must be in (0, 1], got {decay!r}.")
    if not callable(v0) and not jax.tree.leaves(v0):
        raise ValueError("`v0` must be a number or a pytree of numbers/arrays.")
    if isinstance(v0, (int, float)) and not 0 < v0 < math.inf:
        raise ValueError(
            f"`v0` must be finite and > 0 (the first step divides by sqrt(v0)), got {v0!r}."
        )

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolve_groups(groups, params)
        single = jax.tree_util.treedef_is_leaf(jax.tree.structure(v0))
        v0_tree = jax.tree.map(lambda _: v0, params) if single else v0

        def leaf(group, p, v):
            shape = p.shape if group is None else group.scalar_shape(p.shape)
            # on zeros laid out like p (sharded parameters give a state sharded like them)
            zeros = _utils.zeros_acc(p, shape)
            return zeros + jnp.broadcast_to(jnp.asarray(v, zeros.dtype), shape)

        try:
            nu = _utils.map_groups(leaf, grp, params, v0_tree)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"adagradg: `v0` must be a number or a pytree like the params ({err})."
            ) from None
        return AdagradgState(jnp.zeros([], jnp.int32), nu)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = _utils.require_params(params, "adagradg")
        grp = resolve_groups(groups, params)
        lr = _utils.value_at(learning_rate, state.count)

        def leaf(group, g, v, x):
            acc = accumulation_dtype(jnp.result_type(g, x))
            g, x32 = g.astype(acc), x.astype(acc)
            if group is None:
                # optax.adagrad: the accumulator of this step, so that no step is longer than
                # the learning rate (the grouped recursion's previous-step accumulator is what
                # Theorem 4 needs, and the projection bounds it there)
                rss = optax.ScaleByRssState(sum_of_squares=decay * v)
                direction, rss = optax.scale_by_rss(eps=_ADAGRAD_EPS).update(g, rss)
                return (-lr * direction).astype(x.dtype), rss.sum_of_squares
            gg, gx, xx = (
                group_dot(g, g, group),
                group_dot(g, x32, group),
                group_dot(x32, x32, group),
            )
            c = lr / jnp.sqrt(v)
            new_sq = jnp.maximum(xx - 2 * c * gx + c * c * gg, 0)  # ||x_hat||^2
            x_hat = x32 - c * g
            step = geometry.safe_div(x_hat, jnp.sqrt(new_sq)) - x32
            # a zero group, or x_hat = 0, stays; a NaN (from a non-finite gradient) passes
            # on to the update and the state of its group, as documented
            ok = (xx > 0) & (new_sq != 0)
            return jnp.where(ok, step, 0).astype(x.dtype), jnp.where(ok, decay * v + gg, v)

        out = _utils.map_groups(leaf, grp, updates, state.nu, params)
        new_updates, nu = _utils.unzip(out, updates, 2)
        return new_updates, AdagradgState(optax.safe_increment(state.count), nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
