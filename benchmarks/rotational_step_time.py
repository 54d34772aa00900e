"""Step time and state memory of the rotational variants against their optax base.

A ResNet-18-sized parameter tree in Flax layout (11.7M parameters: conv kernels and the
classifier kernel grouped per output unit, BatchNorm scales/biases and the classifier bias
ungrouped). One step is ``update`` + ``apply_updates`` in one jitted function with donated
buffers; the two optimizers of a pair are timed alternately (interleaved, so that machine
load affects both alike) and the ratio of the medians is reported, with the extra state.

    python benchmarks/rotational_step_time.py [--steps 50] [--pairs rv_adamw rv_sgdm rv_lion]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sphere as osp
from optax_sphere.experiments.trees import make_tree, resnet18_shapes


def resnet18_params(seed: int = 0) -> dict:
    """The ResNet-18 tree of ``bench.py`` (11.7M parameters), random values."""
    return make_tree(resnet18_shapes(), seed, scale=0.05)


PAIRS = {
    "rv_adamw": (
        lambda: osp.rv_adamw(1e-3, weight_decay=1e-2, groups="unit"),
        lambda: optax.adamw(1e-3, weight_decay=1e-2),
    ),
    "rv_sgdm": (
        lambda: osp.rv_sgdm(0.1, 0.9, weight_decay=5e-4, groups="unit"),
        lambda: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)),
    ),
    "rv_lion": (
        lambda: osp.rv_lion(1e-4, weight_decay=1.0, groups="unit"),
        lambda: optax.lion(1e-4, weight_decay=1.0),
    ),
}


def _stepper(tx, params):
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step, donate_argnums=(0, 1)), tx.init(params)


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def time_pair(name: str, steps: int) -> dict:
    params = resnet18_params()
    grads = jax.tree.map(lambda p: 1e-3 * jnp.cos(p * 7.0), params)
    runs = []
    for make in PAIRS[name]:
        step, state = _stepper(make(), params)
        p = jax.tree.map(jnp.copy, params)
        runs.append([step, p, state, [], _nbytes(state)])
    for run in runs:  # compile and warm up
        for _ in range(3):
            run[1], run[2] = run[0](run[1], run[2], grads)
        jax.block_until_ready(run[1])
    for _ in range(steps):
        for run in runs:
            t = time.perf_counter()
            run[1], run[2] = run[0](run[1], run[2], grads)
            jax.block_until_ready(run[1])
            run[3].append(time.perf_counter() - t)
    groups = jax.tree.leaves(
        jax.tree.map(
            lambda g, p: 0 if g is None else int(np.prod(g.scalar_shape(p.shape))),
            osp.resolve_groups("unit", params),
            params,
            is_leaf=lambda g: g is None,
        )
    )
    ours, base = (statistics.median(r[3]) for r in runs)
    return {
        "pair": name,
        "ours_ms": 1e3 * ours,
        "base_ms": 1e3 * base,
        "time_ratio": ours / base,
        "extra_state_bytes": runs[0][4] - runs[1][4],
        "groups": sum(groups),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--pairs", nargs="+", default=sorted(PAIRS), choices=sorted(PAIRS))
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, {args.steps} interleaved steps, median")
    for name in args.pairs:
        r = time_pair(name, args.steps)
        print(
            f"{r['pair']:9s} {r['ours_ms']:8.2f} ms vs base {r['base_ms']:8.2f} ms: "
            f"x{r['time_ratio']:.2f} time; extra state {r['extra_state_bytes']} B "
            f"= {r['extra_state_bytes'] / (4 * r['groups']):.3f} float32 per group "
            f"({r['groups']} groups)"
        )


if __name__ == "__main__":
    main()
