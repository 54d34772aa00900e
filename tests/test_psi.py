"""PSI-SGD(M): metric scaling, Theorem 1 of Yi et al., the overflow safeguard, BN training."""

import bn_training
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sphere as osp


def _params(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": jnp.asarray(scale * rng.normal(size=(3, 3, 4, 8)))},
        "dense": {
            "kernel": jnp.asarray(scale * rng.normal(size=(16, 5))),
            "bias": jnp.asarray(rng.normal(size=5)),
        },
    }


def _unit(x):
    axes = tuple(range(x.ndim - 1))
    return x / jnp.sqrt(jnp.sum(x * x, axes, keepdims=True))


def _invariant_loss(params):
    """A loss that depends on each kernel column only through its direction (like BatchNorm)."""
    conv = _unit(params["conv"]["kernel"])
    dense = _unit(params["dense"]["kernel"])
    bias = params["dense"]["bias"]
    return (
        jnp.sum(jnp.sin(2.0 * conv) * jnp.cos(conv[::-1]))
        + jnp.sum((dense - 0.1) ** 3)
        + jnp.sum((bias - 0.3) ** 2)
        + jnp.sum(bias * dense[:5].sum(0))
    )


_grad = jax.jit(jax.grad(_invariant_loss))


def _run(tx, params, steps):
    state, x, xs = tx.init(params), params, []
    update = jax.jit(tx.update)
    for _ in range(steps):
        u, state = update(_grad(x), state, x)
        x = optax.apply_updates(x, u)
        xs.append(x)
    return xs, state


def _assert_tree_close(a, b, rtol, atol=0.0):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def test_metric_scaling_is_squared_group_norm_times_gradient():
    params = _params()
    g = jax.tree.map(jnp.ones_like, params)
    out, _ = osp.scale_by_psi_metric(groups="unit").update(g, optax.EmptyState(), params)
    w = params["conv"]["kernel"]
    expected = jnp.sum(w * w, axis=(0, 1, 2), keepdims=True) * jnp.ones_like(w)
    np.testing.assert_allclose(out["conv"]["kernel"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["dense"]["bias"], g["dense"]["bias"])


@pytest.mark.parametrize("nesterov", [False, True])
def test_psi_sgdm_equals_metric_scaling_chained_with_optax_sgd(nesterov):
    with jax.enable_x64(True):
        params = _params(1)
        fused, _ = _run(
            osp.psi_sgdm(0.05, 0.9, nesterov=nesterov, max_norm=None, groups="unit"), params, 10
        )
        chain = optax.chain(
            osp.scale_by_psi_metric(groups="unit"), optax.sgd(0.05, momentum=0.9, nesterov=nesterov)
        )
        ref, _ = _run(chain, params, 10)
        _assert_tree_close(fused[-1], ref[-1], 1e-12)


def test_without_groups_psi_sgdm_is_optax_sgd():
    params = _params(2)
    fused, _ = _run(osp.psi_sgdm(0.05, 0.9, groups=None), params, 8)
    ref, _ = _run(optax.sgd(0.05, momentum=0.9), params, 8)
    _assert_tree_close(fused[-1], ref[-1], 1e-6, 1e-7)


@pytest.mark.parametrize("alias", ["psi_sgd", "psi_sgdm"])
def test_theorem_1_scale_equivalent_starts_stay_scale_equivalent(alias):
    """Yi et al. Theorem 1: iterates from W and T_a(W) satisfy W_hat_t = T_a(W_t), every t."""
    with jax.enable_x64(True):
        params = _params(3)
        rng = np.random.default_rng(4)
        a = {
            "conv": {"kernel": jnp.asarray(np.exp(rng.normal(size=(1, 1, 1, 8)) * 2))},
            "dense": {
                "kernel": jnp.asarray(np.exp(rng.normal(size=(1, 5)) * 2)),
                "bias": jnp.ones(5),
            },
        }
        scaled = jax.tree.map(lambda x, s: x * s, params, a)
        tx = getattr(osp, alias)(0.05, groups="unit")
        xs, _ = _run(tx, params, 15)
        xs_hat, _ = _run(tx, scaled, 15)
        for x, x_hat in zip(xs, xs_hat):
            _assert_tree_close(x_hat, jax.tree.map(lambda w, s: w * s, x, a), 1e-10)
        # the same learning rate without the metric does not keep the equivalence
        plain, _ = _run(optax.sgd(0.05, 0.9 if alias == "psi_sgdm" else None), params, 15)
        plain_hat, _ = _run(optax.sgd(0.05, 0.9 if alias == "psi_sgdm" else None), scaled, 15)
        gap = jnp.max(
            jnp.abs(_unit(plain_hat[-1]["conv"]["kernel"]) - _unit(plain[-1]["conv"]["kernel"]))
        )
        assert gap > 1e-3


def test_overflow_safeguard_renormalises_without_changing_directions():
    """A group above max_norm is scaled back with its momentum (T_a of Theorem 1): directions
    are those of the unguarded run, and the guarded norms stay bounded."""
    with jax.enable_x64(True):
        params = _params(5)
        params["conv"]["kernel"] = params["conv"]["kernel"].at[..., :3].multiply(1e5)
        guarded, state = _run(osp.psi_sgdm(0.05, 0.9, max_norm=1e4, groups="unit"), params, 12)
        free, free_state = _run(osp.psi_sgdm(0.05, 0.9, max_norm=None, groups="unit"), params, 12)
        for x, y in zip(guarded, free):
            for k in ("conv", "dense"):
                np.testing.assert_allclose(
                    _unit(x[k]["kernel"]), _unit(y[k]["kernel"]), rtol=1e-7, atol=1e-10
                )
        norms = jnp.sqrt(jnp.sum(guarded[-1]["conv"]["kernel"] ** 2, axis=(0, 1, 2)))
        free_norms = jnp.sqrt(jnp.sum(free[-1]["conv"]["kernel"] ** 2, axis=(0, 1, 2)))
        assert float(jnp.max(norms)) < 1e4
        assert float(jnp.min(free_norms[:3])) > 1e4
        # momentum scaled by the same factor as the weights
        ratio = norms / free_norms
        t = osp.grouped_state(state).trace["conv"]["kernel"]
        t_free = osp.grouped_state(free_state).trace["conv"]["kernel"]
        t_norm = jnp.sqrt(jnp.sum(t**2, axis=(0, 1, 2)))
        t_free_norm = jnp.sqrt(jnp.sum(t_free**2, axis=(0, 1, 2)))
        np.testing.assert_allclose(t_norm, ratio * t_free_norm, rtol=1e-8)


def test_psi_sgd_keeps_no_momentum_buffer_and_handles_degenerate_groups():
    tx = osp.psi_sgd(0.1, groups="unit")
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3), "s": jnp.zeros(())}
    state = tx.init(params)
    assert osp.grouped_state(state).trace == ()
    assert all(x.ndim == 0 for x in jax.tree.leaves(state))  # step counts only: no buffer
    g = {"w": jnp.ones((4, 3)), "b": jnp.ones(3), "s": jnp.ones(())}
    u, _ = tx.update(g, state, params)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(u))
    np.testing.assert_array_equal(u["w"], 0.0)  # zero group: ||w||^2 g = 0


def test_bf16_params_keep_float32_momentum():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params(6))
    tx = osp.psi_sgdm(0.05, groups="unit")
    state = tx.init(params)
    u, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert osp.grouped_state(state).trace["conv"]["kernel"].dtype == jnp.float32
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state))
    assert u["conv"]["kernel"].dtype == jnp.bfloat16


def test_schedules_and_inject_hyperparams():
    params = _params(7)
    sched = optax.linear_schedule(0.05, 0.0, 10)
    xs, _ = _run(osp.psi_sgdm(sched, 0.9, groups="unit"), params, 3)
    inj = optax.inject_hyperparams(osp.psi_sgdm)(learning_rate=0.05, momentum=0.9, groups="unit")
    ys, _ = _run(inj, params, 3)
    zs, _ = _run(osp.psi_sgdm(0.05, 0.9, groups="unit"), params, 3)
    _assert_tree_close(ys[-1], zs[-1], 1e-6)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(xs[-1]))


@pytest.mark.parametrize("kwargs", [{"learning_rate": -1.0}, {"momentum": 1.0}, {"max_norm": 0.0}])
def test_invalid_hyperparameters_fail_at_build(kwargs):
    with pytest.raises(ValueError):
        osp.psi_sgdm(**kwargs, groups="unit")


@pytest.mark.parametrize("alias", [osp.psi_sgd, osp.psi_sgdm])
def test_trains_a_flax_batchnorm_network_under_jit(alias):
    losses, _ = bn_training.train(alias(0.05, groups="unit"))
    assert losses[-1] < 0.5 * losses[0]
