"""The models :func:`optax_sphere.find_groups` accepts, as one function of the parameters.

Flax linen and flax.nnx modules, Equinox modules and plain functions become
``f(params, *inputs)``, the one form the structure tracer and the radial probe work on. Each
framework is used only if the caller imported it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax

PyTree = Any


def as_function(
    model: Any, args: tuple, kwargs: dict, batch_axis_name: str | None = None
) -> tuple[Callable, PyTree, tuple, str]:
    """``(f, params, inputs, layout)`` with ``f(params, *inputs)`` the model's outputs and
    ``layout`` the framework's kernel layout (``"out_last"`` or ``"out_first"``).

    ``batch_axis_name``: the model takes one example and normalises over the batch by a named
    axis (Equinox's ``BatchNorm(axis_name=...)``); ``f`` maps it over the first input's
    leading axis with ``jax.vmap(..., axis_name=batch_axis_name)``, the other inputs (an
    ``eqx.nn.State``) shared, and keeps the outputs that are not a state."""
    f, params, inputs, layout = _as_function(model, args, kwargs)
    if batch_axis_name is None:
        return f, params, inputs, layout
    if not inputs:
        raise ValueError(
            "batch_axis_name: the model is mapped over its first input's leading axis, but no "
            "input was given."
        )
    return _per_example(f, batch_axis_name), params, inputs, layout


def _is_state(x: Any) -> bool:
    eqx = sys.modules.get("equinox")
    state = getattr(getattr(eqx, "nn", None), "State", None)
    return state is not None and isinstance(x, state)


def _per_example(f: Callable, axis_name: str) -> Callable:
    """``f`` over a batch of single examples with the named batch axis."""

    def batched(p, first, *rest):
        rest = jax.tree.map(lambda v: v, rest)  # a fresh eqx.nn.State, usable once, per call

        def one(x):
            out = f(p, x, *rest)
            return jax.tree.map(lambda o: None if _is_state(o) else o, out, is_leaf=_is_state)

        return jax.vmap(one, axis_name=axis_name)(first)

    return batched


def _as_function(model: Any, args: tuple, kwargs: dict) -> tuple[Callable, PyTree, tuple, str]:
    nnx = getattr(sys.modules.get("flax"), "nnx", None)  # imported only if the user did
    linen = getattr(sys.modules.get("flax"), "linen", None)
    eqx = sys.modules.get("equinox")
    if nnx is not None and isinstance(model, nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f_nnx(p, *inputs):
            # fresh Variables inside the trace: the model's own are not mutated
            state = jax.tree.map(lambda v: v, rest)
            return nnx.merge(graphdef, p, state)(*inputs, **kwargs)

        return f_nnx, params, args, "out_last"
    if linen is not None and isinstance(model, linen.Module):
        if not args or not isinstance(args[0], Mapping) or "params" not in args[0]:
            raise ValueError(
                "find_groups(linen_module, variables, *inputs): the second argument must "
                "be the module's variables ({'params': ..., 'batch_stats': ...})."
            )
        variables, inputs = args[0], args[1:]
        mutable = [c for c in variables if c != "params"] or False

        def f_linen(p, *inputs):
            out = model.apply({**variables, "params": p}, *inputs, mutable=mutable, **kwargs)
            return out[0] if mutable else out

        return f_linen, variables["params"], inputs, "out_last"
    if eqx is not None and isinstance(model, eqx.Module):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def f_eqx(p, *inputs):
            inputs = jax.tree.map(lambda v: v, inputs)  # a fresh eqx.nn.State per call
            return eqx.combine(p, static)(*inputs, **kwargs)

        return f_eqx, params, args, "out_first"
    if not callable(model):
        raise TypeError(f"find_groups: expected a model or a function, got {type(model).__name__}.")
    if not args:
        raise ValueError("find_groups(fn, params, *inputs): the parameters are missing.")

    def f(p, *inputs):
        return model(p, *inputs, **kwargs)

    params = args[0]
    is_module = lambda x: eqx is not None and isinstance(x, eqx.Module)
    nodes = jax.tree.leaves(params, is_leaf=is_module)
    return (
        f,
        params,
        args[1:],
        "out_first" if is_module(params) or any(map(is_module, nodes)) else "out_last",
    )


def has_batch_statistics(model: Any, args: tuple) -> bool | None:
    """Whether the model keeps running statistics (linen collections besides ``params``, nnx
    ``BatchStat`` variables, an Equinox ``State`` among the inputs); ``None`` for a plain
    function, which cannot say."""
    nnx = getattr(sys.modules.get("flax"), "nnx", None)
    linen = getattr(sys.modules.get("flax"), "linen", None)
    eqx = sys.modules.get("equinox")
    if nnx is not None and isinstance(model, nnx.Module):
        return bool(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    if linen is not None and isinstance(model, linen.Module):
        return any(jax.tree.leaves(v) for k, v in args[0].items() if k != "params")
    if eqx is not None and isinstance(model, eqx.Module):
        state = getattr(getattr(eqx, "nn", None), "State", None)
        return state is not None and any(isinstance(a, state) for a in args)
    return None
