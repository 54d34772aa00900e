"""Quick start: a BatchNorm CNN on scikit-learn's digits (ships with the package, no download),
trained with optax's Adam and SGD-momentum and with optax_sphere's Adam-S, Adam-SRT and SGD-MRT.

    python examples/quickstart.py [--epochs 8] [--seeds 2]
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


class DigitsCNN(nn.Module):
    """Two conv + BatchNorm blocks: every conv filter is radially invariant."""

    @nn.compact
    def __call__(self, x, train: bool):
        for features in (16, 32):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


OPTIMIZERS = {
    "optax.sgd(momentum=0.9)": lambda groups: optax.chain(
        optax.add_decayed_weights(5e-4), optax.sgd(0.1, 0.9)
    ),
    "optax.adam": lambda groups: optax.adam(1e-3),
    "adam_s": lambda groups: osp.adam_s(1e-3, weight_decay=1e-4, groups=groups),
    "adam_srt": lambda groups: osp.adam_srt(1e-3, weight_decay=1e-4, groups=groups),
    "sgdm_rt": lambda groups: osp.sgdm_rt(0.1, 0.9, weight_decay=5e-4, groups=groups),
}


def load_data(seed: int):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def train(make_tx, seed: int, epochs: int, batch: int = 64):
    (xtr, ytr), (xte, yte) = load_data(seed)
    model = DigitsCNN()
    variables = model.init(jax.random.key(seed), jnp.asarray(xtr[:1]), train=True)
    params, stats = variables["params"], variables["batch_stats"]
    # the radially invariant groups, measured on the model: each conv filter, not the head
    groups = osp.find_groups(model, variables, jnp.asarray(xtr[:64]), train=True)
    tx = make_tx(groups)
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
        return optax.apply_updates(params, updates), new["batch_stats"], opt_state, loss

    @jax.jit
    def accuracy(params, stats, x, y):
        logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(xtr))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            params, stats, opt_state, loss = step(params, stats, opt_state, xtr[idx], ytr[idx])
    return float(loss), float(accuracy(params, stats, xte, yte))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    print(f"{'optimizer':<26} {'final loss':>10} {'test acc (mean +- std)':>24} {'seconds':>8}")
    for name, make_tx in OPTIMIZERS.items():
        start = time.perf_counter()
        runs = [train(make_tx, seed, args.epochs) for seed in range(args.seeds)]
        accs = np.array([a for _, a in runs])
        loss = np.mean([v for v, _ in runs])
        print(
            f"{name:<26} {loss:>10.4f} {100 * accs.mean():>15.2f} +- {100 * accs.std():.2f} "
            f"{time.perf_counter() - start:>8.1f}"
        )


if __name__ == "__main__":
    main()
