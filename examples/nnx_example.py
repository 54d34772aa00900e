"""optax_sphere with ``flax.nnx``: ``nnx.Optimizer``, groups and masks built from nnx state.

    python examples/nnx_example.py            # about a minute on CPU
    python examples/nnx_example.py --quick

The same BatchNorm 1-D CNN as ``compare.py`` on MNIST-1D, written as an ``nnx.Module``, and
trained two ways:

1. ``adam_srt`` with ``groups`` read from the nnx state by parameter path: ``"unit"`` for
   the convolution kernels (each filter is followed by BatchNorm), ``None`` elsewhere (the
   classifier, the norms' scales and biases).
2. ``optax.multi_transform``: SGD-MRT on the convolution kernels and optax's Adam on the rest,
   with labels built from the nnx state the same way, and coupled L2 on the kernels only
   through an ``optax.masked`` mask of the same kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare import load_mnist1d  # noqa: E402

import optax_sphere  # noqa: E402
from optax_sphere.groups import path_str  # noqa: E402


class CNN1D(nnx.Module):
    def __init__(self, width: int = 32, *, rngs: nnx.Rngs):
        self.convs = nnx.List(
            nnx.Conv(c, width, (k,), strides=(2,), use_bias=False, rngs=rngs)
            for c, k in ((1, 5), (width, 3), (width, 3))
        )
        self.norms = nnx.List(nnx.BatchNorm(width, momentum=0.9, rngs=rngs) for _ in range(3))
        self.head = nnx.Linear(5 * width, 10, rngs=rngs)

    def __call__(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = nnx.relu(norm(conv(x)))
        return self.head(x.reshape(x.shape[0], -1))


def is_conv_kernel(path, value) -> bool:
    return path[0] == "convs" and path[-1] == "kernel"


def by_path(fn):
    """A per-parameter spec as a callable of the parameter tree, ``fn(path, array)``.

    ``nnx.Optimizer`` calls ``tx.init`` on ``nnx.state(model, wrt)`` (``nnx.Param`` nodes) and
    ``tx.update`` on its pure arrays; a callable spec (like the default ``groups`` and optax
    masks) fits both, whereas a fixed tree would fit only one.
    """

    def key(k):
        return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))

    def spec(params):
        def leaf(path, value):
            names = tuple(key(k) for k in path)
            return fn(names[:-1] if names[-1] == "value" else names, value)

        return jax.tree_util.tree_map_with_path(leaf, params)

    return spec


FILTER_GROUPS = by_path(lambda p, v: "unit" if is_conv_kernel(p, v) else None)


def optimizers(total_steps: int) -> dict[str, optax.GradientTransformation]:
    decay = {int(total_steps * f): 0.1 for f in (1 / 3, 5 / 9, 7 / 9)}
    adam_lr = optax.piecewise_constant_schedule(3e-3, decay)
    sgd_lr = optax.piecewise_constant_schedule(0.3, decay)
    groups = FILTER_GROUPS
    labels = by_path(lambda p, v: "filters" if is_conv_kernel(p, v) else "rest")
    kernels = by_path(is_conv_kernel)
    return {
        "adam_srt, groups from the nnx state": optax_sphere.adam_srt(
            adam_lr, b2=0.99, weight_decay=1e-3 / 128, groups=groups
        ),
        "multi_transform: sgdm_rt on filters, adam on the rest": optax.multi_transform(
            {
                "filters": optax.chain(
                    optax.masked(optax.add_decayed_weights(3.125e-5), kernels),
                    optax_sphere.sgdm_rt(sgd_lr, 0.9),
                ),
                "rest": optax.adam(adam_lr, b2=0.99),
            },
            labels,
        ),
    }


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="2 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    data = load_mnist1d()
    (x, y), (xt, yt) = data["train"], data["test"]
    steps = len(x) // args.batch_size
    params = nnx.as_pure(nnx.state(CNN1D(rngs=nnx.Rngs(0)), nnx.Param))
    resolved = optax_sphere.resolve_groups(FILTER_GROUPS, params)
    grouped = [
        path_str(p) for p, g in jax.tree_util.tree_leaves_with_path(resolved) if g is not None
    ]
    print("radially invariant groups (per filter):", ", ".join(grouped))
    for name, tx in optimizers(steps * args.epochs).items():
        start = time.perf_counter()
        model = CNN1D(rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        rng = np.random.default_rng(0)
        model.train()
        for _ in range(args.epochs):
            order = rng.permutation(len(x))[: steps * args.batch_size]
            for idx in order.reshape(steps, args.batch_size):
                loss = train_step(model, optimizer, x[idx], y[idx])
        model.eval()
        acc = float(accuracy(model, xt, yt))
        print(
            f"{name:<55} final train loss {float(loss):.4f}  test accuracy {100 * acc:.2f}%  "
            f"({time.perf_counter() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
