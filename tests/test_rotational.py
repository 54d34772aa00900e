"""Rotational RMS control and the RVs (Kosson et al. app. M, alg. 1): the fused one-pass step
equals the algorithm line by line, norms and means are kept, the angular update is eta_r,
ungrouped leaves get the plain inner optimizer, and Flax LayerNorm / BatchNorm models train."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_approximately, assert_within, float32_bound

import optax_sphere as osp
from optax_sphere.theory import equilibrium


def _params(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), dtype)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(16, 5)), dtype),
            "bias": jnp.asarray(rng.normal(size=5), dtype),
        },
    }


def _grads(params, t):
    return jax.tree.map(lambda p: jnp.cos(3.0 * p + t) + 0.1 * p * t, params)


def _run(tx, params, steps=8, grads=_grads):
    """``steps`` steps of ``tx`` with gradients ``grads(x, t)``; all iterates and the state."""

    @jax.jit
    def step(x, state, t):
        u, state = tx.update(grads(x, t), state, x)
        return optax.apply_updates(x, u), state

    state, x = tx.init(params), params
    history = [x]
    for t in range(steps):
        x, state = step(x, state, t)
        history.append(x)
    return history, state


def _algorithm_1(x, directions, axes, *, eta_r, beta, eps, center):
    """Kosson et al. alg. 1 for one leaf, written line by line in numpy (float64)."""
    x = np.asarray(x, np.float64)

    def mean(a):
        return a.mean(axis=axes, keepdims=True) if center else 0.0

    def norm(a):
        return np.sqrt(np.sum(a * a, axis=axes, keepdims=True))

    n = norm(x - mean(x))
    q = np.zeros_like(n)
    out = []
    for t, u in enumerate(directions, start=1):
        u = np.asarray(u, np.float64)
        u = u - np.sum(u * x, axis=axes, keepdims=True) / n**2 * x  # line 10
        u = u - mean(u)
        q = beta * q + (1 - beta) * np.sum(u * u, axis=axes, keepdims=True)  # line 11
        x = x - eta_r * n * u / (np.sqrt(q / (1 - beta**t)) + eps)  # line 12
        x = n * (x - mean(x)) / norm(x - mean(x))  # line 13
        out.append(x)
    return out


@st.composite
def _leaf_and_axes(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(2, 4), min_size=ndim, max_size=ndim)))
    axes = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=1))))
    return shape, axes, draw(st.integers(0, 2**31 - 1)), draw(st.booleans())


@settings(max_examples=6)
@given(_leaf_and_axes())
def test_fused_step_equals_algorithm_1(case):
    """The one-pass closed form equals alg. 1 on uncentred params, any group axes."""
    shape, axes, seed, center = case
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        x0 = jnp.asarray(rng.normal(size=shape) + 0.5)
        directions = [jnp.asarray(rng.normal(size=shape) + 0.3 * k) for k in range(3)]
        tx = osp.rotational_rms_control(
            optax.identity(),
            eta_r=0.05,
            ungrouped_learning_rate=0.1,
            rms_decay=0.8,
            center=center,
            groups={"w": axes},
        )
        state, x, got = tx.init({"w": x0}), {"w": x0}, []
        for u in directions:
            upd, state = tx.update({"w": u}, state, x)
            x = optax.apply_updates(x, upd)
            got.append(x["w"])
        expected = _algorithm_1(x0, directions, axes, eta_r=0.05, beta=0.8, eps=1e-8, center=center)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "alias, groups",
    [
        (osp.rv_adamw, "unit"),
        (osp.rv_adamw, "tensor"),
        (osp.rv_sgdm, "tensor"),
        (osp.rv_lion, "unit"),
        (osp.wrapped_adam_l2, "tensor"),
    ],
)
def test_norms_kept_and_means_zero(alias, groups):
    params = osp.center_groups(_params(1), groups)
    grp = osp.resolve_groups(groups, params)
    history, _ = _run(alias(learning_rate=1e-2, weight_decay=0.1, groups=groups), params, 10)
    for key in ("conv", "dense"):
        axes = grp[key]["kernel"].axes
        x0, x = params[key]["kernel"], history[-1][key]["kernel"]
        assert not np.allclose(x, x0, atol=1e-3)  # it moved
        n0 = jnp.sqrt(jnp.sum(x0**2, axes))
        np.testing.assert_allclose(jnp.sqrt(jnp.sum(x**2, axes)), n0, rtol=1e-5)
        np.testing.assert_allclose(jnp.mean(x, axes), 0, atol=1e-6)


def test_first_step_centres_uncentred_params():
    params = _params(2)
    history, _ = _run(osp.rv_adamw(1e-2, weight_decay=0.1, groups="unit"), params, 1)
    x0, x1 = params["conv"]["kernel"], history[1]["conv"]["kernel"]
    np.testing.assert_allclose(jnp.mean(x1, (0, 1, 2)), 0, atol=1e-6)
    centred = x0 - jnp.mean(x0, (0, 1, 2), keepdims=True)
    np.testing.assert_allclose(
        jnp.linalg.norm(x1.reshape(-1, 8), axis=0),
        jnp.linalg.norm(centred.reshape(-1, 8), axis=0),
        rtol=1e-5,
    )


def test_center_false_keeps_norm_not_mean():
    params = _params(3)
    history, _ = _run(osp.rv_adamw(1e-2, weight_decay=0.1, center=False, groups="unit"), params, 5)
    x0, x = params["dense"]["kernel"], history[-1]["dense"]["kernel"]
    np.testing.assert_allclose(jnp.linalg.norm(x, axis=0), jnp.linalg.norm(x0, axis=0), rtol=1e-5)
    assert np.max(np.abs(jnp.mean(x, 0))) > 1e-2


def test_center_groups_reproduces_the_authors_centred_start():
    with jax.enable_x64(True):
        for problem in ("rv_adamw", "rv_sgdm", "rv_lion"):
            got = osp.center_groups(reference.field(problem, "x0"), groups="unit")
            err = reference.max_relative_error(got, reference.field(problem, "x_init"))
            assert_within(err, 1e-12, problem)


def test_center_groups_keeps_degenerate_groups():
    params = {"w": jnp.stack([jnp.zeros(4), jnp.ones(4), jnp.arange(4.0)], axis=1)}
    out = osp.center_groups(params, groups="unit")["w"]
    np.testing.assert_array_equal(out[:, :2], params["w"][:, :2])
    np.testing.assert_allclose(jnp.linalg.norm(out[:, 2]), jnp.linalg.norm(jnp.arange(4.0)))


def _angles(history, key):
    """Per-step, per-unit angle between successive kernels ``key`` (float64 numpy)."""
    k = np.stack([np.asarray(x[key]["kernel"], np.float64) for x in history])
    k = k.reshape(k.shape[0], -1, k.shape[-1])
    a, b = k[:-1], k[1:]
    cos = np.sum(a * b, 1) / np.sqrt(np.sum(a * a, 1) * np.sum(b * b, 1))
    return np.arccos(np.clip(cos, -1, 1))


def _random_grads(x, t):
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), t), 3)
    leaves, treedef = jax.tree.flatten(x)
    scales = [1.0, 30.0, 0.01]  # very different gradient scales per leaf
    return jax.tree.unflatten(
        treedef,
        [s * jax.random.normal(k, p.shape) for k, p, s in zip(keys, leaves, scales)],
    )


def test_angular_update_is_eta_r_every_step_with_rms_decay_0():
    """With rms_decay = 0, a = ||U_perp||: every group turns by exactly atan(eta_r) each step."""
    with jax.enable_x64(True):
        params = osp.center_groups(_params(4, jnp.float64), groups="unit")
        tx = osp.rv_adamw(1e-2, weight_decay=0.1, rms_decay=0.0, groups="unit")
        history, _ = _run(tx, params, 6, grads=_random_grads)
        eta_r = equilibrium("adamw", learning_rate=1e-2, weight_decay=0.1, dim=1).angular_update
        for key in ("conv", "dense"):
            np.testing.assert_allclose(_angles(history, key), np.arctan(eta_r), rtol=1e-6)


@pytest.mark.parametrize("alias", ["rv_adamw", "rv_sgdm", "rv_lion"])
def test_mean_angular_update_matches_eta_r(alias):
    """Default rms_decay: the angle varies between steps; after the tracker's own transient
    (Adam's direction shrinks over its first steps) its mean is Table 1's eta_r, and its RMS
    even closer, for every unit, whatever the gradient scale of its layer."""
    hyper = {"learning_rate": 1e-2, "weight_decay": 0.1}
    tx = getattr(osp, alias)(**hyper, groups="unit")
    history, _ = _run(tx, osp.center_groups(_params(5), groups="unit"), 150, grads=_random_grads)
    kw = {"b2": 0.99} if alias == "rv_lion" else {}
    eta_r = equilibrium(alias[3:], dim=1, **hyper, **kw).angular_update
    for key in ("conv", "dense"):
        angles = _angles(history, key)[20:]
        assert_approximately(np.mean(angles), eta_r, rel=0.1, what=f"{alias} mean")
        rms_per_unit = np.sqrt(np.mean(angles**2, 0))
        assert_approximately(rms_per_unit, eta_r, rel=0.05, what=f"{alias} RMS")


def test_explicit_eta_r_and_schedules():
    with jax.enable_x64(True):
        params = osp.center_groups(_params(6, jnp.float64), groups="unit")
        history, _ = _run(
            osp.rv_sgdm(0.1, eta_r=0.02, rms_decay=0.0, groups="unit"),
            params,
            3,
            grads=_random_grads,
        )
        np.testing.assert_allclose(_angles(history, "conv"), np.arctan(0.02), rtol=1e-6)
    params = osp.center_groups(_params(6), groups="unit")
    # learning rate schedule: eta_r follows it (zero after 3 steps: nothing moves but the
    # renormalisation of rounding errors)
    schedule = optax.piecewise_constant_schedule(1e-2, {3: 0.0})
    history, _ = _run(
        osp.rv_adamw(schedule, weight_decay=0.1, groups="unit"), params, 6, grads=_random_grads
    )
    for t in range(6):
        moved = max(
            np.max(np.abs(np.asarray(a) - np.asarray(b)))
            for a, b in zip(*map(jax.tree.leaves, history[t : t + 2]))
        )
        assert (moved > 1e-3) if t < 3 else (moved < 1e-6)


def test_weight_decay_acts_only_through_eta_r():
    """Rotational leaves: with eta_r fixed, weight decay changes nothing (RV-AdamW), and
    the wrapped Adam+L2 differs from RV-AdamW only through L2 in its second moment."""
    params = osp.center_groups(_params(15), groups="unit")
    fixed = dict(eta_r=0.02, ungrouped_weight_decay=0.0, groups="unit")
    runs = {
        wd: _run(osp.rv_adamw(1e-2, weight_decay=wd, **fixed), params, 4)[0][-1]
        for wd in (0.01, 10.0)
    }
    _leaves_close(runs[0.01], runs[10.0], 0)
    wrapped = _run(
        osp.wrapped_adam_l2(1e-2, weight_decay=10.0, eta_r=0.02, groups="unit"), params, 4
    )[0][-1]
    assert not np.allclose(wrapped["conv"]["kernel"], runs[0.01]["conv"]["kernel"], atol=1e-4)
    tiny = _run(osp.wrapped_adam_l2(1e-2, weight_decay=1e-9, eta_r=0.02, groups="unit"), params, 4)[
        0
    ][-1]
    _leaves_close(tiny, runs[0.01], 1e-5)


def _leaves_close(a, b, tol):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "alias, base",
    [
        # the ungrouped leaves' decay is the base optimizer's unless given
        (
            lambda g: osp.rv_adamw(1e-2, weight_decay=0.1, groups=g),
            optax.adamw(1e-2, weight_decay=0.1),
        ),
        (
            lambda g: osp.rv_adamw(1e-2, weight_decay=0.1, ungrouped_weight_decay=0.3, groups=g),
            optax.adamw(1e-2, weight_decay=0.3),
        ),
        (
            lambda g: osp.rv_lion(1e-3, weight_decay=1.0, ungrouped_weight_decay=0.0, groups=g),
            optax.lion(1e-3, weight_decay=0.0),
        ),
        (
            lambda g: osp.rv_sgdm(
                0.05, 0.9, weight_decay=5e-4, ungrouped_weight_decay=0.01, groups=g
            ),
            optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.05, momentum=0.9)),
        ),
        (
            lambda g: osp.wrapped_adam_l2(
                1e-2, weight_decay=0.1, ungrouped_weight_decay=0.01, groups=g
            ),
            optax.chain(optax.add_decayed_weights(0.01), optax.adam(1e-2)),
        ),
    ],
)
def test_ungrouped_leaves_get_the_plain_inner_optimizer(alias, base):
    params = _params(7)
    _leaves_close(_run(alias(None), params)[0][-1], _run(base, params)[0][-1], 1e-5)
    # with groups, the bias (ungrouped) still follows the base optimizer exactly
    biased = {"dense": {"kernel": params["dense"]["kernel"], "bias": params["dense"]["bias"]}}
    got = _run(alias("unit"), biased)[0][-1]["dense"]["bias"]
    want = _run(base, {"bias": biased["dense"]["bias"]})[0][-1]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_wrapped_adam_l2_direction_is_adam_l2_gradient_part():
    """Rotational leaves: m from the gradient only, v from the L2-regularised gradient."""
    with jax.enable_x64(True):
        params = _params(8, jnp.float64)
        tx = osp.scale_by_adam_l2_direction(0.9, 0.99, 1e-8, weight_decay=0.5, groups="unit")
        state, x = tx.init(params), params
        m = v = 0.0
        w = params["conv"]["kernel"]
        for t in range(1, 4):
            g = _grads(params, t)
            u, state = tx.update(g, state, params)
            gt = g["conv"]["kernel"]
            m = 0.9 * m + 0.1 * gt
            v = 0.99 * v + 0.01 * (gt + 0.5 * w) ** 2
            expected = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-8)
            np.testing.assert_allclose(u["conv"]["kernel"], expected, rtol=1e-12)
        del x


def test_state_overhead_is_two_scalars_per_group():
    params = {"w": jnp.ones((3, 3, 64, 128)), "d": jnp.ones((512, 10)), "b": jnp.ones(128)}
    nbytes = lambda s: sum(x.nbytes for x in jax.tree.leaves(s))
    base = nbytes(optax.adamw(1e-3).init(params))
    groups = 128 + 10
    assert (
        nbytes(osp.rv_adamw(groups="unit").init(params)) - base == 2 * 4 * groups + 2 * 4
    )  # + the step counts of the grouped part (the control's and its Adam's)
    tensor = nbytes(osp.rv_adamw(groups="tensor").init(params)) - base
    assert tensor == 2 * 4 * 2 + 2 * 4


def test_degenerate_inputs_do_not_make_nans():
    params = {"w": jnp.concatenate([jnp.zeros((6, 1)), jnp.ones((6, 1)), jnp.eye(6)[:, :2]], 1)}
    tx = osp.rv_adamw(1e-2, weight_decay=0.1, groups="unit")
    history, _ = _run(tx, params, 3)
    assert np.all(np.isfinite(history[-1]["w"]))
    np.testing.assert_array_equal(history[-1]["w"][:, 0], 0)  # zero group stays zero
    zero_grads = lambda x, t: jax.tree.map(jnp.zeros_like, x)
    # no decay of the ungrouped leaves either: a zero gradient then moves nothing
    still = osp.rv_adamw(1e-2, weight_decay=0.1, ungrouped_weight_decay=0.0, groups="unit")
    history, _ = _run(still, osp.center_groups(_params(9), groups="unit"), 3, grads=zero_grads)
    _leaves_close(history[-1], history[0], 1e-6)
    # bf16 params: moments in float32, norms kept to bf16 precision
    p16 = jax.tree.map(
        lambda p: p.astype(jnp.bfloat16), osp.center_groups(_params(10), groups="unit")
    )
    history, state = _run(tx, p16, 5)
    k0, k = p16["conv"]["kernel"], history[-1]["conv"]["kernel"]
    assert (
        k.dtype == jnp.bfloat16
        and osp.grouped_state(state).q["conv"]["kernel"].dtype == jnp.float32
    )
    norm = lambda a: jnp.linalg.norm(a.astype(jnp.float32).reshape(-1, 8), axis=0)
    np.testing.assert_allclose(norm(k), norm(k0), rtol=2e-2)


def test_composes_with_optax_wrappers():
    params = osp.center_groups(_params(11), groups="unit")
    plain = _run(osp.rv_adamw(1e-2, weight_decay=0.1, groups="unit"), params, 4)[0][-1]
    injected = optax.inject_hyperparams(osp.rv_adamw)(
        learning_rate=1e-2, weight_decay=0.1, groups="unit"
    )
    _leaves_close(_run(injected, params, 4)[0][-1], plain, 1e-5)
    # a string spec needs nothing; inject_hyperparams would call a callable one
    # as if it were a schedule
    static = optax.inject_hyperparams(osp.rv_adamw, static_args=("groups",))
    _leaves_close(
        _run(static(1e-2, weight_decay=0.1, groups=osp.per_unit), params, 4)[0][-1], plain, 1e-5
    )
    # apply_if_finite drops a NaN step and keeps the state
    tx = optax.apply_if_finite(osp.rv_adamw(1e-2, weight_decay=0.1, groups="unit"), 3)
    nan_at_1 = lambda x, t: jax.tree.map(lambda p: p * jnp.where(t == 1, jnp.nan, 1.0), x)
    history, _ = _run(tx, params, 3, grads=nan_at_1)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(history[-1]))
    _leaves_close(history[2], history[1], 0)
    # MultiSteps: accumulates then takes one rotational step
    ms = optax.MultiSteps(osp.rv_adamw(1e-2, weight_decay=0.1, groups="unit"), every_k_schedule=2)
    history, _ = _run(ms, params, 4)
    _leaves_close(history[1], history[0], 0)
    assert not np.allclose(history[2]["conv"]["kernel"], params["conv"]["kernel"])


def test_multi_transform_and_masked():
    params = osp.center_groups(_params(14), groups="unit")
    labels = {"conv": {"kernel": "rv"}, "dense": {"kernel": "sgd", "bias": "sgd"}}
    tx = optax.multi_transform(
        {"rv": osp.rv_adamw(1e-2, weight_decay=0.1, groups="unit"), "sgd": optax.sgd(0.1)}, labels
    )
    got = _run(tx, params, 3)[0][-1]
    _leaves_close(got["dense"], _run(optax.sgd(0.1), params, 3)[0][-1]["dense"], 1e-6)
    k0, k = params["conv"]["kernel"], got["conv"]["kernel"]
    assert not np.allclose(k, k0, atol=1e-3)
    np.testing.assert_allclose(
        jnp.linalg.norm(k.reshape(-1, 8), axis=0),
        jnp.linalg.norm(k0.reshape(-1, 8), axis=0),
        rtol=1e-5,
    )
    mask = {"conv": {"kernel": True}, "dense": {"kernel": False, "bias": False}}
    tx = optax.chain(
        optax.masked(osp.rv_adamw(1e-2, weight_decay=0.1, groups="unit"), mask),
        optax.masked(
            optax.sgd(0.1), {"conv": {"kernel": False}, "dense": {"kernel": True, "bias": True}}
        ),
    )
    got = _run(tx, params, 3)[0][-1]
    _leaves_close(got["dense"], _run(optax.sgd(0.1), params, 3)[0][-1]["dense"], 1e-6)
    np.testing.assert_allclose(
        jnp.linalg.norm(got["conv"]["kernel"].reshape(-1, 8), axis=0),
        jnp.linalg.norm(k0.reshape(-1, 8), axis=0),
        rtol=1e-5,
    )


def test_invalid_hyperparameters_fail_at_build():
    with pytest.raises(ValueError, match="rms_decay"):
        osp.rv_adamw(rms_decay=1.0, groups="unit")
    with pytest.raises(ValueError, match="learning_rate"):
        osp.rv_sgdm(learning_rate=-0.1, groups="unit")
    with pytest.raises(ValueError, match="weight_decay"):
        osp.rv_lion(weight_decay=float("nan"), groups="unit")
    with pytest.raises(ValueError, match="eta_r"):
        osp.rotational_rms_control(
            optax.identity(), eta_r=-1.0, ungrouped_learning_rate=0.1, groups="unit"
        )
    with pytest.raises(ValueError, match="params"):
        tx = osp.rv_adamw(groups="unit")
        p = _params()
        tx.update(p, tx.init(p))


class _LayerNormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(use_scale=False, use_bias=False)(nn.Dense(32, use_bias=False)(x))
        x = nn.relu(x)
        x = nn.LayerNorm()(nn.Dense(32, use_bias=False)(x))
        return nn.Dense(3)(nn.relu(x))


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(3)(x.mean((1, 2)))


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, *shape)).astype(np.float32)
    y = (x.reshape(64, -1)[:, :3].sum(1) > 0).astype(np.int32) + (x.reshape(64, -1)[:, 3] > 1)
    return jnp.asarray(x), jnp.asarray(y)


def _groups_without_head(spec):
    """Rotational: every hidden kernel (invariant through the norm); the head is not."""

    def groups(params):
        tree = spec(params)
        last = sorted(k for k in tree if k.startswith("Dense"))[-1]
        tree[last] = jax.tree.map(lambda _: None, tree[last])
        return tree

    return groups


@pytest.mark.parametrize("alias", [osp.rv_adamw, osp.rv_lion, osp.rv_sgdm])
def test_trains_flax_layernorm_model_with_whole_layer_groups(alias):
    model = _LayerNormNet()
    x, y = _data((12,))
    params = osp.center_groups(model.init(jax.random.PRNGKey(0), x)["params"], osp.per_tensor)
    lr, wd = {osp.rv_sgdm: (0.1, 0.1), osp.rv_adamw: (3e-3, 0.1), osp.rv_lion: (1e-3, 1.0)}[alias]
    tx = alias(learning_rate=lr, weight_decay=wd, groups=_groups_without_head(osp.per_tensor))

    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state, p, losses = tx.init(params), params, []
    for _ in range(40):
        p, state, loss = step(p, state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    k0, k = params["Dense_0"]["kernel"], p["Dense_0"]["kernel"]
    np.testing.assert_allclose(jnp.linalg.norm(k), jnp.linalg.norm(k0), rtol=1e-5)


def test_trains_flax_batchnorm_model_with_per_unit_groups():
    model = _BatchNormNet()
    x, y = _data((6, 6, 2))
    variables = model.init(jax.random.PRNGKey(1), x)
    params = osp.center_groups(variables["params"], groups="unit")
    tx = osp.rv_adamw(1e-2, weight_decay=0.1, groups=_groups_without_head(osp.per_unit))

    def loss_fn(p, stats):
        logits, new = model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new["batch_stats"]

    @jax.jit
    def step(p, stats, s):
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(p, stats)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), stats, s, loss

    state, p, stats, losses = tx.init(params), params, variables["batch_stats"], []
    for _ in range(40):
        p, stats, state, loss = step(p, stats, state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    k0, k = params["Conv_0"]["kernel"], p["Conv_0"]["kernel"]
    np.testing.assert_allclose(
        jnp.linalg.norm(k.reshape(-1, 8), axis=0),
        jnp.linalg.norm(k0.reshape(-1, 8), axis=0),
        rtol=1e-5,
    )


@pytest.mark.parametrize("axis", [2, 3])
def test_sharded_params_give_the_same_step(axis):
    """Group axes sharded (axis 2: cross-device reductions) or unit axis sharded (axis 3)."""
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.sharding.Mesh(devices, ("d",))
    spec = [None] * 4
    spec[axis] = "d"
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    rng = np.random.default_rng(12)
    params = osp.center_groups(
        {"w": jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32)}, groups="unit"
    )
    tx = osp.rv_adamw(1e-2, weight_decay=0.1, groups="unit")
    plain = _run(tx, params, 3)[0][-1]
    sharded_params = jax.device_put(params, sharding)
    sharded = _run(tx, sharded_params, 3)[0][-1]
    assert sharded["w"].sharding.is_equivalent_to(sharding, 4)
    np.testing.assert_allclose(sharded["w"], plain["w"], rtol=1e-5, atol=1e-6)


def test_mostly_radial_direction_in_float32():
    """The one-pass expansion of ||U_perp||^2 stays accurate when 99% of U is radial."""
    rng = np.random.default_rng(13)
    x0 = osp.center_groups(
        {"w": jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)}, groups="unit"
    )["w"]
    directions = [
        jnp.asarray(
            10 * np.asarray(x0) * rng.normal(size=6) + rng.normal(size=(64, 6)), jnp.float32
        )
        for _ in range(3)
    ]
    tx = osp.rotational_rms_control(
        optax.identity(), eta_r=0.05, ungrouped_learning_rate=0.1, groups="unit"
    )
    state, x = tx.init({"w": x0}), {"w": x0}
    for u in directions:
        upd, state = jax.jit(tx.update)({"w": u}, state, x)
        x = optax.apply_updates(x, upd)
    expected = _algorithm_1(x0, directions, (0,), eta_r=0.05, beta=0.9, eps=1e-8, center=True)
    # float32 steps against a float64 transcription, through a mostly radial direction: its
    # tangent part, what moves the point, is a difference of numbers 10 times larger
    scale = float(np.max(np.abs(expected[-1])))
    bound = float32_bound(steps=3, condition=100, length=64) * scale
    np.testing.assert_allclose(np.asarray(x["w"]), expected[-1], rtol=0, atol=bound)


def test_direction_with_a_large_common_offset_in_float32():
    """u = 1e15 + O(1) per unit: the centred part is below float32's resolution of u, so the
    group is not rotated (norm and mean kept, q finite); an O(1) offset is resolved and
    follows algorithm 1."""
    rng = np.random.default_rng(5)
    x0 = osp.center_groups(
        {"w": jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)}, groups="unit"
    )["w"]
    wiggle = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    tx = osp.rotational_rms_control(
        optax.identity(), eta_r=0.05, ungrouped_learning_rate=0.1, groups="unit"
    )
    state = tx.init({"w": x0})
    upd, state = jax.jit(tx.update)({"w": 1e15 + wiggle}, state, {"w": x0})
    assert np.all(np.isfinite(np.asarray(osp.grouped_state(state).q["w"])))
    np.testing.assert_allclose(upd["w"], 0, atol=1e-5)

    offset = [jnp.float32(3.0) + wiggle]
    state, x = tx.init({"w": x0}), {"w": x0}
    upd, state = jax.jit(tx.update)({"w": offset[0]}, state, x)
    expected = _algorithm_1(x0, offset, (0,), eta_r=0.05, beta=0.9, eps=1e-8, center=True)
    np.testing.assert_allclose(x0 + upd["w"], expected[-1], rtol=1e-5, atol=1e-6)


_MASK = {"conv": {"kernel": True}, "dense": {"kernel": True, "bias": False}}
_BASES = {
    "rv_adamw": (
        dict(learning_rate=1e-2, weight_decay=0.1),
        lambda mask: optax.adamw(1e-2, weight_decay=0.1, mask=mask),
    ),
    "rv_sgdm": (
        dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-2),
        lambda mask: optax.chain(
            optax.add_decayed_weights(1e-2, mask), optax.sgd(0.1, momentum=0.9)
        ),
    ),
    "rv_lion": (
        dict(learning_rate=1e-3, weight_decay=1.0),
        lambda mask: optax.lion(1e-3, weight_decay=1.0, mask=mask),
    ),
}


@pytest.mark.parametrize("mask", [None, _MASK], ids=["no mask", "mask"])
@pytest.mark.parametrize("alias", sorted(_BASES))
def test_with_nothing_grouped_a_rotational_variant_is_its_optax_base(alias, mask):
    """REQ gives the weights outside its rotational groups their base optimizer with its own
    weight decay: with no group, RV-AdamW is optax.adamw (weight decay and mask included),
    RV-SGDM SGD momentum with L2, RV-Lion optax.lion, bit for bit."""
    kwargs, base = _BASES[alias]
    tx = getattr(osp, alias)(**kwargs, mask=mask, groups=None)
    params = _params(3)
    got = _run(tx, params, 10, grads=_random_grads)[0][-1]
    chex.assert_trees_all_equal(got, _run(base(mask), params, 10, grads=_random_grads)[0][-1])


def test_with_nothing_grouped_rv_adamw_is_adamw_on_an_equinox_tree_in_one_compilation():
    """The (out, in) layout with None leaves (an Equinox MLP filtered to its arrays), under
    jit: the same step as optax.adamw, compiled once."""
    import equinox as eqx

    model = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    outs = []
    for tx in (
        osp.rv_adamw(1e-2, weight_decay=0.1, groups=None),
        optax.adamw(1e-2, weight_decay=0.1),
    ):
        step = jax.jit(tx.update)
        state, p = tx.init(params), params
        for _ in range(3):
            updates, state = step(grads, state, p)
            p = optax.apply_updates(p, updates)
        outs.append(p)
        assert step._cache_size() == 1
    chex.assert_trees_all_equal(*outs)
