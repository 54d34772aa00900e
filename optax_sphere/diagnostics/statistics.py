"""The per-group statistics of one step, as pure jittable functions.

:func:`geometry_stats` computes the quantities of the :mod:`optax_sphere.diagnostics` module
docstring from the parameters before and after a step (any optimizer), and
:func:`adam_step_scale` reads the per-group step scale of optax's Adam from its state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _base, _utils, geometry
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.groups import (
    UNSET,
    Group,
    GroupsLike,
    group_dot,
    group_mean,
    group_sq_norm,
    is_masked_node,
    resolve_groups,
)

__all__ = ["GeometryStats", "geometry_stats", "adam_step_scale", "RADIAL_GRADIENT_THRESHOLD"]

PyTree = Any


#: ``radial_gradient`` above which a group is flagged as not radially invariant. Invariant
#: groups measure the rounding of the gradient and the ``eps`` of their normalisation (about
#: ``1e-6`` to ``1e-3``); a group whose scale the loss sees has a radial part of order
#: ``d^{-1/2}`` or more (``d`` its size).
RADIAL_GRADIENT_THRESHOLD = 1e-2


class GeometryStats(NamedTuple):
    """Per-group diagnostics of one step; each field is a tree shaped like the params.

    A grouped leaf of shape ``shape`` gets an array of the shape with the group axes removed
    (``(units,)`` for per-unit groups of a Dense/Conv kernel, ``()`` for a whole tensor);
    an ungrouped leaf gets ``None``. ``effective_lr`` and ``direction_norm`` are ``None``
    throughout when no step scale was given, ``radial_gradient`` when the gradients were not
    seen (:func:`monitor` sees the final updates; :func:`monitored` sees the gradients).
    Arrays are in the accumulation dtype (at least float32). See the module docstring for the
    definitions.
    """

    radius: PyTree
    angular_update: PyTree
    update_norm: PyTree
    radius_ratio: PyTree
    radial_term: PyTree
    taylor_term: PyTree
    effective_lr: PyTree
    direction_norm: PyTree
    radial_gradient: PyTree = None


def _leaf_stats(
    group: Group, x0: jax.Array, delta: jax.Array, scale: Any, grad: Any = None
) -> tuple:
    """All stats of one leaf from ``x_k`` and ``Delta``: two reduction passes (``<x,x>``,
    ``<x,Delta>``, ``<Delta,Delta>`` in one, ``||Delta_perp||^2`` in the other, so that the
    tangential part, hence tiny angles, keeps full relative precision), then scalar math;
    with the gradient ``grad``, its radial part ``|<g,x>| / (||g|| ||x||)`` last (``<x,x>``
    shared). Per-group results are squeezed over the group axes."""
    acc = accumulation_dtype(jnp.result_type(x0, delta))
    x0 = x0.astype(acc)
    # Delta = along x_k + Delta_perp
    xx, xd, dd, along, perp = geometry.step_parts(x0, delta, group)
    r = jnp.sqrt(xx)
    r_new = jnp.sqrt(jnp.maximum(xx + 2 * xd + dd, 0))
    cross = xx + xd  # <x_k, x_{k+1}> = r_k^2 (1 - A_k <c_k, u_k>)
    rise = r * perp  # r_k ||Delta_perp|| = r_k^2 A_k ||c_perp||
    out = [
        r,
        geometry.angle_of_step(xx, xd, perp),
        jnp.sqrt(dd),
        geometry.safe_div(r_new, r),
        -along,
        geometry.safe_div(rise, cross),
    ]
    if scale is not None:
        scale = jnp.asarray(scale, acc)
        out += [geometry.safe_div(scale, cross), geometry.safe_div(rise, scale)]
    if grad is not None:
        grad = grad.astype(acc)
        gx, gg = group_dot(grad, x0, group), group_sq_norm(grad, group)
        out.append(geometry.safe_div(jnp.abs(gx), jnp.sqrt(gg * xx)))
    return tuple(jnp.squeeze(v, axis=group.axes) for v in out)


def stats_from_step(
    grp: PyTree, params: PyTree, deltas: PyTree, step_scale: Any, grads: PyTree = None
) -> GeometryStats:
    """Stats of the step ``params -> params + deltas``; ``step_scale`` None, a scalar, or a
    tree like the params (per-group keepdims arrays on grouped leaves); with ``grads``, also
    their radial part."""
    with_scale = step_scale is not None
    n = 8 if with_scale else 6
    if with_scale and _is_scalar(step_scale):
        step_scale = jax.tree.map(lambda _, s=step_scale: s, params)
    if not with_scale:
        step_scale = jax.tree.map(lambda _: None, params)
    with_grads = grads is not None
    if not with_grads:
        grads = jax.tree.map(lambda _: None, params)

    def leaf(group, x0, delta, scale, grad):
        if group is None:
            return None
        if with_scale and scale is None:
            raise ValueError("`step_scale` has no value for a grouped parameter.")
        return _leaf_stats(group, x0, delta, scale, grad)

    out = jax.tree.map(
        leaf,
        grp,
        params,
        deltas,
        step_scale,
        grads,
        is_leaf=lambda v: v is None or isinstance(v, Group),
    )
    field = lambda i: jax.tree.map(lambda _, t: None if t is None else t[i], params, out)
    fields = [field(i) for i in range(n)] + [None] * (8 - n)
    return GeometryStats(*fields, field(n) if with_grads else None)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (hasattr(value, "shape") and hasattr(value, "dtype"))


def geometry_stats(
    params_before: PyTree,
    params_after: PyTree,
    groups: GroupsLike = UNSET,
    *,
    step_scale: Any = None,
) -> GeometryStats:
    """Per-group diagnostics of the step ``params_before -> params_after`` (any optimizer).

    Args:
      params_before, params_after: ``x_k`` and ``x_{k+1}`` (same tree structure).
      groups: the radially invariant groups (see :mod:`optax_sphere.groups`); the default,
        every optimizer's, groups nothing and warns at ``init``.
      step_scale: optional ``s_k = eta_k / (d^{-1/2} ||b_k||)`` of the generic scheme of
        Roburin et al. eqs. 3-4: a number (the learning rate of SGD / SGD with momentum), or a tree
        like the params with per-group ``keepdims`` arrays on grouped leaves (as returned by
        :func:`adam_step_scale`). Enables ``effective_lr`` and ``direction_norm``.

    Returns:
      :class:`GeometryStats`.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> grads = {"w": jnp.array([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
      >>> new = {"w": params["w"] - 0.1 * grads["w"]}
      >>> stats = optax_sphere.geometry_stats(params, new, {"w": "unit"}, step_scale=0.1)
      >>> stats.effective_lr["w"].shape  # one value per group
      (2,)

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eqs. 3-4 and 11-13
      (the effective learning rate and direction of the step on the sphere).
    """
    grp = resolve_groups(groups, params_before)
    deltas = jax.tree.map(
        lambda a, b: (
            b.astype(accumulation_dtype(jnp.result_type(a, b)))
            - a.astype(accumulation_dtype(jnp.result_type(a, b)))
        ),
        params_before,
        params_after,
    )
    return stats_from_step(grp, params_before, deltas, step_scale)


def adam_step_scale(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    groups: GroupsLike = UNSET,
) -> Callable[[Any, PyTree], PyTree]:
    r"""Step scale ``s_k = eta_k / (d^{-1/2} ||b_k||)`` of optax's Adam, for :func:`monitored`.

    Adam in the generic form of Roburin et al. eqs. 3-4 (eq. 9, with ``eps`` where optax puts it):
    :math:`a_k = m_k/(1-\beta_1)`, :math:`b_k = \frac{1-\beta_1^{k+1}}{1-\beta_1}
    (\sqrt{v_k/(1-\beta_2^{k+1}) + \epsilon_{root}} + \epsilon)`. Reads ``count`` and ``nu``
    from the (unique) ``ScaleByAdamState`` in the state after the step; the hyperparameters
    must be the optimizer's. Works for ``optax.adam``, Adam + L2
    (``chain(add_decayed_weights(wd), adam(...))``) and this library's
    :func:`~optax_sphere.adam_s`, :func:`~optax_sphere.adam_st`, :func:`~optax_sphere.adam_srt`
    (a scalar ``v`` per group, stored as used by the step); not for ``optax.adamw``, whose
    decoupled decay is not of the generic form.

    Args:
      learning_rate: the optimizer's learning rate (a number or a schedule).
      b1, b2, eps, eps_root: the optimizer's Adam hyperparameters.
      groups: the groups over which ``||b_k||`` is taken.

    Returns:
      A function ``(inner_state, params) -> s_k`` for :func:`monitored`'s ``step_scale``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> grads = {"w": jnp.array([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
      >>> tx = optax_sphere.monitored(
      ...     optax.adam(1e-3), {"w": "unit"},
      ...     step_scale=optax_sphere.adam_step_scale(1e-3, groups={"w": "unit"}),
      ... )
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> sorted(k for k in optax_sphere.metrics(state) if "effective_lr" in k)
      ['w/effective_lr/max', 'w/effective_lr/mean', 'w/effective_lr/min']

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eqs. 3-4 and 9.
    """

    def fn(inner_state: Any, params: PyTree) -> PyTree:
        found = _utils.find_states(inner_state, lambda s: {"count", "mu", "nu"} <= set(s._fields))
        treedef = jax.tree.structure(params)
        # one Adam state, or one per part of on_groups' partition, each holding the second
        # moment of its leaves (optax.MaskedNode() at the others'): each leaf reads its own
        moments = [treedef.flatten_up_to(s.nu) for s in found if _utils.fits(treedef, s.nu)]
        per_leaf = [
            [m[i] for m in moments if not is_masked_node(m[i])] for i in range(treedef.num_leaves)
        ]
        if not found or len(moments) != len(found) or any(len(n) > 1 for n in per_leaf):
            raise ValueError(
                f"adam_step_scale: expected one Adam state (fields count, mu, nu) in the "
                f"optimizer state, found {len(found)}."
            )
        grp = resolve_groups(groups, params)
        count = found[0].count  # k + 1 after the step

        def leaf(group, nu):
            acc = accumulation_dtype(nu.dtype)
            bc1, bc2 = _base.bias_corrections(b1, b2, count, acc)
            lr = _utils.value_at(learning_rate, count - 1)
            b = bc1 / (1 - b1) * (jnp.sqrt(nu.astype(acc) / bc2 + eps_root) + eps)
            return geometry.safe_div(jnp.asarray(lr, acc), jnp.sqrt(group_mean(b * b, group)))

        out = [
            None if group is None or not nu else leaf(group, nu[0])
            for group, nu in zip(treedef.flatten_up_to(grp), per_leaf)
        ]
        return treedef.unflatten(out)

    return fn
