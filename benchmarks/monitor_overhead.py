"""Cost of recording the geometry: an optimizer step with and without ``monitor()``.

A ResNet-18-sized parameter tree in Flax layout (11.7M parameters; conv kernels grouped per
output filter). One step is ``update`` + ``apply_updates`` in one jitted function with donated
buffers; the variants are timed alternately (so machine load affects them alike) and the
medians are reported with the ratio to the bare optimizer and the size of the monitor's state.

    python benchmarks/monitor_overhead.py [--steps 30]
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


def conv_filters(params):
    # a synthetic tree (no model to measure with optax_sphere.find_groups): the conv kernels
    return jax.tree.map(lambda p: "unit" if p.ndim == 4 else None, params)


VARIANTS = {
    "adamw": lambda: optax.adamw(1e-3, weight_decay=1e-2),
    "adamw + monitor": lambda: optax.chain(
        optax.adamw(1e-3, weight_decay=1e-2), osp.monitor(groups=conv_filters)
    ),
    "adamw + monitor(every=10)": lambda: optax.chain(
        optax.adamw(1e-3, weight_decay=1e-2), osp.monitor(groups=conv_filters, every=10)
    ),
    "monitored(adam + L2, adam_step_scale)": lambda: osp.monitored(
        optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3)),
        conv_filters,
        step_scale=osp.adam_step_scale(1e-3, groups=conv_filters),
    ),
    "adam + L2": lambda: optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    params = resnet18_params()
    grads = jax.tree.map(lambda p: 1e-3 * jnp.cos(p * 7.0), params)
    runs = {}
    for name, make in VARIANTS.items():
        tx = make()

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        state = tx.init(params)
        runs[name] = [jax.jit(step, donate_argnums=(0, 1)), jax.tree.map(jnp.copy, params), state]
        runs[name].append(sum(x.nbytes for x in jax.tree.leaves(state)))
        runs[name].append([])
    for run in runs.values():  # compile and warm up
        for _ in range(3):
            run[1], run[2] = run[0](run[1], run[2], grads)
        jax.block_until_ready(run[1])
    for _ in range(args.steps):
        for run in runs.values():
            t = time.perf_counter()
            run[1], run[2] = run[0](run[1], run[2], grads)
            jax.block_until_ready(run[1])
            run[4].append(time.perf_counter() - t)
    med = {name: statistics.median(run[4]) for name, run in runs.items()}
    base = {name: "adamw" for name in VARIANTS if name.startswith("adamw")}
    print(f"device: {jax.devices()[0].device_kind}, {args.steps} interleaved steps, median")
    for name, run in runs.items():
        ref = base.get(name, "adam + L2")
        print(
            f"{name:40s} {1e3 * med[name]:8.2f} ms  x{med[name] / med[ref]:.3f} vs {ref:10s} "
            f"state {run[3] / 2**20:7.2f} MiB"
        )


if __name__ == "__main__":
    main()
