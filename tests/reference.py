"""Drives optax_sphere optimizers against the reference trajectories in ``tests/data``.

The trajectories were produced by the authors' own PyTorch implementations in float64
(see ``tests/data/REFERENCE_TRAJECTORIES.md``). At each step the gradient is recomputed from
our own iterate: per output unit ``g = (a_t - <a_t,u> u) / ||x||`` for kernels (tangent and
-1 homogeneous, like a weight followed by BatchNorm), ``g = a_t`` for 1-D leaves.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

DATA = Path(__file__).parent / "data"
LEAVES = {
    "conv.kernel": ("conv", "kernel"),
    "dense.kernel": ("dense", "kernel"),
    "dense.bias": ("dense", "bias"),
    "bn.scale": ("bn", "scale"),
}

_ARRAYS = np.load(DATA / "reference_trajectories.npz")
HYPERPARAMETERS: dict[str, dict] = json.loads((DATA / "reference_trajectories.json").read_text())
PROBLEMS = sorted(HYPERPARAMETERS)


def field(problem: str, name: str, t: int | None = None) -> dict:
    """The parameter tree of ``PROBLEM/name`` (at step ``t`` for ``a`` and ``traj``)."""
    out: dict = {}
    for key, (module, leaf) in LEAVES.items():
        value = _ARRAYS[f"{problem}/{name}/{key}"]
        out.setdefault(module, {})[leaf] = jnp.asarray(value if t is None else value[t])
    return out


def num_steps(problem: str) -> int:
    return int(_ARRAYS[f"{problem}/a/dense.bias"].shape[0])


def gradient(params: dict, direction: dict) -> dict:
    def leaf(x, a):
        if x.ndim < 2:
            return a
        axes = tuple(range(x.ndim - 1))
        norm = jnp.sqrt(jnp.sum(x * x, axes, keepdims=True))
        u = x / norm
        return (a - jnp.sum(a * u, axes, keepdims=True) * u) / norm

    return jax.tree.map(leaf, params, direction)


def max_relative_error(a: dict, b: dict) -> float:
    return max(
        float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def run(problem: str, tx: optax.GradientTransformation, params: dict | None = None) -> list[float]:
    """Runs ``tx`` on the problem (float64 must be enabled); returns per-step max rel. error."""
    x = field(problem, "x_init") if params is None else params
    state = tx.init(x)
    step = jax.jit(tx.update)
    errors = []
    for t in range(num_steps(problem)):
        g = gradient(x, field(problem, "a", t))
        updates, state = step(g, state, x)
        x = optax.apply_updates(x, updates)
        errors.append(max_relative_error(x, field(problem, "traj", t)))
    return errors
