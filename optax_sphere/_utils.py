"""Small shared helpers: hyperparameter validation and schedules, leaf-wise mapping."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from optax_sphere._dtypes import accumulation_dtype
from optax_sphere._paths import path_str
from optax_sphere.groups import resolve_groups

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
    "unzip",
    "require_params",
    "zeros_acc",
    "group_zeros",
    "to_accumulation",
    "bias_corrections",
]


def _check_scalar(name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
    if callable(value):
        return  # schedules are checked by the user's own schedule code
    try:
        v = float(value)
    except (TypeError, ValueError):
        if isinstance(value, jax.core.Tracer):
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


def _leaf_paths(tree: PyTree) -> list[str]:
    # a placeholder (``optax.MaskedNode()``) stands for its parameter: it has a path
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )[0]
    return [path_str(p) for p, _ in flat]


def check_trees_match(*trees: PyTree) -> None:
    """Raises a ``ValueError`` naming the parameter paths when ``trees`` (the first one the
    parameters or updates of this step, the others the optimizer state built by ``init``) do
    not have the same structure, or hold leaves whose shapes cannot broadcast together.

    This is what a parameter tree that changed between ``init`` and ``update`` looks like; it
    is checked when the update is traced (shapes are static), so it costs nothing under jit.
    """
    reference, *others = trees
    ref_def = jax.tree.structure(reference)
    hint = " Re-run `init` on the new parameter tree (or restore a matching checkpoint)."
    matched = []
    for other in others:
        try:
            # As jax.tree.map does: a parameter leaf may face a placeholder subtree in the
            # state (``optax.MaskedNode()`` for an ungrouped leaf, for instance).
            matched.append(ref_def.flatten_up_to(other))
            continue
        except (ValueError, TypeError):
            pass
        new, old = _leaf_paths(reference), _leaf_paths(other)
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        detail = (
            f"parameters not in the optimizer state: {added or 'none'}; "
            f"state entries with no parameter: {removed or 'none'}"
            if added or removed
            else f"same paths, different containers: {ref_def} vs {jax.tree.structure(other)}"
        )
        raise ValueError(
            "the parameter tree does not match the one the optimizer state was initialised "
            f"with ({detail}).{hint}"
        )
    flat = [jax.tree_util.tree_flatten_with_path(reference)[0], *matched]
    for (path, leaf), *state_leaves in zip(*flat):
        shape = tuple(np.shape(leaf))
        for s in state_leaves:
            if not hasattr(s, "shape"):
                continue  # a placeholder subtree, not an array
            try:
                np.broadcast_shapes(shape, tuple(np.shape(s)))
            except ValueError:
                raise ValueError(
                    f"parameter '{path_str(path)}' has shape {shape}, but the optimizer state "
                    f"holds shape {tuple(np.shape(s))} for it: the parameter tree changed "
                    f"since `init`.{hint}"
                ) from None


def _named_fields(state: PyTree, names: tuple[str, ...]) -> list[PyTree]:
    """Values of every NamedTuple field of ``state`` (nested) named in ``names``."""
    found: list[PyTree] = []

    def visit(tree):
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):
            for field in tree._fields:
                value = getattr(tree, field)
                found.append(value) if field in names else visit(value)
        elif isinstance(tree, (tuple, list)):
            for item in tree:
                visit(item)

    visit(state)
    return found


def check_state_matches(
    params: PyTree, updates: PyTree, state: PyTree, fields: tuple[str, ...]
) -> None:
    """:func:`check_trees_match` for a wrapper, before it calls its inner optimizer: the
    updates, and the buffers of ``state`` that mirror the parameters (NamedTuple fields named
    in ``fields``, at any depth: ``mu``, ``nu``, ``trace``...), against ``params``.

    Fields whose structure is the parameters' are checked (shapes); when none is, the first
    one is, so that a changed tree names its paths instead of failing inside the inner step.
    """
    check_trees_match(params, updates)
    found = [f for f in _named_fields(state, tuple(fields)) if jax.tree.leaves(f)]
    treedef = jax.tree.structure(params)
    matching = [f for f in found if jax.tree.structure(f) == treedef]
    check_trees_match(params, *(matching or found[:1]))


def map_groups(fn: Callable[..., Any], groups: PyTree, *trees: PyTree) -> PyTree:
    """``fn(group, *leaves)`` over the leaves of ``trees`` (``groups`` resolved, same tree).

    ``trees`` are checked with :func:`check_trees_match` first (the first tree is the
    reference), so a parameter tree that changed since ``init`` gives a clear ``ValueError``.
    """
    check_trees_match(*trees)
    return jax.tree.map(lambda *xs: fn(xs[-1], *xs[:-1]), *trees, groups)


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
    params) as a tree of bools like ``params``; a ``ValueError`` when it does not fit."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    keep = mask(params) if callable(mask) else mask
    try:
        return jax.tree.map(lambda _, k: bool(k), params, keep)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"the weight-decay `mask` does not match the parameter tree ({err})."
        ) from None


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
    if isinstance(p, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
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


def group_zeros(groups: PyTree, params: PyTree) -> PyTree:
    """Zeros in the accumulation dtype, one per group of each grouped leaf (``keepdims``
    shape, laid out like the leaf), and ``optax.MaskedNode()`` on the ungrouped leaves:
    the per-group scalars of a state. ``groups``: resolved, like ``params``."""
    return map_groups(
        lambda group, p: (
            optax.MaskedNode() if group is None else zeros_acc(p, group.scalar_shape(p.shape))
        ),
        groups,
        params,
    )


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


def bias_corrections(
    b1: Hyper, b2: Hyper, count: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Adam's ``1 - b1^k`` and ``1 - b2^k`` in ``dtype`` (float64 stays float64)."""
    k = count.astype(dtype)
    return 1 - jnp.asarray(b1, dtype) ** k, 1 - jnp.asarray(b2, dtype) ** k


def map_state_fields(
    state: Any, names: tuple[str, ...] | list[str], treedef: Any, fn: Callable
) -> tuple[Any, int]:
    """Applies ``fn`` to every NamedTuple field of ``state`` named in ``names`` and shaped
    like the params (same treedef). Returns the new state and how many fields matched."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        new, found = {}, 0
        for name in state._fields:
            value = getattr(state, name)
            if name in names and jax.tree.structure(value) == treedef:
                new[name], n = fn(value), 1
            else:
                new[name], n = map_state_fields(value, names, treedef, fn)
            found += n
        return state._replace(**new), found
    if isinstance(state, (tuple, list)):
        items = [map_state_fields(s, names, treedef, fn) for s in state]
        return type(state)(s for s, _ in items), sum(n for _, n in items)
    return state, 0


def stateless_per_group(
    name: str, groups: Any, leaf: Callable[[Any, jax.Array, jax.Array], jax.Array]
) -> optax.GradientTransformationExtraArgs:
    """A stateless transformation that needs ``params``: ``leaf(group, update, param)`` maps
    the update of every grouped leaf; ungrouped leaves pass through. ``init`` checks the
    groups against the parameters (errors name the paths); ``name`` is the transformation's,
    for the error raised when ``params`` is missing."""

    def init_fn(params: optax.Params) -> optax.OptState:
        resolve_groups(groups, params)
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = require_params(params, name)
        grp = resolve_groups(groups, params)
        return map_groups(
            lambda group, u, x: u if group is None else leaf(group, u, x), grp, updates, params
        ), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
