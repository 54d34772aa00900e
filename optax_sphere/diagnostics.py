"""Seeing the geometry: per-group diagnostics of any optimizer step.

For every radially invariant group (Roburin et al. sec. 2; ``x = r u``, ``r = ||x||``) and one step
``x_k -> x_{k+1} = x_k + Delta``, the quantities of the papers, as one scalar per group:

* ``radius``: ``r_k``;
* ``angular_update``: ``angle(x_k, x_{k+1})`` (Kosson et al. eq. 5), in radians;
* ``update_norm``: ``||Delta||``; its root mean square over steps is the RMS update size
  ``eta_g`` of Kosson et al. eq. 4 (there ``Delta`` is the gradient part only; here it is the
  whole step, weight decay included);
* ``radius_ratio``: ``r_{k+1} / r_k`` (Roburin et al. eq. 13);
* ``radial_term``: ``A_k <c_k, u_k> = -<Delta, x_k> / r_k^2``, which app. C.1.2 of Roburin et al.
  tracks to check ``1 - A_k <c_k, u_k> > 0``;
* ``taylor_term``: ``eta_e ||c_perp||`` (Roburin et al. app. C.1.2, the argument of the Taylor
  expansion of theorem 2; ``= tan(angular_update)`` by eq. 37);
* ``effective_lr`` and ``direction_norm``: the effective learning rate ``eta_e`` and the norm
  of the effective direction ``||c_perp||`` of theorem 2 (eq. 11, table 1);
* ``radial_gradient``: ``|<g_k, x_k>| / (||g_k|| ||x_k||)``, the radial part of the gradient,
  which is 0 for a radially invariant group (Roburin et al. eq. 2: the gradient of a
  scale-invariant loss is orthogonal to the weights) and clearly not for a group that is
  wrongly declared invariant (a normalisation removed from the model, a wrong layout).
  :func:`metrics` adds ``<path>/radial_gradient/flagged``, the fraction of groups of a
  parameter above :data:`RADIAL_GRADIENT_THRESHOLD`, :meth:`History.flagged` lists them and
  :mod:`optax_sphere.plots` marks them.

The first six are geometric: they need only the parameters before and after the step, so they
work with any optimizer. The last two split ``eta_e ||c_perp||`` between the optimizer and the
direction, and need the optimizer to be of the generic form of Roburin et al. eqs. 3-4,
``x_{k+1} = x_k - eta_k a_k / b_k``, and its per-group *step scale*
``s_k = eta_k / (d^{-1/2} ||b_k||)``. Then ``A_k = s_k / r_k^2``,
``eta_e = s_k / <x_k, x_{k+1}>`` and ``||c_perp|| = r_k ||Delta_perp|| / s_k``. For SGD and
SGD with momentum (``b = 1``) the step scale is the learning rate; for optax's Adam,
:func:`adam_step_scale` reads it from the optimizer state.

Three ways to get them:

* :func:`geometry_stats`: a pure function of two parameter trees (any optimizer);
* :func:`monitor`: a transformation for the end of any ``optax.chain`` that records the stats
  of each step into its state (no host transfer inside ``update``);
* :func:`monitored`: a wrapper around a whole optimizer whose step scale is read from the
  optimizer state (Adam-like optimizers).

Outside ``jit``, :func:`metrics` turns a state into a flat ``{"path/stat/reduction": value}``
dict for loggers and :class:`History` records a run for :mod:`optax_sphere.plots`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sphere import _utils, geometry
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere._paths import path_str
from optax_sphere.groups import (
    UNSET,
    Group,
    GroupsLike,
    group_dot,
    group_mean,
    group_sq_norm,
    resolve_groups,
)

__all__ = [
    "GeometryStats",
    "MonitorState",
    "MonitoredState",
    "History",
    "geometry_stats",
    "monitor",
    "monitored",
    "RADIAL_GRADIENT_THRESHOLD",
    "adam_step_scale",
    "find_monitor_state",
    "metrics",
]

PyTree = Any

#: ``radial_gradient`` above which a group is flagged as not radially invariant. Invariant
#: groups measure the rounding of the gradient and the ``eps`` of their normalisation (about
#: ``1e-6`` to ``1e-3``); a group whose scale the loss sees has a radial part of order
#: ``d^{-1/2}`` or more (``d`` its size).
RADIAL_GRADIENT_THRESHOLD = 1e-2

REDUCTIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "mean": jnp.mean,
    "min": jnp.min,
    "max": jnp.max,
}


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


class MonitorState(NamedTuple):
    """State of :func:`monitor`: steps seen and the stats of the last one."""

    count: jax.Array
    stats: GeometryStats


class MonitoredState(NamedTuple):
    """State of :func:`monitored`: the inner optimizer's state and the monitor's."""

    inner: Any
    monitor: MonitorState


def _leaf_stats(
    group: Group, x0: jax.Array, delta: jax.Array, scale: Any, grad: Any = None
) -> tuple:
    """All stats of one leaf from ``x_k`` and ``Delta``: two reduction passes (``<x,x>``,
    ``<x,Delta>``, ``<Delta,Delta>`` in one, ``||Delta_perp||^2`` in the other, so that the
    tangential part, hence tiny angles, keeps full relative precision), then scalar math;
    with the gradient ``grad``, its radial part ``|<g,x>| / (||g|| ||x||)`` last (``<x,x>``
    shared). Per-group results are squeezed over the group axes."""
    acc = accumulation_dtype(jnp.result_type(x0, delta))
    x0, delta = x0.astype(acc), delta.astype(acc)
    xx = group_sq_norm(x0, group)
    xd = group_dot(x0, delta, group)
    dd = group_sq_norm(delta, group)
    along = geometry.safe_div(xd, xx)  # Delta = along x_k + Delta_perp
    perp = jnp.sqrt(group_sq_norm(delta - along * x0, group))
    r = jnp.sqrt(xx)
    r_new = jnp.sqrt(jnp.maximum(xx + 2 * xd + dd, 0))
    cross = xx + xd  # <x_k, x_{k+1}> = r_k^2 (1 - A_k <c_k, u_k>)
    rise = r * perp  # r_k ||Delta_perp|| = r_k^2 A_k ||c_perp||
    out = [
        r,
        # tan(angle) = r_k ||Delta_perp|| / <x_k, x_{k+1}> (eqs. 12, 37); atan2 of the
        # tangential part is accurate for tiny angles and in [0, pi]. Zero groups give 0.
        jnp.where(r > 0, jnp.arctan2(rise, cross), 0),
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


def _stats_from_step(
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
    return _stats_from_step(grp, params_before, deltas, step_scale)


def _init_stats(
    grp: PyTree, params: PyTree, with_scale: bool, with_gradient: bool = False
) -> GeometryStats:
    def zeros(group, p):
        if group is None:
            return None
        shape = tuple(n for i, n in enumerate(p.shape) if i not in group.axes)
        return jnp.zeros(shape, accumulation_dtype(p.dtype))

    n = 8 if with_scale else 6
    # distinct buffers per field, so that the state can be donated
    fields = [_utils.map_groups(zeros, grp, params) for _ in range(n)] + [None] * (8 - n)
    radial = _utils.map_groups(zeros, grp, params) if with_gradient else None
    return GeometryStats(*fields, radial)


def _check_every(every: Any) -> None:
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"`every` must be an int >= 1, got {every!r}.")


def _maybe_record(every: int, state: MonitorState, compute: Callable[[], GeometryStats]):
    """The stats of this step when ``count % every == 0``, else the recorded ones."""
    if every == 1:
        return compute()
    return jax.lax.cond(state.count % every == 0, compute, lambda: state.stats)


def monitor(
    groups: GroupsLike = UNSET,
    *,
    step_scale: optax.ScalarOrSchedule | None = None,
    every: int = 1,
):
    """Records the per-group geometry of each step; put it last in an ``optax.chain``.

    The updates pass through unchanged; the state holds the :class:`GeometryStats` of the
    last step ``x_k -> x_k + updates`` (computed in at least float32 from two reduction
    passes over the params and the updates, no host transfer), so it works under ``jit``,
    ``pmap`` / sharding and with every optax wrapper. Its state is 6 scalars per group (8
    with ``step_scale``). Read it with :func:`metrics` or :class:`History`.

    Args:
      groups: the radially invariant groups (see :mod:`optax_sphere.groups`); the default,
        every optimizer's, groups nothing and warns at ``init``.
      step_scale: optional step scale ``s_k`` of the generic scheme of Roburin et al. eqs. 3-4 (a
        number or a schedule of the monitor's step count): the learning rate for SGD and
        SGD with momentum, with or without L2 (``b = 1``). Enables ``effective_lr`` and
        ``direction_norm``. For Adam-like optimizers, use :func:`monitored`.
      every: record the steps ``k`` with ``k % every == 0`` only (the state keeps the last
        recorded stats); the other steps skip the reductions (``lax.cond``).

    Returns:
      An ``optax.GradientTransformation`` (state :class:`MonitorState`); ``update`` needs
      ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> grads = {"w": jnp.array([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
      >>> tx = optax.chain(optax.sgd(0.1), optax_sphere.monitor({"w": "unit"}, step_scale=0.1))
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> optax_sphere.metrics(state)["w/effective_lr/mean"].shape
      ()

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eqs. 3-4 and 11-13.
    """
    if step_scale is not None:
        _utils.check_rate("step_scale", step_scale)
    _check_every(every)

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolve_groups(groups, params)
        return MonitorState(
            jnp.zeros([], jnp.int32), _init_stats(grp, params, step_scale is not None)
        )

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = _utils.require_params(params, "monitor")
        grp = resolve_groups(groups, params)
        scale = None if step_scale is None else _utils.value_at(step_scale, state.count)
        stats = _maybe_record(every, state, lambda: _stats_from_step(grp, params, updates, scale))
        return updates, MonitorState(optax.safe_increment(state.count), stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def monitored(
    inner: optax.GradientTransformation,
    groups: GroupsLike = UNSET,
    *,
    step_scale: Callable[[Any, PyTree], Any] | None = None,
    every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` followed by :func:`monitor`, with a step scale read from ``inner``'s state.

    It sees the gradients, so it also records ``radial_gradient`` (the check that every group
    is radially invariant, see the module docstring).

    Args:
      inner: the whole optimizer (learning rate included).
      groups: the radially invariant groups (see :mod:`optax_sphere.groups`); the default,
        every optimizer's, groups nothing and warns at ``init``.
      step_scale: optional ``step_scale(inner_state, params) -> s_k`` evaluated on the state
        after the step and the params before it, returning a number or a tree of per-group
        ``keepdims`` arrays, e.g. :func:`adam_step_scale` for optax's Adam and Adam + L2.
      every: as in :func:`monitor`.

    Returns:
      An ``optax.GradientTransformation`` (state :class:`MonitoredState`); ``update`` needs
      ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> grads = {"w": jnp.array([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
      >>> tx = optax_sphere.monitored(optax.sgd(0.1, momentum=0.9), {"w": "unit"}, step_scale=None)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> "w/radial_gradient/flagged" in optax_sphere.metrics(state)
      True

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 3 (the radial
      gradient of a radially invariant group is zero, eq. 2).
    """
    _check_every(every)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolve_groups(groups, params)
        stats = _init_stats(grp, params, step_scale is not None, with_gradient=True)
        return MonitoredState(inner.init(params), MonitorState(jnp.zeros([], jnp.int32), stats))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        params = _utils.require_params(params, "monitored")
        grp = resolve_groups(groups, params)
        grads = updates
        updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        stats = _maybe_record(
            every,
            state.monitor,
            lambda: _stats_from_step(
                grp,
                params,
                updates,
                None if step_scale is None else step_scale(inner_state, params),
                grads,
            ),
        )
        mon = MonitorState(optax.safe_increment(state.monitor.count), stats)
        return updates, MonitoredState(inner_state, mon)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_named(state: Any, predicate: Callable[[Any], bool]) -> list[Any]:
    """The NamedTuples of an optimizer state that satisfy ``predicate``, at any depth and in
    any container (the dicts of ``optax.multi_transform``, ``MaskedState``, ...)."""

    def is_match(node: Any) -> bool:
        return isinstance(node, tuple) and hasattr(node, "_fields") and predicate(node)

    return [s for s in jax.tree.leaves(state, is_leaf=is_match) if is_match(s)]


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
        found = _find_named(inner_state, lambda s: {"count", "mu", "nu"} <= set(s._fields))
        if len(found) != 1:
            raise ValueError(
                f"adam_step_scale: expected one Adam state (fields count, mu, nu) in the "
                f"optimizer state, found {len(found)}."
            )
        adam = found[0]
        grp = resolve_groups(groups, params)
        count = adam.count  # k + 1 after the step

        def leaf(group, nu):
            if group is None:
                return None
            acc = accumulation_dtype(nu.dtype)
            bc1, bc2 = _utils.bias_corrections(b1, b2, count, acc)
            lr = _utils.value_at(learning_rate, count - 1)
            b = bc1 / (1 - b1) * (jnp.sqrt(nu.astype(acc) / bc2 + eps_root) + eps)
            return geometry.safe_div(jnp.asarray(lr, acc), jnp.sqrt(group_mean(b * b, group)))

        return _utils.map_groups(leaf, grp, adam.nu)

    return fn


def find_monitor_state(state: Any) -> MonitorState:
    """The (unique) :class:`MonitorState` inside an optimizer state.

    Args:
      state: an optimizer state holding exactly one :class:`MonitorState`.

    Returns:
      That :class:`MonitorState`.

    Raises:
      ValueError: the state holds none, or more than one.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> grads = {"w": jnp.array([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
      >>> tx = optax.chain(optax.sgd(0.1), optax_sphere.monitor({"w": "unit"}))
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> optax_sphere.find_monitor_state(state).stats.angular_update["w"].shape  # per group
      (2,)

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 3.
    """
    found = _find_named(state, lambda s: isinstance(s, MonitorState))
    if len(found) != 1:
        raise ValueError(
            f"expected one MonitorState in the optimizer state, found {len(found)}; chain "
            "optax_sphere.monitor() into the optimizer or wrap it with monitored()."
        )
    return found[0]


def _as_stats(source: Any) -> GeometryStats:
    if isinstance(source, GeometryStats):
        return source
    return find_monitor_state(source).stats


def _named_leaves(tree: PyTree) -> list[tuple[str, jax.Array]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), v) for p, v in leaves]


def metrics(
    source: Any,
    *,
    fields: Sequence[str] | None = None,
    reductions: Iterable[str] = ("mean", "min", "max"),
    prefix: str = "",
    flag_threshold: float = RADIAL_GRADIENT_THRESHOLD,
) -> dict[str, jax.Array]:
    """Flat ``{"<prefix><param/path>/<stat>/<reduction>": scalar}`` dict for loggers.

    Each grouped parameter gets the ``mean``, ``min`` and ``max`` over its groups of every
    stat (``fields`` picks a subset); with ``radial_gradient`` recorded, also
    ``<path>/radial_gradient/flagged``: the fraction of the parameter's groups whose radial
    gradient exceeds ``flag_threshold`` (0 when every group is radially invariant).
    ``source`` is a :class:`GeometryStats` or any optimizer
    state holding one :class:`MonitorState`. The values are jax scalars (the function also
    runs under ``jit``); ``jax.device_get(metrics(state))`` gives numpy scalars for
    TensorBoard, CLU or W&B style loggers.

    Args:
      source: a :class:`GeometryStats`, or an optimizer state holding one
        :class:`MonitorState`.
      fields: the stats to report (``None``: every recorded one).
      reductions: over the groups of each parameter: ``"mean"``, ``"min"``, ``"max"``.
      prefix: prepended to every key.
      flag_threshold: the radial gradient above which a group is flagged.

    Returns:
      A flat dict of jax scalars.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> grads = {"w": jnp.array([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
      >>> tx = optax.chain(optax.sgd(0.1), optax_sphere.monitor({"w": "unit"}))
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> "w/angular_update/mean" in optax_sphere.metrics(state)
      True

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 3.
    """
    stats = _as_stats(source)
    names = GeometryStats._fields if fields is None else tuple(fields)
    for name in names:
        if name not in GeometryStats._fields:
            raise ValueError(f"unknown stat {name!r}; expected one of {GeometryStats._fields}.")
    reductions = tuple(reductions)
    for red in reductions:
        if red not in REDUCTIONS:
            raise ValueError(f"unknown reduction {red!r}; expected one of {sorted(REDUCTIONS)}.")
    out = {}
    for name in names:
        for path, value in _named_leaves(getattr(stats, name)):
            if value.size == 0:
                continue
            for red in reductions:
                out[f"{prefix}{path}/{name}/{red}"] = REDUCTIONS[red](value)
            if name == "radial_gradient":
                flagged = jnp.mean((value > flag_threshold).astype(jnp.float32))
                out[f"{prefix}{path}/radial_gradient/flagged"] = flagged
    return out


class History:
    """Records the per-group stats of a run, on the host, for plots and summaries.

    ``history.record(step, opt_state)`` after an optimizer step (outside ``jit``) stores the
    stats of the :class:`MonitorState` found in ``opt_state`` (or a :class:`GeometryStats`)
    as numpy arrays. ``keep_groups=False`` keeps only the per-layer reductions.
    """

    def __init__(self, keep_groups: bool = True):
        self.keep_groups = keep_groups
        self.steps: list[int] = []
        self.scalars: dict[str, list[float]] = {}
        self.groups: dict[str, dict[str, list[np.ndarray]]] = {}

    def record(self, step: int, source: Any) -> dict[str, float]:
        """Stores the stats of ``source`` at ``step``; returns the flat metrics (floats)."""
        stats = jax.device_get(_as_stats(source))
        flat = {k: float(v) for k, v in metrics(stats).items()}
        new_flags = [
            k[: -len("/radial_gradient/flagged")]
            for k, v in flat.items()
            if k.endswith("/radial_gradient/flagged")
            and v > 0
            and k not in self.scalars
            or k.endswith("/radial_gradient/flagged")
            and v > 0
            and np.nanmax(self.scalars[k]) == 0
        ]
        if new_flags:
            warnings.warn(
                f"step {step}: groups of {new_flags} are not radially invariant (radial part of "
                f"the gradient above {RADIAL_GRADIENT_THRESHOLD:g}): the model does not "
                "normalise them; check the groups (optax_sphere.find_groups).",
                stacklevel=2,
            )
        self.steps.append(int(step))
        for key, value in flat.items():
            self.scalars.setdefault(key, [np.nan] * (len(self.steps) - 1)).append(value)
        for values in self.scalars.values():
            if len(values) < len(self.steps):
                values.append(np.nan)
        if self.keep_groups:
            for name in GeometryStats._fields:
                for path, value in _named_leaves(getattr(stats, name)):
                    self.groups.setdefault(name, {}).setdefault(path, []).append(
                        np.asarray(value).reshape(-1)
                    )
        return flat

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def radial_gradient_measured(self) -> bool:
        """Whether a recorded step measured ``radial_gradient`` (:func:`monitored` does;
        :func:`monitor` at the end of a chain sees no gradient and does not)."""
        return any(key.endswith("/radial_gradient/flagged") for key in self.scalars)

    def flagged(self) -> list[str]:
        """Paths of the grouped parameters with a group flagged as not radially invariant
        (``radial_gradient`` above :data:`RADIAL_GRADIENT_THRESHOLD`) at some recorded step.

        Raises:
          ValueError: no recorded step measured the radial gradient (nothing was checked,
            which is not the same as nothing flagged; see :attr:`radial_gradient_measured`).
        """
        if not self.radial_gradient_measured:
            raise ValueError(
                "History.flagged(): the radial gradient was not measured at any recorded step "
                f"({len(self.steps)} recorded), so no group was checked. `monitor()` at the end "
                "of a chain sees the updates, not the gradients: wrap the optimizer in "
                "`optax_sphere.monitored(tx, groups=...)` to measure it."
            )
        out = []
        for key, values in self.scalars.items():
            if key.endswith("/radial_gradient/flagged") and np.nanmax(values) > 0:
                out.append(key[: -len("/radial_gradient/flagged")])
        return out

    def layers(self) -> list[str]:
        """Paths of the grouped parameters, in tree order."""
        seen = []
        for key in self.scalars:
            path = key.rsplit("/", 2)[0]
            if path not in seen:
                seen.append(path)
        return seen

    def series(self, path: str, stat: str, reduction: str = "mean") -> np.ndarray:
        """``(steps,)`` values of one per-layer reduction of a stat."""
        key = f"{path}/{stat}/{reduction}"
        if key not in self.scalars:
            raise KeyError(f"no recorded metric {key!r}.")
        return np.asarray(self.scalars[key])

    def per_group(self, path: str, stat: str) -> np.ndarray:
        """``(steps, groups)`` values of a stat for every group of one parameter."""
        if not self.keep_groups:
            raise ValueError("this History was created with keep_groups=False.")
        try:
            return np.stack(self.groups[stat][path])
        except KeyError:
            raise KeyError(f"no per-group record of {stat!r} for {path!r}.") from None

    def unit_spread(
        self, path: str, stat: str = "angular_update", tail: float = 0.5
    ) -> tuple[float, float, float]:
        """``(min, mean, max)`` over the groups of ``path`` of each group's average of
        ``stat`` over the last ``tail`` fraction of the records: how balanced the groups are
        (Kosson et al. fig. 8: equal for AdamW, spread for Adam + L2)."""
        values = self.per_group(path, stat)
        start = min(int(len(values) * (1 - tail)), len(values) - 1)
        means = values[start:].mean(axis=0)
        return float(means.min()), float(means.mean()), float(means.max())
