"""One transformation on the grouped leaves, another on the rest: :func:`on_groups`.

Every optimizer of the library changes only the radially invariant groups; the other leaves
(biases, norm scales, embeddings left off the sphere) follow the optax optimizer it extends.
:func:`on_groups` splits the parameters at the group boundary with ``optax.partition``: the
group transformation sees only the grouped leaves (the others are ``optax.MaskedNode()`` in its
view, as in ``optax.masked``), and the base optimizer, literally the optax one, the others.

The groups are resolved once per parameter tree structure (tree, shapes) by a
:class:`GroupResolution` that the partition's labels and the group transformation share, so
that a jitted step resolves them once when it is traced and an eager loop not at every step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.groups import GroupsLike, flatten_view, is_masked_node, resolve_groups

PyTree = Any

__all__ = ["GROUPED", "UNGROUPED", "GroupResolution", "grouped_state", "on_groups"]

#: the partition's label of the leaves of a group
GROUPED = "grouped"
#: the partition's label of the other leaves
UNGROUPED = "ungrouped"
#: structures remembered by one resolution before it starts again
_MOST_STRUCTURES = 64


def _shape(x: Any) -> Any:
    shape = getattr(x, "shape", None)
    return type(x).__name__ if shape is None else tuple(shape)


class GroupResolution:
    """A ``groups`` spec resolved once per parameter tree structure.

    Called with a parameter tree (or updates, which have its structure), it returns the tree of
    :class:`~optax_sphere.Group` / ``None`` of :func:`~optax_sphere.resolve_groups`; called with
    a view of ``optax.masked`` / ``optax.partition`` (``optax.MaskedNode()`` in the place of
    some leaves), the groups of the leaves left, taken from the whole tree's resolution when
    it was made (the partition labels the whole tree first), so that a spec written for the
    whole tree (a callable of it included) is never applied to a part of it. Warnings of the
    resolution (no groups given, groups across the layers of a stack) are said once per
    structure.

    Args:
      groups: any ``groups`` spec (:func:`~optax_sphere.resolve_groups`).
    """

    def __init__(self, groups: GroupsLike):
        self.groups = groups
        self._cache: dict[Any, list[Any]] = {}
        self._whole: dict[Any, list[tuple[tuple[Any, ...], list[Any]]]] = {}

    def _flat(self, tree: PyTree, flat: list[Any], treedef: Any) -> list[Any]:
        """The groups of ``flat`` (``tree`` flattened by :func:`flatten_view`)."""
        shapes = tuple(None if is_masked_node(x) else _shape(x) for x in flat)
        key = (treedef, shapes)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if len(self._cache) >= _MOST_STRUCTURES:
            self._cache.clear()
            self._whole.clear()
        if any(s is None for s in shapes):
            hit = self._from_whole(treedef, shapes)
            if hit is None:  # a view whose whole tree was never seen: resolve the view
                hit = treedef.flatten_up_to(resolve_groups(self.groups, tree))
                hit = [None if s is None else g for g, s in zip(hit, shapes)]
        else:
            hit = treedef.flatten_up_to(resolve_groups(self.groups, tree))
            self._whole.setdefault(treedef, []).append((shapes, hit))
        self._cache[key] = hit
        return hit

    def _from_whole(self, treedef: Any, shapes: tuple[Any, ...]) -> list[Any] | None:
        for whole_shapes, groups in self._whole.get(treedef, ()):
            if all(s is None or s == w for s, w in zip(shapes, whole_shapes)):
                return [None if s is None else g for g, s in zip(groups, shapes)]
        return None

    def __call__(self, tree: PyTree) -> PyTree:
        """The groups of ``tree``'s leaves: a tree like it (``MaskedNode`` kept)."""
        flat, treedef = flatten_view(tree)
        groups = self._flat(tree, flat, treedef)
        return treedef.unflatten(
            [optax.MaskedNode() if is_masked_node(x) else g for x, g in zip(flat, groups)]
        )

    def labels(self, tree: PyTree) -> PyTree:
        """``"grouped"`` / ``"ungrouped"`` for every leaf of ``tree``: ``optax.partition``'s
        labels (``MaskedNode`` kept, for a tree that is itself a view)."""
        flat, treedef = flatten_view(tree)
        groups = self._flat(tree, flat, treedef)
        return treedef.unflatten(
            [
                x if is_masked_node(x) else (GROUPED if g is not None else UNGROUPED)
                for x, g in zip(flat, groups)
            ]
        )


def resolution_of(groups: GroupsLike | GroupResolution) -> GroupResolution:
    """``groups`` as a :class:`GroupResolution` (one that is one is shared as it is)."""
    return groups if isinstance(groups, GroupResolution) else GroupResolution(groups)


def on_groups(
    group_tx: optax.GradientTransformation,
    base_tx: optax.GradientTransformation,
    groups: GroupsLike | GroupResolution,
) -> optax.GradientTransformationExtraArgs:
    """``group_tx`` on the grouped leaves, ``base_tx`` on the others (``optax.partition``).

    The labels come from ``groups`` resolved once per tree structure; ``group_tx`` sees the
    grouped leaves only (``optax.MaskedNode()`` elsewhere) and ``base_tx`` the others, each with
    its own state (``optax.PartitionState`` with the keys ``"grouped"`` and ``"ungrouped"``).
    ``groups=None`` (nothing grouped) is ``base_tx`` itself. To read the groups of the leaves
    it sees, ``group_tx`` calls the same :class:`GroupResolution` (pass one as ``groups``).
    ``base_tx`` runs on its leaves in their accumulation dtype (float32 for bf16 / fp16
    parameters, so that its state is float32 as the groups' is; float32 and float64 leaves as
    they are), its updates returned in the gradients' dtypes. Read the groups' state with
    :func:`grouped_state`.

    Args:
      group_tx: the transformation of the groups.
      base_tx: the optax optimizer of the other leaves.
      groups: a ``groups`` spec (:func:`~optax_sphere.resolve_groups`) or a
        :class:`GroupResolution` shared with ``group_tx``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.on_groups(
      ...     optax_sphere.retract_to_sphere(groups={"w": "unit", "b": None}),
      ...     optax.scale(-0.1), groups={"w": "unit", "b": None},
      ... )
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> [round(float(v), 4) for v in updates["b"]], updates["w"].shape
      ([-0.0, -0.0], (3, 2))

    References:
      ``optax.partition`` (optax's documentation).
    """
    base_tx = _in_accumulation_dtype(base_tx)
    if groups is None:
        return base_tx
    resolution = resolution_of(groups)
    return optax.partition({GROUPED: group_tx, UNGROUPED: base_tx}, resolution.labels)


def _in_accumulation_dtype(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """``tx`` fed its updates and parameters in their accumulation dtype (float32 for
    bf16 / fp16 leaves; float32 and float64 leaves as they are, so that ``tx`` is then exactly
    itself), its updates returned in the gradients' dtypes: the state of low-precision
    parameters is kept in float32, as the groups' is."""
    tx = optax.with_extra_args_support(tx)
    from optax_sphere._utils import to_accumulation

    def init_fn(params: optax.Params) -> optax.OptState:
        return tx.init(to_accumulation(params))

    def update_fn(updates, state, params=None, **extra_args):
        dtypes = [jnp.result_type(g) for g in jax.tree.leaves(updates)]
        if all(d == accumulation_dtype(d) or not jnp.issubdtype(d, jnp.floating) for d in dtypes):
            return tx.update(updates, state, params, **extra_args)  # tx itself
        new, state = tx.update(
            to_accumulation(updates),
            state,
            None if params is None else to_accumulation(params),
            **extra_args,
        )
        return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def grouped_state(state: Any) -> Any:
    """The state of the group transformation of an :func:`on_groups` in ``state`` (an
    optimizer state, at any depth: in a chain, ``inject_hyperparams``, ``MultiSteps``...).

    Args:
      state: an optimizer state holding one :func:`on_groups` (an alias's).

    Returns:
      The ``"grouped"`` inner state (a NamedTuple such as
      :class:`~optax_sphere.SphericalAdamState`), its trees views of the grouped leaves.

    Raises:
      ValueError: ``state`` holds no or several :func:`on_groups` states.

    Example:
      >>> import jax.numpy as jnp, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.adam_srt(1e-3, groups={"w": "unit", "b": None})
      >>> optax_sphere.grouped_state(tx.init(params)).nu["w"].shape  # one scalar per group
      (1, 2)

    References:
      ``optax.partition``'s ``PartitionState`` (optax's documentation).
    """
    from optax_sphere._utils import find_states

    found = [
        s.inner_states[GROUPED].inner_state
        for s in find_states(
            state, lambda s: isinstance(s, optax.PartitionState) and GROUPED in s.inner_states
        )
    ]
    if len(found) != 1:
        raise ValueError(
            f"grouped_state: expected one on_groups state in the optimizer state, found "
            f"{len(found)}."
        )
    return found[0]
