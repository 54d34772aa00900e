"""Sharded training: a Flax BatchNorm MLP whose parameters and optimizer state are split over
devices (FSDP style), trained with an optax_sphere optimizer, and checked against the same
run on one device.

    python examples/sharded_training.py [--devices 8] [--steps 150] [--optimizer adam_srt]

On a CPU-only machine the devices are simulated (``--xla_force_host_platform_device_count``);
on a GPU or TPU host the real devices are used. Every kernel is split along its input axis,
which is a *group* axis of the per-unit groups: the per-group norms and inner products of the
optimizer then span several devices, and XLA inserts the cross-device sums. The batch is split
over the same devices (data parallelism). Nothing in the optimizer changes for this.
"""

from __future__ import annotations

import argparse
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
parser.add_argument("--steps", type=int, default=150)
parser.add_argument("--batch", type=int, default=128)
parser.add_argument("--optimizer", default="adam_srt", help="an optax_sphere alias")
parser.add_argument("--learning-rate", type=float, default=1e-3)
args = parser.parse_args()
if "jax" not in sys.modules:  # must be set before JAX starts
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import optax_sphere as osp  # noqa: E402


class Mlp(nn.Module):
    """Dense -> BatchNorm -> ReLU, twice, then a linear head: every hidden unit of the two
    normalised layers is radially invariant."""

    @nn.compact
    def __call__(self, x, train: bool):
        for width in (256, 256):
            x = nn.Dense(width, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x)


def fsdp_spec(leaf: jax.Array, n: int) -> P:
    """Split the first axis of every 2-D leaf over the mesh axis ``"fsdp"`` when it divides."""
    if leaf.ndim >= 2 and leaf.shape[0] % n == 0:
        return P("fsdp", *([None] * (leaf.ndim - 1)))
    return P()


def train(devices: list, steps: int) -> tuple[dict, list[float]]:
    mesh = Mesh(np.array(devices), ("fsdp",))
    n = len(devices)
    shard = lambda spec: NamedSharding(mesh, spec)  # noqa: E731

    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int32)

    model = Mlp()
    variables = model.init(jax.random.key(0), jnp.asarray(x_all[:2]), train=True)
    params = jax.device_put(
        variables["params"], jax.tree.map(lambda p: shard(fsdp_spec(p, n)), variables["params"])
    )
    stats = jax.device_put(variables["batch_stats"], shard(P()))
    tx = getattr(osp, args.optimizer)(learning_rate=args.learning_rate)
    opt_state = tx.init(params)  # sharded like the parameters (per-group scalars included)
    # The step counter is created on one device, as in optax: replicate it over the mesh.
    state_shardings = jax.tree.map(
        lambda a: a.sharding if isinstance(a.sharding, NamedSharding) else shard(P()), opt_state
    )
    opt_state = jax.device_put(opt_state, state_shardings)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    batch_sharding = shard(P("fsdp"))

    def loss_fn(params, stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    @jax.jit
    def train_step(params, stats, opt_state, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Keep the layout fixed from step to step (XLA would choose one otherwise).
        params = jax.lax.with_sharding_constraint(params, param_shardings)
        opt_state = jax.lax.with_sharding_constraint(opt_state, state_shardings)
        return params, stats, opt_state, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(x_all), args.batch)
        x = jax.device_put(x_all[idx], batch_sharding)
        y = jax.device_put(y_all[idx], batch_sharding)
        params, stats, opt_state, loss = train_step(params, stats, opt_state, x, y)
        losses.append(float(loss))
    return {"params": params, "opt_state": opt_state}, losses


def per_device_bytes(tree) -> tuple[int, int]:
    """(bytes held by the first device, total logical bytes) of a tree of arrays."""
    dev = jax.devices()[0]
    held = sum(
        s.data.nbytes
        for a in jax.tree.leaves(tree)
        for s in a.addressable_shards
        if s.device == dev
    )
    return held, sum(a.nbytes for a in jax.tree.leaves(tree))


def main() -> None:
    devices = jax.devices()[: args.devices]
    print(f"{len(devices)} devices ({devices[0].platform}), optimizer {args.optimizer}")
    sharded, losses = train(devices, args.steps)
    for name in ("params", "opt_state"):
        held, total = per_device_bytes(sharded[name])
        print(f"{name:>9}: {held / 1024:8.1f} KiB on device 0 of {total / 1024:8.1f} KiB in all")
    kernel = sharded["params"]["Dense_1"]["kernel"]
    print(f"Dense_1 kernel {kernel.shape} split as {kernel.sharding.spec}")
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")

    single, single_losses = train(devices[:1], args.steps)
    err = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
        for a, b in zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(single["params"]))
    )
    print(
        f"one device: last loss {single_losses[-1]:.4f}; "
        f"max relative difference of the parameters {err:.1e}"
    )


if __name__ == "__main__":
    main()
