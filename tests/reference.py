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

# reference_trajectories: the Roburin, Kosson and Heo families (four leaves);
# sphere_trajectories: Cho & Lee's SGD-G and Adam-G (the two kernels, unit norm per unit)
_FILES = ("reference_trajectories", "sphere_trajectories")
_ARRAYS = {k: v for name in _FILES for k, v in np.load(DATA / f"{name}.npz").items()}
#: the fixtures' hyperparameter names that differ from ours (the RV tracker's decay is the
#: authors' ``beta``)
_OUR_NAMES = {"beta": "rms_decay"}
HYPERPARAMETERS: dict[str, dict] = {
    problem: {_OUR_NAMES.get(k, k): v for k, v in hyper.items()}
    for name in _FILES
    for problem, hyper in json.loads((DATA / f"{name}.json").read_text()).items()
}
PROBLEMS = sorted(HYPERPARAMETERS)
#: the alias that a problem drives (``sgdg_clip``: ``sgdg`` with ``grad_clip``)
ALIAS = {problem: problem.removesuffix("_clip") for problem in PROBLEMS}


def field(problem: str, name: str, t: int | None = None) -> dict:
    """The parameter tree of ``PROBLEM/name`` (at step ``t`` for ``a`` and ``traj``)."""
    out: dict = {}
    for key, (module, leaf) in LEAVES.items():
        if f"{problem}/{name}/{key}" not in _ARRAYS:
            continue  # the sphere problems have the two kernels only
        value = _ARRAYS[f"{problem}/{name}/{key}"]
        out.setdefault(module, {})[leaf] = jnp.asarray(value if t is None else value[t])
    return out


def num_steps(problem: str) -> int:
    return int(_ARRAYS[f"{problem}/a/dense.kernel"].shape[0])


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
