"""Draws the figures of the documentation with the library's own geometry functions.

    python docs/make_figures.py            # writes docs/_static/figures/*.png

1. ``groups.png``: the leaves of a small Flax BatchNorm CNN and how the default
   ``groups=per_unit`` splits them into radially invariant groups (from
   :func:`optax_sphere.resolve_groups` on the real parameter tree).
2. ``angular_updates.png``: per layer, the mean angular update per step
   (:func:`optax_sphere.geometry.angle`, seed 002 eq. 5) and the mean weight norm of the conv
   filters while training the CNN on scikit-learn's digits with Adam, Adam + L2, AdamW and
   Adam-SRT, with the rotational equilibrium of AdamW predicted by seed 002 table 1 (dashed).
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import optax_sphere as osp  # noqa: E402
from optax_sphere import geometry  # noqa: E402
from optax_sphere.groups import group_sq_norm, path_str  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_static", "figures")

LR, WD, L2, B1 = 3e-3, 1.0, 1e-2, 0.9  # AdamW: lr * wd = 3e-3, equilibrium in a few hundred steps


class CNN(nn.Module):
    """Three conv + BatchNorm blocks and a dense head: every conv filter is radially invariant."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        for features in (16, 32, 32):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


OPTIMIZERS = {
    "optax.adam": lambda: optax.adam(LR),
    "optax.adam + L2": lambda: optax.chain(optax.add_decayed_weights(L2), optax.adam(LR)),
    "optax.adamw": lambda: optax.adamw(LR, b1=B1, weight_decay=WD),
    "optax_sphere.adam_srt + L2": lambda: osp.adam_srt(LR, b1=B1, weight_decay=L2),
}


def groups_figure(path: str) -> None:
    model = CNN()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    params = variables["params"]
    groups = osp.resolve_groups(osp.per_unit, params)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    spec = jax.tree.leaves(groups, is_leaf=lambda g: g is None or isinstance(g, osp.Group))

    fig, ax = plt.subplots(figsize=(9.5, 0.55 * len(leaves) + 0.9))
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.5, len(leaves) - 0.3)
    ax.axis("off")
    cmap = plt.get_cmap("tab20")
    for row, ((p, leaf), g) in enumerate(zip(leaves, spec)):
        y = len(leaves) - 1 - row
        name = path_str(p)
        ax.text(0, y, name, va="center", family="monospace", fontsize=9)
        ax.text(3.3, y, str(tuple(leaf.shape)), va="center", family="monospace", fontsize=9)
        if g is None:
            ax.add_patch(plt.Rectangle((5.0, y - 0.3), 4.0, 0.6, color="0.85"))
            ax.text(
                7.0, y, "not grouped: plain base optimizer", ha="center", va="center", fontsize=8
            )
            continue
        n = int(np.prod(g.scalar_shape(leaf.shape)))
        d = g.size(leaf.shape)
        shown = min(n, 32)
        width = 4.0 / shown
        for i in range(shown):
            ax.add_patch(
                plt.Rectangle((5.0 + i * width, y - 0.3), width * 0.9, 0.6, color=cmap(i % 20))
            )
        more = "" if shown == n else f" (first {shown} shown)"
        ax.text(9.1, y, f"{n} groups of d={d}{more}", va="center", fontsize=8)
        if name.startswith("Dense"):
            ax.text(
                9.1,
                y - 0.32,
                "no norm after it: exclude it",
                va="center",
                fontsize=8,
                color="tab:red",
            )
    ax.text(0, len(leaves) - 0.25, "leaf", weight="bold", fontsize=9)
    ax.text(3.3, len(leaves) - 0.25, "shape", weight="bold", fontsize=9)
    ax.text(
        5.0,
        len(leaves) - 0.25,
        "groups=per_unit: one box per group (one output unit)",
        weight="bold",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_data():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    return x, digits.target.astype(np.int32)


def train(make_tx, steps: int, batch: int = 64, seed: int = 0):
    """Returns per-layer arrays (steps,) of the mean angular update and mean filter norm."""
    x_all, y_all = load_data()
    model, tx = CNN(), make_tx()
    variables = model.init(jax.random.key(seed), jnp.asarray(x_all[:1]))
    params, stats = variables["params"], variables["batch_stats"]
    groups = osp.resolve_groups(osp.per_unit, params)
    opt_state = tx.init(params)

    def per_layer(fn, *trees):
        out = jax.tree.map(
            lambda g, *xs: None if g is None else fn(g, *xs),
            groups,
            *trees,
            is_leaf=lambda g: g is None or isinstance(g, osp.Group),
        )
        return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(out)[0]}

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, new = model.apply(
                {"params": p, "batch_stats": stats}, x, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        angles = per_layer(lambda g, a, b: geometry.angle(a, b, g).mean(), params, new_params)
        norms = per_layer(lambda g, a: jnp.sqrt(group_sq_norm(a, g)).mean(), new_params)
        return new_params, new["batch_stats"], opt_state, angles, norms

    rng = np.random.default_rng(seed)
    angles, norms = [], []
    for _ in range(steps):
        idx = rng.integers(0, len(x_all), batch)
        params, stats, opt_state, a, n = step(params, stats, opt_state, x_all[idx], y_all[idx])
        angles.append(a)
        norms.append(n)
    layers = [k for k in angles[0] if k.startswith("Conv")]
    return {k: np.array([float(a[k]) for a in angles]) for k in layers}, {
        k: np.array([float(n[k]) for n in norms]) for k in layers
    }


def smooth(v: np.ndarray, width: int = 15) -> np.ndarray:
    return np.convolve(v, np.ones(width) / width, mode="valid")


def angular_figure(path: str, steps: int) -> None:
    runs = {name: train(make, steps) for name, make in OPTIMIZERS.items()}
    layers = list(next(iter(runs.values()))[0])
    prediction = np.sqrt(2 * LR * WD * (1 - B1) / (1 + B1))
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 6.6), sharex=True)
    colors = dict(zip(runs, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for j, layer in enumerate(layers):
        for name, (angles, norms) in runs.items():
            axes[0, j].plot(smooth(angles[layer]), color=colors[name], label=name, lw=1.3)
            axes[1, j].plot(norms[layer], color=colors[name], label=name, lw=1.3)
        axes[0, j].axhline(
            prediction, color="k", ls="--", lw=1, label="AdamW equilibrium (Kosson et al. tab. 1)"
        )
        axes[0, j].set_title(layer)
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("step")
    axes[0, 0].set_ylabel("mean angular update per step (rad)")
    axes[1, 0].set_ylabel("mean filter norm $r$")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"BatchNorm CNN on scikit-learn digits, lr={LR}; AdamW weight decay {WD}; "
        f"coupled L2 {L2} for Adam + L2 and adam_srt",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    groups_figure(os.path.join(args.out, "groups.png"))
    angular_figure(os.path.join(args.out, "angular_updates.png"), args.steps)
    print(f"wrote {args.out}/groups.png and {args.out}/angular_updates.png")


if __name__ == "__main__":
    main()
