"""How a parameter is named in errors, reports and metrics: its key path as ``a/b/0``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


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
