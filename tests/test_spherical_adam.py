"""Adam-S/ST/SRT and SGD-MRT: fused aliases equal the chains of primitives, reduce to optax
without groups, accept schedules, and train a Flax BatchNorm network under jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_sphere as osp
from optax_sphere.groups import Group


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)))},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(16, 5))),
            "bias": jnp.asarray(rng.normal(size=5)),
        },
    }


def _trajectory(tx, params, steps=12):
    state, x = tx.init(params), params
    update = jax.jit(tx.update)
    for t in range(steps):
        g = jax.tree.map(lambda p, t=t: jnp.cos(3.0 * p + t) + 0.1 * p, x)
        u, state = update(g, state, x)
        x = optax.apply_updates(x, u)
    return x


def _assert_same(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _adam_s_chain(lr, wd, groups="unit"):
    return optax.chain(
        osp.coupled_weight_decay(wd),
        osp.scale_by_standardized_adam(0.9, 0.99, 1e-8, groups=groups),
        optax.scale_by_learning_rate(lr),
    )


CHAINS = {
    "adam_s": lambda: _adam_s_chain(1e-2, 1e-2),
    "adam_st": lambda: osp.transport_momentum(_adam_s_chain(1e-2, 1e-2), groups="unit"),
    "adam_srt": lambda: osp.rescale_transport_momentum(_adam_s_chain(1e-2, 1e-2), groups="unit"),
    "sgdm_rt": lambda: osp.rescale_transport_momentum(
        optax.chain(osp.coupled_weight_decay(1e-2), optax.sgd(0.05, momentum=0.9)), groups="unit"
    ),
}
ALIASES = {
    "adam_s": lambda: osp.adam_s(1e-2, 0.9, 0.99, 1e-8, 1e-2, groups="unit"),
    "adam_st": lambda: osp.adam_st(1e-2, 0.9, 0.99, 1e-8, 1e-2, groups="unit"),
    "adam_srt": lambda: osp.adam_srt(1e-2, 0.9, 0.99, 1e-8, 1e-2, groups="unit"),
    "sgdm_rt": lambda: osp.sgdm_rt(0.05, 0.9, 1e-2, groups="unit"),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_fused_alias_equals_chain_of_primitives(name):
    with jax.enable_x64(True):
        params = _params()
        _assert_same(
            _trajectory(ALIASES[name](), params), _trajectory(CHAINS[name](), params), 1e-11
        )


def test_without_groups_adam_family_is_optax_adam():
    params = _params(1)
    ref = optax.chain(optax.add_decayed_weights(1e-2), optax.adam(1e-2, 0.9, 0.99, 1e-8))
    for alias in (osp.adam_s, osp.adam_st, osp.adam_srt):
        _assert_same(
            _trajectory(alias(1e-2, 0.9, 0.99, 1e-8, 1e-2, groups=None), params),
            _trajectory(ref, params),
            1e-6,
        )


def test_without_groups_sgdm_rt_is_optax_sgd_momentum():
    params = _params(2)
    ref = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.05, momentum=0.9))
    _assert_same(
        _trajectory(osp.sgdm_rt(0.05, 0.9, 1e-2, groups=None), params),
        _trajectory(ref, params),
        1e-6,
    )


@st.composite
def grads_and_group(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axes = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=1))))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return shape, axes, [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(4)]


@given(grads_and_group())
def test_scalar_second_moment_is_norm_of_adam_vector_moment(case):
    """Roburin et al. eq. 60: sqrt(v_k) = d^-1/2 || sqrt(v_vector_k) ||."""
    shape, axes, grads = case
    s = osp.scale_by_standardized_adam(0.9, 0.99, groups={"w": axes})
    a = optax.scale_by_adam(0.9, 0.99)
    ss, sa = s.init({"w": grads[0]}), a.init({"w": grads[0]})
    for g in grads:
        _, ss = s.update({"w": g}, ss)
        _, sa = a.update({"w": g}, sa)
    d = Group(axes).size(shape)
    expected = jnp.sqrt(jnp.sum(sa.nu["w"], axis=axes, keepdims=True)) / np.sqrt(d)
    np.testing.assert_allclose(
        np.sqrt(osp.grouped_state(ss).nu["w"]), expected, rtol=1e-5, atol=1e-7
    )


def test_state_is_one_momentum_buffer_plus_scalars_per_group():
    params = {"w": jnp.ones((3, 3, 64, 128)), "b": jnp.ones(128)}
    adam_bytes = sum(x.nbytes for x in jax.tree.leaves(optax.adam(1e-3).init(params)))
    for alias in (osp.adam_s, osp.adam_st, osp.adam_srt):
        nbytes = sum(x.nbytes for x in jax.tree.leaves(alias(groups="unit").init(params)))
        assert nbytes < 0.51 * adam_bytes


@pytest.mark.parametrize("alias", [osp.adam_s, osp.adam_st, osp.adam_srt, osp.sgdm_rt])
def test_learning_rate_schedule_is_followed(alias):
    params = _params(3)
    schedule = optax.piecewise_constant_schedule(1e-2, {3: 0.0})
    tx = alias(learning_rate=schedule, groups="unit")
    state, x = tx.init(params), params
    for t in range(6):
        g = jax.tree.map(lambda p, t=t: jnp.sin(p + t), x)
        u, state = tx.update(g, state, x)
        moved = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(u))
        assert (moved > 0) if t < 3 else (moved == 0)
        x = optax.apply_updates(x, u)


@pytest.mark.parametrize("alias", [osp.adam_s, osp.adam_st, osp.adam_srt, osp.sgdm_rt])
def test_invalid_hyperparameters_fail_at_build(alias):
    with pytest.raises(ValueError, match="learning_rate"):
        alias(learning_rate=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        alias(weight_decay=float("nan"))


class BNConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        for features in (8, 16):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(3)(x)


def test_adam_srt_trains_a_flax_batchnorm_network_under_jit_without_host_sync():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(64, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=64))
    images = images + labels[:, None, None, None].astype(jnp.float32)  # learnable signal
    model = BNConvNet()
    variables = model.init(jax.random.key(0), images, train=True)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = osp.adam_srt(1e-2, weight_decay=1e-4, groups="unit")
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
        for _ in range(40):
            params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state)
            losses.append(loss)
    losses = [float(v) for v in losses]
    assert losses[-1] < 0.5 * losses[0]
