"""The hyperball update (Wen et al. 2025), AdamH and MuonH: exact against float64
transcriptions of the update, the sphere kept per group at any size, the groups read from the
structure (a matrix per layer of a stack, per expert, per head) on Flax linen, flax.nnx and
Equinox transformers."""

from __future__ import annotations

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformer_models as tm
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_sphere as osp
from optax_sphere._paths import path_str

# a stack of 3 matrices (one group each), a matrix (one group), an embedding and a bias (Adam)
SHAPES = {"stack": (3, 4, 5), "w": (5, 6), "embed": (10, 4), "b": (6,)}
SPECS = {"stack": (1, 2), "w": "tensor", "embed": None, "b": None}
GROUP_AXES = {"stack": (1, 2), "w": (0, 1)}


def _problem(dtype):
    keys = jax.random.split(jax.random.key(0), 2 * len(SHAPES))
    params = {k: jax.random.normal(keys[i], s, dtype) for i, (k, s) in enumerate(SHAPES.items())}
    targets = {
        k: jax.random.normal(keys[len(SHAPES) + i], s, dtype)
        for i, (k, s) in enumerate(SHAPES.items())
    }

    def grad(p):  # of sum (p - t)^2 * (1 + 0.1 i): a gradient that depends on the point
        return {
            k: 2 * (p[k] - targets[k]) * (1 + 0.1 * jnp.arange(p[k].size).reshape(p[k].shape))
            for k in p
        }

    return params, grad


def _normalise(x, axes):
    return x / np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


def _hyperball_step(x, delta, radius, eta, axes):
    """The update of Wen et al., in NumPy: R Norm(x + eta R Norm(delta))."""
    return radius * _normalise(x + eta * radius * _normalise(delta, axes), axes)


def test_adamh_matches_a_float64_transcription_of_wen_et_al():
    eta = lambda count: 0.05 * 0.9**count  # a schedule: the rate of step t is eta(t)
    adam_lr, b1, b2, eps, steps = 3e-3, 0.9, 0.95, 1e-8, 15
    with jax.enable_x64(True):
        params, grad = _problem(jnp.float64)
        tx = osp.adamh(eta, b1, b2, eps, ungrouped_learning_rate=adam_lr, groups=SPECS)
        state = tx.init(params)
        ours = params
        step = jax.jit(tx.update)
        for _ in range(steps):
            updates, state = step(grad(ours), state, ours)
            ours = optax.apply_updates(ours, updates)

        x = {k: np.asarray(v) for k, v in params.items()}
        radius = {
            k: np.sqrt(np.sum(x[k] ** 2, axis=a, keepdims=True)) for k, a in GROUP_AXES.items()
        }
        m = {k: np.zeros_like(v) for k, v in x.items()}
        v = {k: np.zeros_like(v) for k, v in x.items()}
        for t in range(1, steps + 1):
            g = {k: np.asarray(a) for k, a in grad(x).items()}
            for k in x:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
                if k in GROUP_AXES:
                    x[k] = _hyperball_step(x[k], -u, radius[k], eta(t - 1), GROUP_AXES[k])
                else:
                    x[k] = x[k] - adam_lr * u
        for k in x:
            np.testing.assert_allclose(ours[k], x[k], rtol=1e-12, atol=1e-12, err_msg=k)
        for k, axes in GROUP_AXES.items():  # every group on its sphere
            np.testing.assert_allclose(
                np.sqrt(np.sum(np.asarray(ours[k]) ** 2, axis=axes, keepdims=True)),
                radius[k],
                rtol=1e-13,
            )


def test_muonh_is_the_hyperball_step_along_optax_muons_update_in_float64():
    eta, steps = 0.03, 8
    with jax.enable_x64(True):
        params, grad = _problem(jnp.float64)
        numbers = {
            "stack": optax.contrib.MuonDimensionNumbers((1,), (2,)),
            "w": optax.contrib.MuonDimensionNumbers((0,), (1,)),
            "embed": None,
            "b": None,
        }
        tx = osp.muonh(
            eta, ungrouped_learning_rate=1e-3, muon_weight_dimension_numbers=numbers, groups=SPECS
        )
        # off the groups: Muon (its Adam here) at the ungrouped rate
        muon = optax.contrib.muon(
            1e-3, adam_learning_rate=1e-3, muon_weight_dimension_numbers=numbers
        )
        state, muon_state = tx.init(params), muon.init(params)
        ours, x = params, params
        radius = {
            k: jnp.sqrt(jnp.sum(params[k] ** 2, axis=a, keepdims=True))
            for k, a in GROUP_AXES.items()
        }
        for _ in range(steps):
            updates, state = tx.update(grad(ours), state, ours)
            ours = optax.apply_updates(ours, updates)
            delta, muon_state = muon.update(grad(x), muon_state, x)
            x = {
                k: _hyperball_step(
                    np.asarray(x[k]), np.asarray(delta[k]), radius[k], eta, GROUP_AXES[k]
                )
                if k in GROUP_AXES
                else x[k] + delta[k]
                for k in x
            }
        for k in x:
            np.testing.assert_allclose(ours[k], x[k], rtol=1e-11, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("name", ["adamh", "muonh"])
def test_with_nothing_grouped_they_are_optax_adam_and_muon(name):
    params, grad = _problem(jnp.float32)
    if name == "adamh":
        ours, base = osp.adamh(0.02, groups=None), optax.adam(0.02, b1=0.9, b2=0.95)
    else:
        ours, base = osp.muonh(0.02, groups=None), optax.contrib.muon(0.02)
    for tx in (ours, base):
        p, s = params, tx.init(params)
        for _ in range(10):
            u, s = tx.update(grad(p), s, p)
            p = optax.apply_updates(p, u)
        tx.result = p
    chex.assert_trees_all_close(ours.result, base.result, rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(np.float64, (3, 5), elements=st.floats(-3, 3)),
    d=hnp.arrays(np.float64, (3, 5), elements=st.floats(-3, 3)),
    eta=st.floats(1e-4, 0.95),
)
def test_one_step_keeps_the_radius_and_turns_by_at_most_arcsin_eta(x, d, eta):
    # groups: the rows; the radius R is each row's norm at init
    norms = np.linalg.norm(x, axis=1)
    if norms.min() < 1e-3 or np.linalg.norm(d, axis=1).min() < 1e-3:
        return
    with jax.enable_x64(True):
        tx = osp.hyperball(optax.identity(), eta, groups={"x": (1,)})
        state = tx.init({"x": jnp.asarray(x)})
        update, _ = tx.update({"x": jnp.asarray(d)}, state, {"x": jnp.asarray(x)})
        new = x + np.asarray(update["x"])
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), norms, rtol=1e-12)
    cos = np.sum(new * x, axis=1) / norms**2
    turned = np.arccos(np.clip(cos, -1, 1))
    # the farthest point of the ball of radius eta around u seen from the origin: arcsin(eta)
    assert np.all(turned <= math.asin(eta) + 1e-7)
    # a step orthogonal to the point turns by arctan(eta) exactly
    tangent = d - np.sum(d * x, axis=1, keepdims=True) / norms[:, None] ** 2 * x
    if np.linalg.norm(tangent, axis=1).min() > 1e-3:
        with jax.enable_x64(True):
            update, _ = tx.update({"x": jnp.asarray(tangent)}, state, {"x": jnp.asarray(x)})
        new = x + np.asarray(update["x"])
        cos = np.sum(new * x, axis=1) / norms**2
        np.testing.assert_allclose(np.arccos(np.clip(cos, -1, 1)), math.atan(eta), atol=1e-7)


def test_the_step_is_the_same_angle_at_any_group_size_norm_and_gradient_scale():
    # the failure of a plain rate on per-tensor groups: here a group of 4 and one of 4096,
    # at norms 0.1 and 50, with gradients 1e-6 and 1e3, all turn by arctan(eta)
    eta = 0.01
    params = {"small": 0.1 * jnp.ones((2, 2)), "big": 50 * jnp.ones((64, 64))}
    grads = {
        "small": 1e-6 * jnp.array([[1.0, -1.0], [0.0, 0.0]]),
        "big": 1e3 * jnp.where(jnp.arange(64) < 32, 1.0, -1.0)[None, :] * jnp.ones((64, 1)),
    }
    tx = osp.hyperball(optax.sgd(1.0), eta, groups="tensor")
    updates, _ = tx.update(grads, tx.init(params), params)
    for k in params:
        x, new = params[k], params[k] + updates[k]
        cos = jnp.sum(x * new) / (jnp.linalg.norm(x) * jnp.linalg.norm(new))
        np.testing.assert_allclose(
            jnp.arccos(jnp.clip(cos, -1, 1)), math.atan(eta), rtol=2e-2, err_msg=k
        )
        np.testing.assert_allclose(jnp.linalg.norm(new), jnp.linalg.norm(x), rtol=1e-5)


def test_degenerate_groups_a_zero_group_stays_and_a_zero_direction_is_no_step():
    params = {"w": jnp.stack([jnp.zeros(3), jnp.ones(3)]), "v": jnp.ones((2, 3))}
    grads = {"w": jnp.ones((2, 3)), "v": jnp.zeros((2, 3))}
    tx = osp.adamh(0.1, groups={"w": (1,), "v": (1,)})
    updates, state = tx.update(grads, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))
    np.testing.assert_array_equal(updates["w"][0], 0.0)  # R = 0: stays at the origin
    assert float(jnp.abs(updates["w"][1]).max()) > 0
    np.testing.assert_allclose(updates["v"], 0.0, atol=1e-7)  # on its sphere, no direction
    # a step of eta = 1 straight back to the origin lands on no direction: not taken
    tx = osp.hyperball(optax.sgd(1.0), 1.0, groups={"x": (0,)})
    x = {"x": jnp.ones(4)}
    updates, _ = tx.update(x, tx.init(x), x)
    np.testing.assert_array_equal(updates["x"], 0.0)
    # NaN gradients give NaN updates (as optax's), which optax.apply_if_finite skips
    guarded = optax.apply_if_finite(osp.adamh(0.1, groups={"w": (1,), "v": (1,)}), 3)
    state = guarded.init(params)
    bad = jax.tree.map(lambda g: g * jnp.nan, grads)
    updates, state = guarded.update(bad, state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)
    assert int(state.notfinite_count) == 1


def test_bfloat16_params_keep_float32_radii_and_stay_on_their_sphere():
    params = {"w": jnp.ones((8, 16), jnp.bfloat16), "b": jnp.zeros(16, jnp.bfloat16)}
    tx = osp.adamh(0.05, ungrouped_learning_rate=1e-2, groups={"w": (0,), "b": None})
    state = tx.init(params)
    assert osp.grouped_state(state).radius["w"].dtype == jnp.float32 and osp.grouped_state(
        state
    ).radius["w"].shape == (1, 16)
    key = jax.random.key(0)
    for i in range(20):
        k = jax.random.fold_in(key, i)
        g = jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape, p.dtype), params)
        updates, state = tx.update(g, state, params)
        assert updates["w"].dtype == jnp.bfloat16
        params = optax.apply_updates(params, updates)
    norms = jnp.linalg.norm(params["w"].astype(jnp.float32), axis=0)
    np.testing.assert_allclose(norms, np.sqrt(8), rtol=2e-2)


def test_schedules_inject_hyperparams_and_jit_compile_once():
    params, grad = _problem(jnp.float32)
    tx = optax.inject_hyperparams(osp.adamh)(learning_rate=0.02, groups=SPECS)
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        u, s = tx.update(grad(p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(3):
        params, state = step(params, state)
    state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
    frozen, _ = step(params, state)
    assert len(traces) == 1
    # at a rate of 0 the groups stay where they are; Adam's leaves (ungrouped_learning_rate follows
    # learning_rate when not given) too
    chex.assert_trees_all_close(frozen, params, atol=1e-6)


def test_a_bad_radius_or_rate_is_refused_at_build():
    with pytest.raises(ValueError, match="radius"):
        osp.hyperball(optax.adam(1e-3), 0.1, radius=0.0, groups=None)
    with pytest.raises(ValueError, match="learning_rate"):
        osp.adamh(-0.1, groups=None)


# ---------------------------------------------------------------------------------------------
# groups from the structure: one matrix per layer of a stack, per expert, per head

MODELS = {"linen": tm.linen_lm, "nnx": tm.nnx_lm, "equinox": tm.eqx_lm}
TOKENS = jnp.zeros((2, tm.CONTEXT), jnp.int32)


def _flat(tree, is_leaf=None):
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf)[0]}


def _model(framework):
    model, variables, apply = MODELS[framework](0)
    args = (variables, TOKENS) if framework == "linen" else (TOKENS,)
    params = variables["params"] if framework == "linen" else variables
    return model, args, params, apply


@pytest.mark.parametrize("framework", MODELS)
def test_matrix_groups_are_each_hidden_matrix_of_each_layer(framework):
    model, args, params, _ = _model(framework)
    found = osp.matrix_groups(model, *args)
    structure = found.structure
    expected = {"linen": tm.LINEN_GROUPS, "nnx": tm.NNX_GROUPS, "equinox": tm.EQX_GROUPS}
    hidden = {p for p in expected[framework] if not p.startswith(("head", "embed", "Embed"))}
    assert set(found.grouped) == hidden
    for report in found.reports:
        if report.grouping is None:
            continue
        leaf = structure[report.path]
        spanned = set(range(len(report.shape))) - set(leaf.stack_axes)
        axes = tuple(range(len(report.shape))) if report.grouping == "tensor" else report.grouping
        assert set(axes) == spanned, report
        assert report.num_groups == math.prod(report.shape[a] for a in leaf.stack_axes)


@pytest.mark.parametrize("framework", MODELS)
def test_adamh_trains_a_transformer_with_every_layer_kept_at_its_norm(framework):
    model, args, params, apply = _model(framework)
    found = osp.matrix_groups(model, *args)
    tx = osp.adamh(0.02, ungrouped_learning_rate=3e-3, groups=found)
    batches = tm.markov_batches(0, 8, 30)

    def loss_fn(p, batch):
        logits = apply(p, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(p, s, batch):
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = tx.init(params)
    initial = _flat(params)
    p, losses = params, []
    for batch in batches:
        p, state, loss = step(p, state, jnp.asarray(batch))
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    final = _flat(p)
    for report in found.reports:
        if report.grouping is None:
            continue
        axes = tuple(range(len(report.shape))) if report.grouping == "tensor" else report.grouping
        norm = lambda x, axes=axes: jnp.sqrt(jnp.sum(x**2, axis=axes))
        np.testing.assert_allclose(
            norm(final[report.path]), norm(initial[report.path]), rtol=1e-4, err_msg=report.path
        )
        assert float(jnp.abs(final[report.path] - initial[report.path]).max()) > 1e-3


def test_a_mixture_of_experts_gets_one_sphere_per_expert_of_each_layer():
    layers, experts, dim = 2, 3, 8

    def moe(p, x):
        def layer(h, w):
            gate = jax.nn.softmax(h @ w["router"], axis=-1)
            dispatched = jnp.broadcast_to(h, (experts, *h.shape))
            out = jax.lax.dot_general(dispatched, w["experts"], (((2,), (1,)), ((0,), (0,))))
            return h + jnp.einsum("ebd,be->bd", jax.nn.gelu(out), gate) * w["gain"], None

        return jax.lax.scan(layer, x, p)[0]

    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "experts": jax.random.normal(k[0], (layers, experts, dim, dim)) / dim**0.5,
        "router": jax.random.normal(k[1], (layers, dim, experts)) / dim**0.5,
        "gain": jnp.ones((layers, dim)),
    }
    x = jax.random.normal(k[2], (4, dim))
    found = osp.matrix_groups(moe, params, x, head=True)
    assert found.spec_for(params) == {"experts": (2, 3), "router": (1, 2), "gain": None}
    tx = osp.adamh(0.05, ungrouped_learning_rate=1e-2, groups=found)
    state = tx.init(params)
    assert osp.grouped_state(state).radius["experts"].shape == (layers, experts, 1, 1)
    g = jax.grad(lambda p: jnp.sum(moe(p, x) ** 2))(params)
    updates, _ = tx.update(g, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(
        jnp.linalg.norm(new["experts"], axis=(2, 3)),
        jnp.linalg.norm(params["experts"], axis=(2, 3)),
        rtol=1e-5,
    )


def test_per_head_matrix_groups_give_one_sphere_per_attention_head():
    model, args, params, _ = _model("linen")
    found = osp.matrix_groups(model, *args, per_head=True)
    specs = _flat(found.spec_for(params), lambda x: x is None or isinstance(x, tuple))
    query = "LinenBlock_0/MultiHeadDotProductAttention_0/query/kernel"  # (d, heads, head_dim)
    out = "LinenBlock_0/MultiHeadDotProductAttention_0/out/kernel"  # (heads, head_dim, d)
    assert specs[query] == (0, 2) and specs[out] == (1, 2)
