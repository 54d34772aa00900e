"""Small shared helpers: hyperparameter validation and schedules, leaf-wise mapping."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from optax_sphere._dtypes import accumulation_dtype
from optax_sphere._paths import check_trees_match, path_str
from optax_sphere.grouped import resolution_of
from optax_sphere.groups import flatten_view, is_masked_node, map_groups

PyTree = Any
Hyper = Any  # a number, a scalar array, or a schedule ``count -> value``

__all__ = [
    "value_at",
    "check_rate",
    "check_beta",
    "check_adam",
    "map_groups",
    "check_trees_match",
    "check_state_matches",
    "inner_update",
    "unzip",
    "require_params",
    "zeros_acc",
    "group_zeros",
    "to_accumulation",
    "is_traced",
    "find_states",
    "named_fields",
    "MOMENTUM_FIELDS",
    "SECOND_MOMENT_FIELDS",
    "BUFFER_FIELDS",
]


def is_traced(value: Any) -> bool:
    """True for a value known only at run time: a hyperparameter traced by
    ``optax.inject_hyperparams``, or any value inside ``jit``."""
    return isinstance(value, jax.core.Tracer)


def _check_scalar(name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
    if callable(value):
        return  # schedules are checked by the user's own schedule code
    try:
        v = float(value)
    except (TypeError, ValueError):
        if is_traced(value):
            return  # traced under inject_hyperparams: value known only at run time
        raise ValueError(f"`{name}` must be a number or a schedule, got {value!r}.") from None
    if not ok(v):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")


def check_rate(name: str, value: Hyper) -> None:
    """A learning rate / weight decay: finite and >= 0 (or a schedule)."""
    _check_scalar(name, value, lambda v: math.isfinite(v) and v >= 0, "finite and >= 0")


def check_beta(name: str, value: Hyper) -> None:
    """A decay rate in [0, 1)."""
    _check_scalar(name, value, lambda v: 0 <= v < 1, "in [0, 1)")


def check_adam(learning_rate: Hyper, b1: Hyper, b2: Hyper, eps: Hyper, weight_decay: Hyper) -> None:
    """The hyperparameters of an Adam-family alias."""
    check_rate("learning_rate", learning_rate)
    check_beta("b1", b1)
    check_beta("b2", b2)
    check_rate("eps", eps)
    check_rate("weight_decay", weight_decay)


def value_at(h: Hyper, count: jax.Array) -> Any:
    """The value of a hyperparameter at step ``count`` (schedules are called)."""
    return h(count) if callable(h) else h


#: State fields treated as momentum buffers (optax's Adam and Lion, SGD momentum, ours).
MOMENTUM_FIELDS: tuple[str, ...] = ("mu", "trace", "momentum")
#: State fields treated as second moments (rescaled by R and RT).
SECOND_MOMENT_FIELDS: tuple[str, ...] = ("nu",)
#: Every state field that mirrors the parameters' tree.
BUFFER_FIELDS: tuple[str, ...] = (*MOMENTUM_FIELDS, *SECOND_MOMENT_FIELDS)


def _is_named_tuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _children(node: Any) -> list[tuple[Any, Any]]:
    """The ``(key, child)`` pairs the state walkers enter: the fields of a NamedTuple, the
    items of a Mapping (``optax.multi_transform``'s ``PartitionState``), tuples and lists."""
    if _is_named_tuple(node):
        return [(f, getattr(node, f)) for f in node._fields]
    if isinstance(node, Mapping):
        return list(node.items())
    if isinstance(node, (tuple, list)):
        return list(enumerate(node))
    return []


def find_states(state: PyTree, predicate: Callable[[Any], bool]) -> list[Any]:
    """The NamedTuples of an optimizer state that satisfy ``predicate``, at any depth and in
    any container (the one walker of optimizer states: :func:`named_fields` and
    :func:`map_state_fields` enter the same containers)."""
    found: list[Any] = []

    def visit(node):
        if _is_named_tuple(node) and predicate(node):
            found.append(node)
            return
        for _, child in _children(node):
            visit(child)

    visit(state)
    return found


def named_fields(state: PyTree, names: tuple[str, ...]) -> list[PyTree]:
    """Values of every NamedTuple field of ``state`` (at any depth, in any container) named
    in ``names``."""
    found: list[PyTree] = []

    def visit(node):
        named = _is_named_tuple(node)
        for key, child in _children(node):
            found.append(child) if named and key in names else visit(child)

    visit(state)
    return found


def check_state_matches(
    params: PyTree, updates: PyTree, state: PyTree, fields: tuple[str, ...]
) -> None:
    """:func:`check_trees_match` for a wrapper, before it calls its inner optimizer: the
    updates, and the buffers of ``state`` that mirror the parameters (NamedTuple fields named
    in ``fields``, at any depth: ``mu``, ``nu``, ``trace``...), against ``params``.

    Fields whose structure is the parameters' (placeholders allowed) are checked (shapes);
    when none is, the first one is, so that a changed tree names its paths instead of failing
    inside the inner step.
    """
    check_trees_match(params, updates)
    found = [f for f in named_fields(state, tuple(fields)) if jax.tree.leaves(f)]
    treedef = jax.tree.structure(params)
    matching = [f for f in found if fits(treedef, f)]
    check_trees_match(params, *(matching or found[:1]))


def inner_update(
    inner: optax.GradientTransformationExtraArgs,
    updates: optax.Updates,
    inner_state: optax.OptState,
    params: optax.Params,
    extra_args: dict[str, Any],
) -> tuple[optax.Updates, optax.OptState]:
    """A wrapper's call of its inner optimizer: the state checked against the parameters
    (:func:`check_state_matches`), then ``inner.update`` on the gradients and parameters cast
    to their accumulation dtype (at least float32), so that the inner moments of bf16 / fp16
    parameters are float32."""
    check_state_matches(params, updates, inner_state, BUFFER_FIELDS)
    return inner.update(
        to_accumulation(updates), inner_state, to_accumulation(params), **extra_args
    )


def fits(treedef: Any, tree: PyTree) -> bool:
    """``tree`` has the parameters' structure, placeholders (``optax.MaskedNode()``, as in
    the states of ``optax.masked`` and ``optax.partition``) in the place of some leaves."""
    try:
        treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
        return False
    return True


def unzip(tree_of_tuples: PyTree, like: PyTree, n: int) -> tuple[PyTree, ...]:
    """Splits a tree whose leaves (at the positions of ``like``) are n-tuples into n trees."""
    return tuple(jax.tree.map(lambda _, t, i=i: t[i], like, tree_of_tuples) for i in range(n))


def masked_rate(rate: Any, mask: Any, params: PyTree) -> PyTree:
    """``rate`` on the leaves that ``mask`` selects and ``0.0`` elsewhere, as a tree like
    ``params``: the weight-decay mask of ``optax.adamw`` (``None``: every leaf; a pytree of
    bools; or a callable of the params returning one)."""
    keep = resolve_mask(mask, params)
    return jax.tree.map(lambda _, k: rate if k else 0.0, params, keep)


def resolve_mask(mask: Any, params: PyTree) -> PyTree:
    """An optax weight-decay ``mask`` (``None``, a pytree of bools or a callable of the
    params) as a tree of bools like ``params``; a ``ValueError`` when it does not fit.

    ``params`` may be the view of ``optax.masked`` / :func:`~optax_sphere.on_groups`
    (``optax.MaskedNode()`` in the place of some leaves) and ``mask`` written for the whole
    tree: its values are read at the leaves the view keeps."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    keep = mask(params) if callable(mask) else mask
    try:
        return jax.tree.map(lambda _, k: bool(k), params, values_at_view(keep, params))
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"the weight-decay `mask` does not match the parameter tree ({err})."
        ) from None


def values_at_view(values: PyTree, view: PyTree) -> PyTree:
    """``values`` (a tree like the whole parameters, or like ``view``) read at the leaves of
    ``view``, a view of ``optax.masked`` / :func:`~optax_sphere.on_groups`
    (``optax.MaskedNode()`` in the place of some leaves): a tree like ``view``. A
    ``ValueError`` / ``TypeError`` when ``values`` fits neither."""
    flat, treedef = flatten_view(view)
    if not any(is_masked_node(x) for x in flat):
        treedef.flatten_up_to(values)  # raises when it does not fit
        return values
    try:
        given = treedef.flatten_up_to(values)
    except (ValueError, TypeError):
        jax.tree.structure(view).flatten_up_to(values)  # written for the view: raises if not
        return values
    return treedef.unflatten([x if is_masked_node(x) else v for x, v in zip(flat, given)])


def view_mask(mask: Any) -> Any:
    """``mask`` for an optax transformation that may see a view of the parameters (the base
    optimizer of :func:`~optax_sphere.on_groups`): ``None`` stays ``None``, anything else
    becomes a callable giving a tree like the view (:func:`resolve_mask`)."""
    return None if mask is None else (lambda params: resolve_mask(mask, params))


def require_params(params: PyTree | None, name: str) -> PyTree:
    if params is None:
        raise ValueError(f"{name} needs `params` in `update(updates, state, params)`.")
    return params


def _reduced_sharding(p: Any, shape: tuple[int, ...]) -> Any:
    """Sharding for an array of ``shape`` derived from ``p``'s (a keepdims per-group scalar, or
    a scalar): axes of size 1 and dropped axes are replicated, the others keep ``p``'s split.
    ``None`` (an uncommitted array, as optax's states are) unless ``p`` carries a
    ``NamedSharding``: a tracer, a NumPy array or an array on the default device gives a
    state that follows its computation, so that a jitted step compiles once and a state
    built from unsharded parameters can be used once they are sharded."""
    sharding = getattr(p, "sharding", None) if isinstance(p, jax.Array) else None
    if is_traced(p) or not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (len(p.shape) - len(sharding.spec))
    if len(shape) != len(p.shape):
        return NamedSharding(sharding.mesh, PartitionSpec())
    kept = [s if n == m else None for s, n, m in zip(spec, shape, p.shape)]
    return NamedSharding(sharding.mesh, PartitionSpec(*kept))


def zeros_acc(p: jax.Array, shape: tuple[int, ...] | None = None) -> jax.Array:
    """Zeros in the accumulation dtype (at least float32) of ``p``.

    Laid out like ``p``: a buffer shaped like ``p`` gets ``p``'s sharding, and a smaller one
    (``shape``: per-group scalars) keeps ``p``'s split on the axes it keeps, so that
    ``init`` on sharded parameters gives a state sharded like them (as optax does).
    """
    dtype = accumulation_dtype(p.dtype)
    if shape is None or tuple(shape) == tuple(p.shape):
        return jnp.zeros_like(p, dtype=dtype)
    return jnp.zeros(shape, dtype, device=_reduced_sharding(p, tuple(shape)))


def group_zero(group: Any, p: jax.Array) -> Any:
    """Zeros in the accumulation dtype, one per group of the leaf ``p`` (``keepdims`` shape,
    laid out like the leaf), or ``optax.MaskedNode()`` for an ungrouped leaf: the per-group
    scalars of a state."""
    return optax.MaskedNode() if group is None else zeros_acc(p, group.scalar_shape(p.shape))


def group_zeros(groups: PyTree, params: PyTree) -> PyTree:
    """:func:`group_zero` of every leaf. ``groups``: resolved, like ``params``."""
    return map_groups(group_zero, groups, params)


def to_accumulation(tree: PyTree) -> PyTree:
    """``tree`` with every floating leaf cast to its :func:`accumulation_dtype` (at least
    float32; float32 and float64 leaves are returned as they are, other leaves untouched).

    What a wrapper feeds its inner optimizer so that the inner moments of low-precision
    parameters are accumulated, and kept, in float32.
    """

    def leaf(x: Any) -> Any:
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):  # abstract params (jax.eval_shape, sharding)
            return jax.ShapeDtypeStruct(
                x.shape, accumulation_dtype(x.dtype), sharding=getattr(x, "sharding", None)
            )
        return x.astype(accumulation_dtype(x.dtype))

    return jax.tree.map(leaf, tree)


def map_state_fields(
    state: Any, names: tuple[str, ...] | list[str], treedef: Any, fn: Callable
) -> tuple[Any, int]:
    """Applies ``fn`` to every NamedTuple field of ``state`` named in ``names`` and shaped
    like the params (same treedef), at any depth and in the containers :func:`find_states`
    enters. A field that is a view of the params (``optax.MaskedNode()`` in the place of some
    leaves, as in the states of ``optax.masked``, ``optax.partition`` and
    :func:`~optax_sphere.on_groups`) is mapped at the leaves it holds. Returns the new state
    and how many fields matched (views holding no leaf not counted)."""
    if _is_named_tuple(state):
        new, found = {}, 0
        for name in state._fields:
            value = getattr(state, name)
            if name in names and jax.tree.structure(value) == treedef:
                new[name], n = fn(value), 1
            elif name in names and jax.tree.leaves(value) and fits(treedef, value):
                new[name], n = _map_view(fn, value, treedef), 1
            else:
                new[name], n = map_state_fields(value, names, treedef, fn)
            found += n
        return state._replace(**new), found
    if isinstance(state, Mapping):
        items = {k: map_state_fields(v, names, treedef, fn) for k, v in state.items()}
        return type(state)({k: s for k, (s, _) in items.items()}), sum(n for _, n in items.values())
    if isinstance(state, (tuple, list)):
        items = [map_state_fields(s, names, treedef, fn) for s in state]
        return type(state)(s for s, _ in items), sum(n for _, n in items)
    return state, 0


def _map_view(fn: Callable, view: PyTree, treedef: Any) -> PyTree:
    """``fn`` (of a tree like the params) on a view of them: the placeholders are given as
    scalar zeros, and their results dropped (under ``jit``, never computed)."""
    flat = treedef.flatten_up_to(view)
    masked = [is_masked_node(x) for x in flat]
    dtype = next(x.dtype for x, m in zip(flat, masked) if not m and hasattr(x, "dtype"))
    whole = treedef.unflatten([jnp.zeros((), dtype) if m else x for x, m in zip(flat, masked)])
    out = treedef.flatten_up_to(fn(whole))
    return treedef.unflatten([optax.MaskedNode() if m else o for o, m in zip(out, masked)])


#: how a sphere optimizer reads its rate: per unit (a group of ``k`` units takes ``lr / k``),
#: or per group as given
RATE_PER = ("unit", "group")


def check_rate_per(rate_per: str) -> None:
    if rate_per not in RATE_PER:
        raise ValueError(f"`rate_per` must be 'unit' or 'group', got {rate_per!r}.")


def group_rate(rate: Any, group: Any, rate_per: str) -> Any:
    """``rate / units`` for a group of ``units`` units (``rate_per="unit"``; unknown units
    count as one, which :func:`warn_unknown_units` says at ``init``), else ``rate``."""
    if rate_per == "group" or group.units in (None, 1):
        return rate
    return rate / group.units


def warn_unknown_units(
    name: str, rate_per: str, grp: PyTree, params: PyTree, stacklevel: int = 4
) -> None:
    """With ``rate_per="unit"``, warns, naming the parameters, when groups may hold several
    units whose number is not known, so that the rate per unit is applied to each as given
    (``stacklevel``: the caller's ``init`` as seen from here)."""
    if rate_per != "unit":
        return
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    unknown = [
        f"'{path_str(path)}' {tuple(p.shape)} (axes {group.axes})"
        for (path, p), group in zip(flat, treedef.flatten_up_to(grp))
        if group is not None and group.units is None
    ]
    if unknown:
        warnings.warn(
            f"{name}: the rate is one unit's and a group of k units takes rate / k (its "
            "tangent gradient on the sphere is about k times a unit's, so the same rate would "
            f"turn it about k times as far per step), but how many units the groups of "
            f"{', '.join(unknown)} hold is not known (a 'tensor' spec or axes, with no model "
            "structure): their rate is applied as given, which can turn a whole LayerNorm "
            "layer far past the sphere's useful steps and diverge. Pass the groups of "
            "optax_sphere.find_groups (which counts the units), a spec "
            "optax_sphere.Group(axes, units=k), or rate_per='group' to take the rate as "
            "given on every group.",
            stacklevel=stacklevel,
        )


def stateless_per_group(
    name: str,
    groups: Any,
    leaf: Callable[[Any, jax.Array, jax.Array], jax.Array],
    *,
    on_init: Callable[[PyTree, PyTree], None] = lambda groups, params: None,
) -> optax.GradientTransformationExtraArgs:
    """A stateless transformation that needs ``params``: ``leaf(group, update, param)`` maps
    the update of every grouped leaf; ungrouped leaves pass through. ``init`` checks the
    groups against the parameters (errors name the paths) and calls ``on_init(resolved_groups,
    params)``; ``name`` is the transformation's, for the error raised when ``params`` is
    missing. ``groups``: a spec or the :class:`~optax_sphere.grouped.GroupResolution` of an
    enclosing :func:`~optax_sphere.on_groups`."""
    resolution = resolution_of(groups)

    def init_fn(params: optax.Params) -> optax.OptState:
        on_init(resolution(params), params)
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = require_params(params, name)
        grp = resolution(params)
        return map_groups(
            lambda group, u, x: u if group is None else leaf(group, u, x),
            grp,
            updates,
            params,
            trace_once=True,
        ), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stateful_per_group(
    name: str,
    groups: Any,
    state_type: Callable[..., Any],
    init_leaf: Callable[..., tuple],
    update_leaf: Callable[..., tuple],
    *,
    prepare: Callable[[jax.Array, PyTree], Any] = lambda count, params: count,
    extra_trees: Callable[[jax.Array, PyTree], tuple[PyTree, ...]] = lambda count, params: (),
    init_trees: Callable[[PyTree], tuple[PyTree, ...]] = lambda params: (),
    on_init: Callable[[PyTree, PyTree], None] = lambda groups, params: None,
    needs_params: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """The transformation of the grouped leaves with a state, the sibling of
    :func:`stateless_per_group`, for the ``group_tx`` of :func:`~optax_sphere.on_groups`: it
    sees the grouped leaves only (the others are ``optax.MaskedNode()`` in its view, and
    follow the base optimizer).

    The state is ``state_type(count, *fields)``, one tree like the (viewed) parameters per
    field. ``init`` calls ``on_init(resolved_groups, params)`` (a check or a warning), then
    ``init_leaf(group, param, *inits)`` for the tuple of each leaf's fields (each field its own
    buffer), ``inits`` the trees ``init_trees(params)``. ``update`` requires ``params`` (unless
    ``needs_params`` is false: then, without them, the groups are resolved against the
    updates, which have the same tree), computes the step's context ``prepare(count, params)``
    once (``count``: the steps done; by default the context is ``count``), and maps
    ``update_leaf(context, group, update, *fields, param, *extras)`` to ``(update, *fields)``
    over the leaves, ``extras`` the trees ``extra_trees(count, params)`` (per-leaf rates). The
    new count is ``optax.safe_increment(count)``; ``name`` is the transformation's, for the
    errors; ``groups`` the :class:`~optax_sphere.grouped.GroupResolution` shared with
    :func:`~optax_sphere.on_groups`.
    """
    n = len(state_type._fields) - 1  # type: ignore[attr-defined]
    resolution = resolution_of(groups)

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolution(params)
        on_init(grp, params)
        fields = unzip(map_groups(init_leaf, grp, params, *init_trees(params)), params, n)
        return state_type(jnp.zeros([], jnp.int32), *fields)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        if needs_params or params is not None:
            params = require_params(params, name)
            grp = resolution(params)
        else:
            grp = resolution(updates)
        context = prepare(state.count, params)
        trees = (params, *extra_trees(state.count, params)) if params is not None else ()
        out = map_groups(
            lambda group, u, *rest: update_leaf(context, group, u, *rest),
            grp,
            updates,
            *state[1:],
            *trees,
            trace_once=True,
        )
        new_updates, *fields = unzip(out, updates, n + 1)
        return new_updates, state_type(optax.safe_increment(state.count), *fields)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
