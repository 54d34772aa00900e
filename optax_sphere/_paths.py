"""How a parameter is named in errors, reports and metrics (its key path as ``a/b/0``), and the
check that names the paths where a parameter tree and an optimizer state built for another
one differ."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

PyTree = Any


def without_variable_value(path: Sequence[Any]) -> tuple[Any, ...]:
    """``path`` without the trailing ``value`` attribute of a Flax ``nnx.Variable``, so that a
    parameter has the same path in an ``nnx.State`` and in the arrays ``nnx.Optimizer``
    updates."""
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        return path[:-1]
    return path


def path_str(path: Sequence[Any]) -> str:
    """The ``a/b/0`` form of a ``jax.tree_util`` key path (``jax.tree_util.keystr``).

    The trailing ``value`` attribute of a Flax ``nnx.Variable`` is dropped, so that a
    parameter has the same name in an ``nnx.State`` and in the arrays ``nnx.Optimizer``
    updates; the empty path is ``<root>``.

    Example:
      >>> import jax
      >>> from optax_sphere import path_str
      >>> [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path({"a": [1, {"b": 2}]})]
      ['a/0', 'a/1/b']
    """
    return (
        jax.tree_util.keystr(without_variable_value(path), simple=True, separator="/") or "<root>"
    )


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
