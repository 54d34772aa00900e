"""Step time of the manifold optimizers against the optax optimizer each one extends.

A ResNet-18-sized parameter tree in Flax layout (11.7M parameters: conv kernels grouped per
output unit, BatchNorm scales/biases and the classifier bias ungrouped). Each optimizer step is
``update`` + ``apply_updates`` in one jitted function with donated buffers; the two optimizers
of a pair are timed alternately (interleaved) and the ratio of the medians is reported.

    python benchmarks/manifold_step_time.py [--steps 40] [--pairs psi_sgdm adamp ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import optax_sphere as osp
from optax_sphere.experiments.trees import make_tree, resnet18_shapes


def resnet18_params(seed: int = 0) -> dict:
    """The ResNet-18 tree of ``bench.py`` (11.7M parameters), random values."""
    return make_tree(resnet18_shapes(), seed, scale=0.05)


PAIRS = {
    "psi_sgdm": (
        lambda: osp.psi_sgdm(0.1, 0.9, groups="unit"),
        lambda: optax.sgd(0.1, momentum=0.9),
    ),
    "psi_sgd": (lambda: osp.psi_sgd(0.1, groups="unit"), lambda: optax.sgd(0.1)),
    "adamp": (
        lambda: osp.adamp(1e-3, weight_decay=1e-2, groups="unit"),
        lambda: optax.adamw(1e-3, weight_decay=1e-2),
    ),
    "sgdp": (
        lambda: osp.sgdp(0.1, 0.9, weight_decay=1e-4, groups="unit"),
        lambda: optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)),
    ),
    "sgdg": (lambda: osp.sgdg(0.2, 0.9, groups="unit"), lambda: optax.sgd(0.2, momentum=0.9)),
    "adamg": (lambda: osp.adamg(0.05, groups="unit"), lambda: optax.adam(0.05)),
    "adagradg": (lambda: osp.adagradg(0.7, 0.999, 1.0, groups="unit"), lambda: optax.adagrad(0.01)),
}


def _stepper(tx, params):
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step, donate_argnums=(0, 1)), tx.init(params)


def time_pair(name: str, steps: int) -> tuple[float, float]:
    params = resnet18_params()
    grads = jax.tree.map(lambda p: 1e-3 * jnp.cos(p * 7.0), params)
    runs = []
    for make in PAIRS[name]:
        p = jax.tree.map(jnp.copy, params)
        fn, state = _stepper(make(), p)
        p, state = fn(p, state, grads)  # compile
        jax.block_until_ready(p)
        runs.append([fn, p, state, []])
    for _ in range(steps):
        for run in runs:
            fn, p, state, times = run
            t0 = time.perf_counter()
            p, state = fn(p, state, grads)
            jax.block_until_ready((p, state))
            times.append(time.perf_counter() - t0)
            run[1], run[2] = p, state
    return statistics.median(runs[0][3]), statistics.median(runs[1][3])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", nargs="*", default=list(PAIRS))
    args = parser.parse_args()
    n = sum(x.size for x in jax.tree.leaves(resnet18_params()))
    print(f"{jax.devices()[0].platform}, {n / 1e6:.1f}M parameters, median of {args.steps} steps")
    print(f"{'alias':10s} {'ours ms':>9s} {'optax ms':>9s} {'ratio':>6s}  baseline")
    for name in args.pairs:
        ours, base = time_pair(name, args.steps)
        baseline = {
            "psi_sgdm": "optax.sgd(momentum)",
            "psi_sgd": "optax.sgd",
            "adamp": "optax.adamw",
            "sgdp": "add_decayed_weights+sgd(momentum)",
            "sgdg": "optax.sgd(momentum)",
            "adamg": "optax.adam",
            "adagradg": "optax.adagrad",
        }[name]
        print(f"{name:10s} {ours * 1e3:9.2f} {base * 1e3:9.2f} {ours / base:6.2f}  {baseline}")


if __name__ == "__main__":
    main()
