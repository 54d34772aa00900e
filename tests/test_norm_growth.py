"""AdamP / SGDP: the projection, its per-unit then per-layer test, wd_ratio, the Nesterov
variants against a direct NumPy transcription of Heo et al.'s algorithms, BN training.

The float64 reference trajectories (`adamp`, `sgdp`) are checked in
test_reference_trajectories.py."""

import bn_training
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import float32_bound

import optax_sphere as osp


def _unit_axes(x):
    return tuple(range(x.ndim - 1))


def _np_projection(x, g, p, delta, eps):
    """Returns (projected p, projected?) following Heo et al. alg. 1-2 (per unit, then layer)."""
    for axes in (_unit_axes(x), tuple(range(x.ndim))):
        gx = np.sum(g * x, axis=axes, keepdims=True)
        norms = np.sqrt(
            np.sum(g * g, axis=axes, keepdims=True) * np.sum(x * x, axis=axes, keepdims=True)
        )
        cos = np.abs(gx) / np.maximum(norms, eps)
        d = int(np.prod([x.shape[a] for a in axes]))
        if cos.max() < delta / np.sqrt(d):
            xn = x / (np.sqrt(np.sum(x * x, axis=axes, keepdims=True)) + eps)
            return p - xn * np.sum(xn * p, axis=axes, keepdims=True), True
    return p, False


def _np_run(
    kind, params, grads, lr, wd, delta, wd_ratio, nesterov, b1=0.9, b2=0.999, mu=0.9, eps=1e-8
):
    x = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(val) for k, val in x.items()}
    for t, grad in enumerate(grads, start=1):
        for k in x:
            g = np.asarray(grad[k], np.float64)
            if kind == "adamp":
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                denom = np.sqrt(v[k]) / np.sqrt(1 - b2**t) + eps
                p = (b1 * m[k] + (1 - b1) * g if nesterov else m[k]) / denom
                step = lr / (1 - b1**t)
                decay = lr * wd
            else:
                m[k] = mu * m[k] + g
                p = g + mu * m[k] if nesterov else m[k]
                step, decay = lr, lr * wd / (1 - mu)
            ratio = 1.0
            if x[k].ndim > 1:
                p_new, hit = _np_projection(x[k], g, p, delta, eps)
                if kind == "sgdp" and not nesterov:
                    m[k] = p_new  # in-place projection of the buffer
                p, ratio = p_new, (wd_ratio if hit else 1.0)
            x[k] = x[k] * (1 - decay * ratio) - step * p
    return x


def _problem(seed, steps=8):
    rng = np.random.default_rng(seed)
    params = {"k": rng.normal(size=(3, 4, 6)), "b": rng.normal(size=6)}
    grads = []
    x = params["k"]
    for t in range(steps):
        a = rng.normal(size=x.shape)
        u = x / np.linalg.norm(x.reshape(-1, 6), axis=0)
        tangent = a - np.sum(a * u, axis=(0, 1), keepdims=True) * u
        # alternate between tangent gradients (projected) and generic ones (not projected)
        grads.append({"k": tangent if t % 3 else a, "b": rng.normal(size=6)})
    return params, grads


def _jax_run(tx, params, grads):
    x = jax.tree.map(jnp.asarray, params)
    state = tx.init(x)
    update = jax.jit(tx.update)
    # the NumPy reference recomputes nothing from x, so feed the same gradients
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state, x)
        x = optax.apply_updates(x, u)
    return x


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_matches_numpy_transcription_of_the_algorithm(kind, nesterov):
    with jax.enable_x64(True):
        params, grads = _problem(0)
        lr, wd = (1e-2, 1e-2) if kind == "adamp" else (0.1, 1e-3)
        ref = _np_run(kind, params, grads, lr, wd, 0.1, 0.1, nesterov)
        alias = osp.adamp if kind == "adamp" else osp.sgdp
        out = _jax_run(
            alias(lr, weight_decay=wd, delta=0.1, wd_ratio=0.1, nesterov=nesterov, groups="unit"),
            params,
            grads,
        )
        for k in ref:
            np.testing.assert_allclose(np.asarray(out[k]), ref[k], rtol=1e-11, atol=1e-13)


def _projection_update(g, x, p, weight_decay=0.0):
    params, grads = {"w": x}, {"w": g}
    # an inner transformation whose direction is p, whatever the gradient (on the leaves it
    # sees: a leaf of the other part of the partition is a MaskedNode)
    inner = optax.GradientTransformation(
        lambda _: optax.EmptyState(),
        lambda u, s, params=None: (jax.tree.map(lambda _: p, u), s),
    )
    tx = osp.scale_invariant_projection(
        inner, delta=0.1, wd_ratio=0.5, weight_decay=weight_decay, groups="unit"
    )
    state = tx.init(params)
    out, _ = tx.update(grads, state, params)
    return out["w"]


def test_tangent_gradient_projects_per_unit_and_scales_weight_decay():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.normal(size=(5, 4)))
        u = x / jnp.linalg.norm(x, axis=0)
        a = jnp.asarray(rng.normal(size=(5, 4)))
        g = a - jnp.sum(a * u, axis=0) * u  # tangent per unit: cos = 0
        p = jnp.asarray(rng.normal(size=(5, 4)))
        out = _projection_update(g, x, p)
        # per unit, to the float32 rounding of a sum of 5 products of size |out| |x|
        scale = float(jnp.max(jnp.sum(jnp.abs(out * x), axis=0)))
        np.testing.assert_allclose(
            jnp.sum(out * x, axis=0), 0.0, atol=scale * float32_bound(length=5)
        )
        with_wd = _projection_update(g, x, p, weight_decay=0.2)
        np.testing.assert_allclose(with_wd - out, 0.5 * 0.2 * x, rtol=1e-12)  # wd * wd_ratio


def test_layer_test_applies_when_only_the_whole_leaf_is_radial_free():
    """Radial parts that cancel across units fail the per-unit test but pass the layer one:
    the update is then orthogonal to the whole leaf, not to each unit."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        x = jnp.asarray(rng.normal(size=(50, 4)))
        u = x / jnp.linalg.norm(x, axis=0)
        n = jnp.linalg.norm(x, axis=0)
        a = jnp.asarray(rng.normal(size=(50, 4)))
        g = a - jnp.sum(a * u, axis=0) * u
        # <g, x> = +5, -5, 0, 0 per unit: the unit test fails (cos ~ 0.1 > 0.1 / sqrt(50)),
        # the layer sum is 0 so the layer test passes
        g = g + jnp.array([5.0, -5.0, 0.0, 0.0]) / n**2 * x
        p = jnp.asarray(rng.normal(size=(50, 4)))
        out = _projection_update(g, x, p)
        np.testing.assert_allclose(jnp.sum(out * x), 0.0, atol=1e-7)
        assert float(jnp.max(jnp.abs(jnp.sum(out * x, axis=0)))) > 1e-3


def test_radial_gradient_is_not_projected_and_keeps_full_weight_decay():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    p = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    out = _projection_update(x, x, p, weight_decay=0.2)  # gradient along the weights
    np.testing.assert_allclose(out, p + 0.2 * x, rtol=1e-6)


def test_zero_weights_and_zero_gradients_stay_finite():
    tx = osp.adamp(1e-2, weight_decay=1e-2, groups="unit")
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    state = tx.init(params)
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(u))


def test_schedules_and_inject_hyperparams():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    grads = {"w": jnp.full((3, 4), 0.1), "b": jnp.full(4, 0.1)}
    for tx in (
        osp.adamp(
            optax.cosine_decay_schedule(1e-2, 10), weight_decay=lambda c: 1e-2, groups="unit"
        ),
        optax.inject_hyperparams(osp.adamp)(learning_rate=1e-2, weight_decay=1e-2, groups="unit"),
        optax.inject_hyperparams(osp.sgdp)(learning_rate=0.1, weight_decay=1e-3, groups="unit"),
    ):
        state = tx.init(params)
        u, state = jax.jit(tx.update)(grads, state, params)
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(u))


@pytest.mark.parametrize(
    "build",
    [
        lambda: osp.adamp(learning_rate=-1.0, groups="unit"),
        lambda: osp.adamp(b1=1.5, groups="unit"),
        lambda: osp.sgdp(momentum=1.0, groups="unit"),
        lambda: osp.sgdp(delta=-0.1, groups="unit"),
        lambda: osp.adamp(wd_ratio=float("nan"), groups="unit"),
    ],
)
def test_invalid_hyperparameters_fail_at_build(build):
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize(
    "alias",
    [
        lambda: osp.adamp(1e-2, weight_decay=1e-4, groups="unit"),
        lambda: osp.sgdp(0.1, weight_decay=1e-4, groups="unit"),
    ],
)
def test_trains_a_flax_batchnorm_network_under_jit(alias):
    losses, _ = bn_training.train(alias())
    assert losses[-1] < 0.5 * losses[0]
