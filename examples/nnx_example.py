"""optax_sphere with ``flax.nnx``: ``nnx.Optimizer``, groups found on the module, masks from them.

    python examples/nnx_example.py            # about a minute on CPU
    python examples/nnx_example.py --quick

A BatchNorm 1-D CNN on MNIST-1D (the data of the main job), written as an ``nnx.Module``, and
trained two ways:

1. ``adam_srt`` with the ``groups`` that ``optax_sphere.find_groups`` measures on the nnx
   module: the convolution kernels per filter (each is followed by BatchNorm), nothing
   elsewhere (the classifier, the norms' scales and biases).
2. ``optax.multi_transform``: SGD-MRT on the grouped kernels and optax's Adam on the rest,
   with labels read from the same groups, and coupled L2 on the kernels only through an
   ``optax.masked`` mask of the same kind.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_sphere
from optax_sphere.experiments.compare import load_mnist1d


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


def by_group(found: optax_sphere.FoundGroups, grouped, ungrouped):
    """A per-parameter tree (optax labels, masks) read from the groups found, as a callable of
    the parameter tree: ``nnx.Optimizer`` calls ``tx.init`` on ``nnx.state(model, wrt)``
    (``nnx.Param`` nodes) and ``tx.update`` on its pure arrays, and the groups are matched by
    path, so the same callable fits both."""

    def tree(params):
        specs = found.spec_for(params)
        return jax.tree.map(
            lambda s: ungrouped if s is None else grouped, specs, is_leaf=lambda s: s is None
        )

    return tree


def optimizers(total_steps: int, groups: optax_sphere.FoundGroups) -> dict:
    decay = {int(total_steps * f): 0.1 for f in (1 / 3, 5 / 9, 7 / 9)}
    adam_lr = optax.piecewise_constant_schedule(3e-3, decay)
    sgd_lr = optax.piecewise_constant_schedule(0.3, decay)
    labels = by_group(groups, "filters", "rest")
    kernels = by_group(groups, True, False)
    return {
        "adam_srt, groups found on the nnx model": optax_sphere.adam_srt(
            adam_lr, b2=0.99, weight_decay=1e-3 / 128, groups=groups
        ),
        "multi_transform: sgdm_rt on filters, adam on the rest": optax.multi_transform(
            {
                "filters": optax.chain(
                    optax.masked(optax.add_decayed_weights(3.125e-5), kernels),
                    optax_sphere.sgdm_rt(sgd_lr, 0.9, groups=groups),
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
    groups = optax_sphere.find_groups(CNN1D(rngs=nnx.Rngs(0)), jnp.asarray(x[:64]))
    print(groups, end="\n\n")
    for name, tx in optimizers(steps * args.epochs, groups).items():
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
