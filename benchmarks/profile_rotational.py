"""Where the step time of ``rv_adamw`` goes: its passes over memory, timed one by one.

On the ResNet-18 tree of ``bench.py`` (11.7M parameters, conv kernels grouped per output
unit), each line times one jit-compiled function over the whole tree, median of ``--steps``
runs, and gives it in milliseconds and in units of one element-wise pass ``y = u + x`` (read
two arrays, write one):

* the per-group sums that the rotational step needs (1, 3 or 5 of them: ``<u,u>``, ``<u,x>``,
  ``<x,x>``, and with centring ``sum u``, ``sum x``), taken as separate ``keepdims``
  reductions, as one variadic ``lax.reduce`` and as a reduction of the stacked products (the
  two ways to ask XLA for a single pass);
* the rotational step of Kosson et al. alg. 1 (lines 9-13) given a direction, with and without
  centring;
* the whole ``rv_adamw`` step (Adam's direction, the rotational step, ``apply_updates``) with
  and without centring, and ``optax.adamw``.

    python benchmarks/profile_rotational.py [--steps 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from jax import lax

import optax_sphere as osp
from optax_sphere.experiments.trees import make_tree, resnet18_shapes


def _median_ms(fn, args, steps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _grouped(fn):
    """Apply ``fn(u, x, axes)`` to the grouped (ndim >= 2) leaves of the tree."""

    def tree_fn(u, x):
        return jax.tree.map(
            lambda a, b: fn(a, b, tuple(range(b.ndim - 1))) if b.ndim >= 2 else b, u, x
        )

    return jax.jit(tree_fn)


def _separate(n):
    def fn(u, x, axes):
        products = (u * u, u * x, x * x, u, x)[:n]
        return [jnp.sum(p, axis=axes, keepdims=True) for p in products]

    return fn


def _variadic(u, x, axes):
    operands = (u * u, u * x, x * x, u, x)
    zeros = tuple(jnp.zeros((), x.dtype) for _ in operands)
    return lax.reduce(operands, zeros, lambda a, b: tuple(i + j for i, j in zip(a, b)), axes)


def _stacked(u, x, axes):
    return jnp.sum(jnp.stack((u * u, u * x, x * x, u, x)), axis=tuple(a + 1 for a in axes))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)

    params = make_tree(resnet18_shapes(), seed=0, scale=0.05)
    direction = jax.tree.map(lambda p: 0.1 * p + 0.01, params)

    def step_fn(center):
        # the rotational step alone: the wrapper around the identity direction
        tx = osp.rotational_rms_control(
            optax.identity(), eta_r=0.01, ungrouped_learning_rate=0.01, center=center, groups="unit"
        )
        state = tx.init(params)
        return jax.jit(lambda u, x: tx.update(u, state, x)[0])

    def optimizer_fn(tx):
        @jax.jit
        def fn(p, s, g):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        return fn, tx.init(params)

    pair = (direction, params)
    unit = _median_ms(jax.jit(lambda u, x: jax.tree.map(jnp.add, u, x)), pair, args.steps)
    rows = [("one element-wise pass u + x (the unit)", unit)]

    def add(name, fn, fn_args=pair):
        rows.append((name, _median_ms(fn, fn_args, args.steps)))

    for n in (1, 3, 5):
        add(f"{n} per-group sum(s), separate", _grouped(_separate(n)))
    add("5 sums, one variadic lax.reduce", _grouped(_variadic))
    add("5 sums, reduction of the stacked products", _grouped(_stacked))
    add("rotational step, center=False", step_fn(False))
    add("rotational step, center=True", step_fn(True))
    for name, tx in (
        ("optax.adamw", optax.adamw(1e-3, weight_decay=0.1)),
        (
            "rv_adamw, center=False",
            osp.rv_adamw(1e-3, weight_decay=0.1, center=False, groups="unit"),
        ),
        ("rv_adamw, center=True", osp.rv_adamw(1e-3, weight_decay=0.1, groups="unit")),
    ):
        fn, state = optimizer_fn(tx)
        add(f"{name}: update + apply_updates", fn, (params, state, direction))

    print(f"device: {jax.devices()[0].device_kind}, median of {args.steps} runs")
    print(f"{'':<48}{'ms':>8}{'passes':>8}")
    for name, ms in rows:
        print(f"{name:<48}{ms:>8.2f}{ms / unit:>8.2f}")


if __name__ == "__main__":
    main()
