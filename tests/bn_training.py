"""A tiny Flax BatchNorm convnet trained under ``jax.jit``: the smoke test every alias passes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class BNConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        for features in (8, 16):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(3)(x)


def train(tx: optax.GradientTransformation, steps: int = 40) -> tuple[list[float], dict]:
    """Full-batch training of :class:`BNConvNet` on a learnable toy task; returns the losses
    and the final params. The jitted step runs with host transfers disallowed."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(64, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=64))
    images = images + labels[:, None, None, None].astype(jnp.float32)
    model = BNConvNet()
    variables = model.init(jax.random.key(0), images, train=True)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    def loss_fn(p, stats):
        logits, new = model.apply(
            {"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new

    @jax.jit
    def train_step(p, stats, s):
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, stats)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), new["batch_stats"], s, loss

    jaxpr = str(jax.make_jaxpr(tx.update)(params, opt_state, params))
    assert "callback" not in jaxpr  # no host round trip inside update
    losses = []
    with jax.transfer_guard("disallow"):
        for _ in range(steps):
            params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state)
            losses.append(loss)
    return [float(v) for v in losses], params
