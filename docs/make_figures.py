"""Draws the figures of the documentation with the library's own diagnostics and plots.

    python docs/make_figures.py            # writes docs/_static/figures/*.png

1. ``groups.png``: the leaves of a small Flax BatchNorm CNN and how the default
   ``groups=per_unit`` splits them into radially invariant groups (from
   :func:`optax_sphere.resolve_groups` on the real parameter tree).
2. ``angular_updates.png``: the CNN trained on scikit-learn's digits with Adam, Adam + L2,
   AdamW, Adam-SRT and RV-AdamW; each step is measured by
   :func:`optax_sphere.geometry_stats` and recorded in a :class:`optax_sphere.History`, and
   :func:`optax_sphere.plots.geometry_figure` draws, per run, the angular update per step of
   each layer with the AdamW equilibrium of :func:`optax_sphere.theory.equilibrium` (dashed),
   the weight norms, and the angular updates of the individual filters of one layer.
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
from optax_sphere import (  # noqa: E402
    path_str,  # noqa: E402
    plots,
    theory,
)

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


def conv_filters(params):
    """Groups: one per filter of each conv kernel (followed by BatchNorm); nothing else: what
    ``optax_sphere.find_groups`` finds on this CNN, written out so that the figure shows the
    rule it applies."""

    def spec(path, p):
        return "unit" if path_str(path).startswith("Conv") and p.ndim > 1 else None

    return jax.tree_util.tree_map_with_path(spec, params)


OPTIMIZERS = {
    "optax.adam": lambda: optax.adam(LR),
    "optax.adam + L2": lambda: optax.chain(optax.add_decayed_weights(L2), optax.adam(LR)),
    "optax.adamw": lambda: optax.adamw(LR, b1=B1, weight_decay=WD),
    "adam_srt + L2": lambda: osp.adam_srt(LR, b1=B1, weight_decay=L2, groups=conv_filters),
    "rv_adamw": lambda: osp.rv_adamw(LR, weight_decay=WD, b1=B1, groups=conv_filters),
}
EQUILIBRIUM_RUNS = ("optax.adamw", "rv_adamw")  # runs whose target is AdamW's equilibrium


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


def train(make_tx, steps: int, batch: int = 64, seed: int = 0) -> osp.History:
    """Trains the CNN and records the geometry of every step of its conv filters."""
    x_all, y_all = load_data()
    model, tx = CNN(), make_tx()
    variables = model.init(jax.random.key(seed), jnp.asarray(x_all[:1]))
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, new = model.apply(
                {"params": p, "batch_stats": stats}, x, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (_, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        geometry = osp.geometry_stats(params, new_params, conv_filters)
        return new_params, new["batch_stats"], opt_state, geometry

    rng = np.random.default_rng(seed)
    history = osp.History()
    for k in range(steps):
        idx = rng.integers(0, len(x_all), batch)
        params, stats, opt_state, geometry = step(params, stats, opt_state, x_all[idx], y_all[idx])
        history.record(k, geometry)
    return history


def angular_figure(path: str, steps: int) -> None:
    histories = {name: train(make, steps) for name, make in OPTIMIZERS.items()}
    target = theory.equilibrium("adamw", learning_rate=LR, weight_decay=WD, dim=1, b1=B1)
    predictions = {name: target.angular_update for name in EQUILIBRIUM_RUNS}
    fig = plots.geometry_figure(
        histories, predictions=predictions, unit_layer="Conv_2/kernel", window=15
    )
    fig.suptitle(
        f"BatchNorm CNN on scikit-learn digits, lr={LR}: weight decay {WD} for AdamW and "
        f"RV-AdamW, coupled L2 {L2} for Adam + L2 and adam_srt\n"
        "dashed: the AdamW equilibrium angular update (Kosson et al. table 1)",
        fontsize=12,
    )
    fig.savefig(path, dpi=72)


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
