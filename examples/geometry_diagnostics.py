"""Watching the geometry of training: angular updates per layer against the equilibrium.

A BatchNorm CNN on scikit-learn's digits (ships with the package, no download) is trained
three times with a constant learning rate, with ``optax_sphere.monitor()`` at the end of the
chain recording, for every conv filter, the angular update per step (Kosson et al. eq. 5), the
weight norm and the terms of Roburin et al. theorem 2:

* ``AdamW`` (``optax.adamw``, decoupled weight decay): the dashed lines are the equilibrium
  of Kosson et al. table 1, ``sqrt(2 lr wd (1 - b1) / (1 + b1))``, the same for every filter;
* ``Adam+L2`` (``optax.adam`` after coupled L2): the dashed lines are the equilibrium of
  Kosson et al. app. I.2 (eq. 84 and 87), computed per layer from the RMS gradient norm at unit
  weight norm ``||w|| ||grad||`` measured over the second half of the run;
* ``Adam-SRT`` (``optax_sphere.adam_srt``, coupled L2 as in Roburin et al.): the papers give no
  equilibrium for it, so no dashed line is drawn.

The third panel of each row shows the individual filters of one layer: balanced rotation
(every filter at the same angular update) or imbalanced (Kosson et al. fig. 8).

    python examples/geometry_diagnostics.py --out geometry.png [--steps 2000] [--quick]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import optax_sphere as osp
from optax_sphere.theory import equilibrium

B1, B2 = 0.9, 0.999


class DigitsCNN(nn.Module):
    """Three conv + BatchNorm blocks (every conv filter is radially invariant) and a Dense
    classifier (scale-sensitive: not a group)."""

    @nn.compact
    def __call__(self, x, train: bool):
        for features, stride in ((16, 1), (32, 2), (32, 1)):
            x = nn.Conv(features, (3, 3), strides=stride, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def find_groups(x: np.ndarray, seed: int) -> osp.FoundGroups:
    """The radially invariant groups of the model, measured on a batch of the data: one per
    output filter of every conv kernel; the classifier is not a group."""
    model = DigitsCNN()
    variables = model.init(jax.random.key(seed), jnp.asarray(x[:1]), train=True)
    return osp.find_groups(model, variables, jnp.asarray(x[:64]), train=True)


def kernels(params):
    """Weight-decay mask: kernels only (not BatchNorm scales and biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizers(lr: float, wd: float, l2: float, groups: osp.FoundGroups):
    monitor = osp.monitor(groups=groups)
    return {
        "AdamW": optax.chain(optax.adamw(lr, B1, B2, weight_decay=wd, mask=kernels), monitor),
        "Adam+L2": optax.chain(
            optax.masked(optax.add_decayed_weights(l2), kernels), optax.adam(lr, B1, B2), monitor
        ),
        "Adam-SRT": optax.chain(osp.adam_srt(lr, B1, B2, weight_decay=l2, groups=groups), monitor),
    }


def load_data(seed: int):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random shifts by up to one pixel and pixel noise: the gradients stay stochastic
    after the small training set is fitted (the equilibrium of Kosson et al. assumes a noisy,
    stationary gradient)."""
    dy, dx = rng.integers(-1, 2, size=2)
    x = np.roll(x, (int(dy), int(dx)), axis=(1, 2))
    return (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)


def train(tx, data, *, seed: int, steps: int, batch: int, record_every: int):
    """Trains; returns the History, the test accuracy and, per conv layer, the mean over
    the second half of the run of ``(||w|| ||grad L(w)||)^2`` over filters."""
    (xtr, ytr), (xte, yte) = data
    model = DigitsCNN()
    variables = model.init(jax.random.key(seed), jnp.asarray(xtr[:1]), train=True)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, new = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)

        def unit_grad_sq(p, g):  # (||w|| ||g||)^2 per filter, averaged over filters
            if p.ndim != 4:
                return None
            return jnp.mean(jnp.sum(p * p, (0, 1, 2)) * jnp.sum(g * g, (0, 1, 2)))

        gsq = jax.tree.map(unit_grad_sq, params, grads)
        return optax.apply_updates(params, updates), new["batch_stats"], opt_state, loss, gsq

    history = osp.History()
    rng = np.random.default_rng(seed)
    gsq_sum, gsq_n = None, 0
    order, pos = rng.permutation(len(xtr)), 0
    for k in range(steps):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(xtr)), 0
        idx = order[pos : pos + batch]
        pos += batch
        x = augment(xtr[idx], rng)
        params, stats, opt_state, loss, gsq = step(params, stats, opt_state, x, ytr[idx])
        if k % record_every == 0 or k == steps - 1:
            history.record(k, opt_state)
        if k >= steps // 2:
            gsq_sum = gsq if gsq_sum is None else jax.tree.map(jnp.add, gsq_sum, gsq)
            gsq_n += 1
    logits = model.apply({"params": params, "batch_stats": stats}, xte, train=False)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == yte))
    gsq_mean = {
        osp.path_str(path): float(v) / gsq_n
        for path, v in jax.tree_util.tree_flatten_with_path(gsq_sum)[0]
    }
    return history, accuracy, float(loss), gsq_mean, params


def filter_dim(params, path: str) -> int:
    leaf = params
    for key in path.split("/"):
        leaf = leaf[key]
    return int(np.prod(leaf.shape[:-1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="geometry_diagnostics.png", help="figure (.png/.svg)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=2.0, help="AdamW decoupled weight decay")
    parser.add_argument("--l2", type=float, default=1e-2, help="L2 of Adam+L2 and Adam-SRT")
    parser.add_argument("--record-every", type=int, default=5)
    parser.add_argument("--window", type=int, default=10, help="moving average (records)")
    parser.add_argument("--unit-layer", type=int, default=0, help="conv layer of the unit panel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.record_every, args.window = 120, 2, 5

    data = load_data(args.seed)
    histories, predictions, norm_predictions = {}, {}, {}
    groups = find_groups(data[0][0], args.seed)
    print(groups, end="\n\n")
    for name, tx in make_optimizers(args.lr, args.wd, args.l2, groups).items():
        t0 = time.perf_counter()
        hist, acc, loss, gsq, params = train(
            tx,
            data,
            seed=args.seed,
            steps=args.steps,
            batch=args.batch,
            record_every=args.record_every,
        )
        histories[name] = hist
        pred, norm_pred = {}, {}
        for layer in hist.layers():
            dim = filter_dim(params, layer)
            if name == "AdamW":
                eq = equilibrium("adamw", learning_rate=args.lr, weight_decay=args.wd, dim=dim)
            elif name == "Adam+L2":
                eq = equilibrium(
                    "adam_l2",
                    learning_rate=args.lr,
                    weight_decay=args.l2,
                    dim=dim,
                    grad_norm=float(np.sqrt(gsq[layer])),
                )
            else:
                continue  # no published equilibrium for Adam-SRT
            pred[layer], norm_pred[layer] = eq.angular_update, eq.weight_norm
        predictions[name], norm_predictions[name] = pred or None, norm_pred or None
        print(
            f"{name}: {args.steps} steps in {time.perf_counter() - t0:.1f}s, "
            f"final batch loss {loss:.3f}, test accuracy {acc:.3f}"
        )
        tail = slice(len(hist) // 2, None)
        for layer in hist.layers():
            measured = np.mean(hist.series(layer, "angular_update")[tail])
            lo, _, hi = hist.unit_spread(layer)
            radial = np.max(np.abs(hist.series(layer, "radial_term", "max")))
            taylor = np.max(hist.series(layer, "taylor_term", "max"))
            expected = pred.get(layer)
            expected = "none" if expected is None else f"{expected:.4f}"
            print(
                f"  {layer:16s} angular update {measured:.4f} (prediction {expected}), "
                f"filters {lo:.4f}..{hi:.4f} (max/min {hi / lo:.2f}), "
                f"norm {np.mean(hist.series(layer, 'radius')[tail]):.3f} "
                f"(prediction {norm_pred.get(layer, float('nan')):.3f}), "
                f"max |A<c,u>| {radial:.1e}, max eta_e|c_perp| {taylor:.1e}"
            )
    unit_layer = histories["AdamW"].layers()[args.unit_layer]
    osp.plots.geometry_figure(
        histories,
        predictions=predictions,
        norm_predictions=norm_predictions,
        unit_layer=unit_layer,
        window=args.window,
        path=args.out,
    )
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
