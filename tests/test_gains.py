"""Learnable gains (Kosson et al. app. M, O): same outputs after folding, the kernel rotates at
fixed norm under an RV while the gain learns the magnitude (linen and nnx)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_sphere as osp
from optax_sphere.gains import NnxWithGain, WithGain, fold_gain, fold_gains


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = WithGain(nn.Conv(6, (3, 3), use_bias=False), name="conv")(x)
        x = nn.relu(x).mean((1, 2))
        return WithGain(nn.Dense(2, use_bias=False), use_bias=False, name="head")(x)


class _PlainNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), name="conv")(x)
        x = nn.relu(x).mean((1, 2))
        return nn.Dense(2, use_bias=False, name="head")(x)


def _randomised(params, seed=0):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [p + 0.5 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)]
    )


def test_linen_fold_gives_the_plain_layers_outputs():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 5, 3))
    params = _randomised(jax.jit(_Net().init)(jax.random.PRNGKey(0), x)["params"])
    folded = fold_gains(params)
    plain_shapes = jax.eval_shape(_PlainNet().init, jax.random.PRNGKey(0), x)["params"]
    assert jax.tree.structure(folded) == jax.tree.structure(plain_shapes)

    @jax.jit
    def outputs(params, folded):
        return _Net().apply({"params": params}, x), _PlainNet().apply({"params": folded}, x)

    gained, plain = outputs(params, folded)
    np.testing.assert_allclose(plain, gained, rtol=1e-5, atol=1e-5)
    single = fold_gain(params["conv"])
    np.testing.assert_allclose(
        single["kernel"], params["conv"]["layer"]["kernel"] * params["conv"]["gain"]
    )


def test_linen_rejects_a_biased_layer():
    with pytest.raises(ValueError, match="use_bias=False"):
        WithGain(nn.Dense(3)).init(jax.random.PRNGKey(0), jnp.ones((1, 2)))


def test_rv_rotates_kernel_at_fixed_norm_and_learns_gain():
    """The target needs a larger output scale: only the gain can provide it."""
    model = WithGain(nn.Dense(4, use_bias=False))
    x = jax.random.normal(jax.random.PRNGKey(2), (32, 8))
    target = 3.0 * x[:, :4]
    params = osp.center_groups(model.init(jax.random.PRNGKey(0), x)["params"], groups="unit")
    tx = osp.rv_adamw(0.1, weight_decay=0.1, groups="unit")

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(
            lambda p: jnp.mean((model.apply({"params": p}, x) - target) ** 2)
        )(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state, p = tx.init(params), params
    losses = []
    for _ in range(100):
        p, state, loss = step(p, state)
        losses.append(float(loss))
    k0, k = params["layer"]["kernel"], p["layer"]["kernel"]
    np.testing.assert_allclose(jnp.linalg.norm(k, axis=0), jnp.linalg.norm(k0, axis=0), rtol=1e-5)
    assert float(jnp.mean(jnp.abs(p["gain"]))) > 2.0  # the magnitude moved into the gain
    assert losses[-1] < 0.2 * losses[0]


def test_nnx_fold_and_training():
    rngs = nnx.Rngs(0)
    model = NnxWithGain(nnx.Linear(8, 4, use_bias=False, rngs=rngs))
    model.gain[...] = jnp.linspace(0.5, 2.0, 4)
    model.bias[...] = jnp.arange(4.0)
    x = jax.random.normal(jax.random.PRNGKey(3), (16, 8))
    folded = model.fold()
    assert isinstance(folded, nnx.Linear) and folded.bias is not None
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # the wrapped layer itself is untouched by fold
    np.testing.assert_allclose(model.layer(x) * model.gain[...] + model.bias[...], model(x))

    conv = NnxWithGain(nnx.Conv(3, 5, (3, 3), use_bias=False, rngs=rngs))
    conv.gain[...] = jnp.linspace(0.5, 2.0, 5)
    img = jax.random.normal(jax.random.PRNGKey(4), (2, 6, 6, 3))
    np.testing.assert_allclose(conv.fold()(img), conv(img), rtol=1e-5, atol=1e-5)

    # training with an RV through nnx.Optimizer: kernel norm fixed, gain learns
    graphdef, params = nnx.split(model, nnx.Param)
    params = osp.center_groups(params, groups="unit")
    nnx.update(model, params)
    norm0 = jnp.linalg.norm(model.layer.kernel[...], axis=0)
    optimizer = nnx.Optimizer(
        model, osp.rv_adamw(0.1, weight_decay=0.1, groups="unit"), wrt=nnx.Param
    )
    target = 3.0 * x[:, :4]

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    first = train_step(model, optimizer)
    for _ in range(40):
        loss = train_step(model, optimizer)
    np.testing.assert_allclose(jnp.linalg.norm(model.layer.kernel[...], axis=0), norm0, rtol=1e-5)
    assert loss < 0.3 * first
