"""Small shared helpers: hyperparameter validation and schedules, leaf-wise mapping."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_sphere.groups import accumulation_dtype

PyTree = Any
Hyper = Any  # a number, a scalar array, or a schedule ``count -> value``

__all__ = [
    "value_at",
    "check_rate",
    "check_beta",
    "map_groups",
    "unzip",
    "require_params",
    "zeros_acc",
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


def value_at(h: Hyper, count: jax.Array) -> Any:
    """The value of a hyperparameter at step ``count`` (schedules are called)."""
    return h(count) if callable(h) else h


def map_groups(fn: Callable[..., Any], groups: PyTree, *trees: PyTree) -> PyTree:
    """``fn(group, *leaves)`` over the leaves of ``trees`` (``groups`` resolved, same tree)."""
    return jax.tree.map(lambda *xs: fn(xs[-1], *xs[:-1]), *trees, groups)


def unzip(tree_of_tuples: PyTree, like: PyTree, n: int) -> tuple[PyTree, ...]:
    """Splits a tree whose leaves (at the positions of ``like``) are n-tuples into n trees."""
    return tuple(jax.tree.map(lambda _, t, i=i: t[i], like, tree_of_tuples) for i in range(n))


def require_params(params: PyTree | None, name: str) -> PyTree:
    if params is None:
        raise ValueError(f"{name} needs `params` in `update(updates, state, params)`.")
    return params


def zeros_acc(p: jax.Array, shape: tuple[int, ...] | None = None) -> jax.Array:
    """Zeros in the accumulation dtype (at least float32) of ``p``."""
    return jnp.zeros(p.shape if shape is None else shape, accumulation_dtype(p.dtype))


def bias_corrections(
    b1: Hyper, b2: Hyper, count: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Adam's ``1 - b1^k`` and ``1 - b2^k`` in ``dtype`` (float64 stays float64)."""
    k = count.astype(dtype)
    return 1 - jnp.asarray(b1, dtype) ** k, 1 - jnp.asarray(b2, dtype) ** k
