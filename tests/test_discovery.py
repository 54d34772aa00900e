"""find_groups: radially invariant groups measured on Flax linen, flax.nnx, Equinox and Haiku
models, and the safe defaults of ``groups=``."""

from __future__ import annotations

import warnings

import chex
import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_sphere as osp

# ---------------------------------------------------------------------------------------------
# Models


class ResBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
        y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = norm()(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A BatchNorm ResNet; the stem conv has a bias (removed by the BatchNorm after it)."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3), use_bias=True)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = ResBlock(8)(x, train)
        x = ResBlock(16, strides=2)(x, train)
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def _found(model, *args, **kwargs) -> dict[str, str | None]:
    found = osp.find_groups(model, *args, **kwargs)
    return {r.path: r.grouping for r in found.reports}


def test_linen_resnet_every_filter_per_unit_and_the_head_not_grouped():
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    variables = ResNet().init(jax.random.key(1), x)
    found = _found(ResNet(), variables, x, train=True)
    kernels = {p: g for p, g in found.items() if p.endswith("kernel") and "Dense" not in p}
    assert len(kernels) == 6
    assert set(kernels.values()) == {"unit"}
    others = {p: g for p, g in found.items() if p not in kernels}
    assert set(others.values()) == {None}, others  # head, BatchNorm scales and biases, conv bias


class PreLNBlock(nn.Module):
    qk_norm: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(32, 16)(tokens)
        x = x + nn.MultiHeadDotProductAttention(
            num_heads=2, normalize_qk=self.qk_norm, use_bias=not self.qk_norm
        )(nn.LayerNorm()(x))
        h = nn.Dense(32)(nn.LayerNorm()(x))
        x = x + nn.Dense(16)(nn.gelu(h))
        return nn.Dense(32)(nn.LayerNorm()(x))


def test_pre_ln_transformer_block_has_no_invariant_group():
    tokens = jax.random.randint(jax.random.key(0), (4, 6), 0, 32)
    variables = PreLNBlock().init(jax.random.key(1), tokens)
    with pytest.warns(UserWarning, match="no radially invariant group"):
        found = osp.find_groups(PreLNBlock(), variables, tokens)
    assert found.grouped == []
    # attention kernels (in, heads, head_dim), biases (heads, head_dim), embedding: checked
    shapes = {r.path: r.shape for r in found.reports}
    assert shapes["MultiHeadDotProductAttention_0/query/kernel"] == (16, 2, 8)
    assert shapes["Embed_0/embedding"] == (32, 16)


def test_attention_with_qk_norm_groups_the_query_and_key_kernels_per_head():
    # the QK-norm normalises each head's query over head_dim: kernel (in, heads, head_dim)
    # = (16, 2, 8) is invariant per head, 2 groups of 16 * 8 (axes 0 and 2), and no finer
    tokens = jax.random.randint(jax.random.key(0), (4, 6), 0, 32)
    variables = PreLNBlock(qk_norm=True).init(jax.random.key(1), tokens)
    report = osp.find_groups(PreLNBlock(qk_norm=True), variables, tokens)
    found = {r.path: r.grouping for r in report.reports}
    attention = "MultiHeadDotProductAttention_0"
    for name in ("query", "key"):
        row = next(r for r in report.reports if r.path == f"{attention}/{name}/kernel")
        assert row.grouping == (0, 2)
        assert (row.num_groups, row.group_size) == (2, 128)
        assert row.description == "per head (axis 1)"
        assert row.sensitivity["axes(0,)"] > 10 * report.tolerance  # per unit: not invariant
    assert found[f"{attention}/value/kernel"] is None
    assert found[f"{attention}/out/kernel"] is None
    assert found["Embed_0/embedding"] is None


class Norms(nn.Module):
    """Dense layers before each normalisation of Flax, with and without a bias."""

    @nn.compact
    def __call__(self, x):
        a = nn.LayerNorm()(nn.Dense(8, use_bias=False, name="ln_no_bias")(x))
        b = nn.LayerNorm()(nn.Dense(8, use_bias=True, name="ln_with_bias")(x))
        c = nn.RMSNorm()(nn.Dense(8, use_bias=False, name="rms")(x))
        d = nn.GroupNorm(num_groups=None, group_size=1)(  # per channel, over the positions
            nn.Dense(8, use_bias=False, name="group_per_unit")(x)
        )
        e = nn.BatchNorm(use_running_average=False)(nn.Dense(8, name="bn_with_bias")(x))
        h = jnp.concatenate([a, b, c, d, e], -1)
        h = h.reshape(h.shape[0], -1)
        return nn.Dense(3, name="head")(h)


def test_flax_normalisation_layers():
    x = jax.random.normal(jax.random.key(0), (8, 6, 5))
    variables = Norms().init(jax.random.key(1), x)
    found = _found(Norms(), variables, x)
    assert found["ln_no_bias/kernel"] == "tensor"
    # zero at init, the bias makes the kernel look invariant there: probed away from init
    assert found["ln_with_bias/kernel"] is None
    assert found["rms/kernel"] == "tensor"
    assert found["group_per_unit/kernel"] == "unit"
    assert found["bn_with_bias/kernel"] == "unit"
    assert found["head/kernel"] is None


def test_invariance_only_at_initialisation_is_not_taken():
    """Zero biases and offsets at init make two parameters invariant *there*; at the
    initialisation itself (no perturbation) the probe is fooled, the default is not."""

    class Trap(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(name="ln")(nn.Dense(8, name="dense_bias")(x))
            h = nn.BatchNorm(use_running_average=False, name="bn0")(
                nn.Dense(8, use_bias=False, name="k0")(h)
            )
            h = nn.relu(h)  # bn0's scale and zero offset scale this: bn1 removes it at init
            h = nn.BatchNorm(use_running_average=False, name="bn1")(
                nn.Dense(8, use_bias=False, name="k1")(h)
            )
            return nn.Dense(2, name="head")(h)

    x = jax.random.normal(jax.random.key(0), (32, 4))
    variables = Trap().init(jax.random.key(1), x)
    at_init = _found(Trap(), variables, x, perturbation=0.0)
    assert at_init["dense_bias/kernel"] == "tensor"
    assert at_init["bn0/scale"] == "tensor"
    found = _found(Trap(), variables, x)
    assert found["dense_bias/kernel"] is None
    assert found["bn0/scale"] is None
    assert found["k0/kernel"] == found["k1/kernel"] == "unit"


def test_haiku_tree_norm_parameters_are_never_one_element_groups():
    def net(x):
        x = hk.Conv2D(8, 3, with_bias=False)(x)
        x = jax.nn.relu(hk.BatchNorm(True, True, 0.9)(x, is_training=True))
        x = hk.Conv2D(8, 3, with_bias=False)(x)
        x = hk.BatchNorm(True, True, 0.9)(x, is_training=True)
        return hk.Linear(4)(jnp.mean(x, axis=(1, 2)))

    model = hk.transform_with_state(net)
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 3))
    params, state = model.init(jax.random.key(1), x)
    assert params["batch_norm"]["scale"].shape == (1, 1, 1, 8)

    def fn(p, x):
        return model.apply(p, state, None, x)[0]

    found = _found(fn, params, x)
    assert found["conv2_d/w"] == found["conv2_d_1/w"] == "unit"
    assert {found[p] for p in found if "batch_norm" in p or "linear" in p} == {None}
    # the shape-based callable skips the (1, 1, 1, C) leaves as well
    spec = osp.per_unit(params)
    assert spec["batch_norm"]["scale"] is None and spec["conv2_d"]["w"] == "unit"


class EqxCNN(eqx.Module):
    conv0: eqx.nn.Conv2d
    norm0: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    norm1: eqx.nn.GroupNorm
    proj: eqx.nn.Linear
    ln: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    activation: str = eqx.field(static=True, default="relu")

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.conv0 = eqx.nn.Conv2d(3, 6, 3, key=k[0])  # with a bias (6, 1, 1)
        self.norm0 = eqx.nn.GroupNorm(6, 6)  # per channel
        self.conv1 = eqx.nn.Conv2d(6, 6, 3, use_bias=False, key=k[1])
        self.norm1 = eqx.nn.GroupNorm(6, 6)
        self.proj = eqx.nn.Linear(6, 8, use_bias=False, key=k[2])
        self.ln = eqx.nn.LayerNorm(8)
        self.head = eqx.nn.Linear(8, 4, key=k[3])

    def __call__(self, x):  # one example (C, H, W)
        x = jax.nn.relu(self.norm0(self.conv0(x)))
        x = jax.nn.relu(self.norm1(self.conv1(x)))
        return self.head(self.ln(self.proj(jnp.mean(x, axis=(1, 2)))))


def test_equinox_cnn_groups_weights_out_first():
    model = EqxCNN(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 3, 7, 7))
    batched = lambda m, x: jax.vmap(m)(x)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    found = osp.find_groups(lambda p, x: batched(eqx.combine(p, static), x), params, x)
    by_path = {r.path: r.grouping for r in found.reports}
    assert by_path["conv0/weight"] == by_path["conv1/weight"] == "unit_out_first"
    assert by_path["proj/weight"] == "tensor"
    assert by_path["conv0/bias"] is None  # (6, 1, 1): no one-element groups
    assert by_path["head/weight"] is None
    # a module called on one example is found directly too
    single = osp.find_groups(model, x[0])
    assert {r.path: r.grouping for r in single.reports}["conv1/weight"] == "unit_out_first"
    # the spec fits the filtered tree (None leaves) and trains
    params = eqx.filter(model, eqx.is_inexact_array)
    tx = osp.adam_srt(1e-2, weight_decay=1e-4, groups=found)
    state = tx.init(params)
    grads = eqx.filter_grad(lambda m: jnp.sum(batched(m, x) ** 2))(model)
    updates, state = tx.update(grads, state, params)
    new = eqx.apply_updates(params, updates)
    norms = lambda w: jnp.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
    assert jnp.all(jnp.isfinite(norms(new.conv1.weight)))


def test_equinox_module_as_groups_tree_is_not_called():
    model = EqxCNN(jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    spec = jax.tree.map(
        lambda p: "unit_out_first" if p.ndim == 4 and p.shape[1] > 1 else None, params
    )
    grp = osp.resolve_groups(spec, params)
    assert grp.conv1.weight == osp.Group((1, 2, 3))
    assert grp.head.weight is None


class NnxCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv0 = nnx.Conv(1, 8, (3,), use_bias=False, rngs=rngs)
        self.bn0 = nnx.BatchNorm(8, rngs=rngs)
        self.conv1 = nnx.Conv(8, 8, (3,), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8 * 12, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn0(self.conv0(x)))
        x = nnx.relu(self.bn1(self.conv1(x)))
        return self.head(x.reshape(x.shape[0], -1))


def test_nnx_model_and_optimizer_one_compilation():
    model = NnxCNN(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (16, 12, 1))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 10)
    found = osp.find_groups(model, x)
    assert found.grouped == ["conv0/kernel", "conv1/kernel"]
    grp = osp.resolve_groups(found, nnx.state(model, nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(
        grp, is_leaf=lambda v: v is None or isinstance(v, osp.Group)
    )[0]
    by_path = {osp.path_str(p): g for p, g in flat}
    assert by_path["conv0/kernel"] == osp.Group((0, 1)) and by_path["head/kernel"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "groups not given" warning
        optimizer = nnx.Optimizer(model, osp.adam_srt(1e-2, groups=found), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, x, y):
        traces.append(1)
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, y)) for _ in range(5)]
    assert len(traces) == 1
    assert losses[-1] < losses[0]
    # the BatchNorm of the real model was not touched by the probes
    assert nnx.state(model, nnx.BatchStat) is not None


# ---------------------------------------------------------------------------------------------
# Property: random small networks


LAYERS = ("bn", "bn_bias", "ln", "ln_bias", "rms", "plain")


def _random_net(kinds: list[str], widths: list[int], seed: int):
    rng = np.random.default_rng(seed)
    params = {}
    din = 5
    for i, (kind, w) in enumerate(zip(kinds, widths)):
        layer = {"w": rng.standard_normal((din, w)).astype(np.float32) / np.sqrt(din)}
        if kind.endswith("bias") or kind == "plain":
            layer["b"] = rng.standard_normal(w).astype(np.float32)
        params[f"layer{i}"] = layer
        din = w
    params["head"] = {"w": rng.standard_normal((din, 3)).astype(np.float32)}

    def fn(p, x):
        for i, kind in enumerate(kinds):
            layer = p[f"layer{i}"]
            h = x @ layer["w"] + layer.get("b", 0.0)
            if kind.startswith("bn"):
                h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
            elif kind.startswith("ln"):
                h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
            elif kind == "rms":
                h = h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
            x = jnp.tanh(h) + 0.1 * h
        return x @ p["head"]["w"]

    return fn, jax.tree.map(jnp.asarray, params)


@settings(max_examples=12, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3),
    # a LayerNorm over 2 features outputs +-1 almost everywhere: nearly invariant to any
    # change of the layer before it, so "the rest is not invariant" needs 3 features or more
    width=st.integers(3, 9),
    seed=st.integers(0, 2**16),
)
def test_property_found_groups_are_invariant_and_the_rest_is_not(kinds, width, seed):
    fn, params = _random_net(kinds, [width] * len(kinds), seed)
    x = jax.random.normal(jax.random.key(seed), (16, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = osp.find_groups(fn, params, x)
    grp = osp.resolve_groups(found, params)
    out = fn(params, x)
    rng = np.random.default_rng(seed + 1)
    for (path, g), (_, p) in zip(
        jax.tree_util.tree_flatten_with_path(grp, is_leaf=lambda v: v is None)[0],
        jax.tree_util.tree_flatten_with_path(params)[0],
    ):
        key = osp.path_str(path)
        names = key.split("/")
        if g is not None:
            shape = g.scalar_shape(p.shape)
            c = jnp.asarray(np.exp(rng.uniform(-1.5, 1.5, shape)), p.dtype)
            scaled = _replace(params, names, p * c)
            np.testing.assert_allclose(
                fn(scaled, x), out, rtol=2e-3, atol=2e-3 * jnp.abs(out).max()
            )
        elif p.ndim >= 2:
            scaled = _replace(params, names, p * 2.0)
            # well above the float32 rounding and the eps of the normalisations (1e-6)
            change = float(jnp.max(jnp.abs(fn(scaled, x) - out)))
            assert change > 1e-5 * float(jnp.abs(out).max())


def _replace(params, names, value):
    new = jax.tree.map(lambda v: v, params)
    new[names[0]][names[1]] = value
    return new


# ---------------------------------------------------------------------------------------------
# Bad input and the report


def test_model_that_fails_names_its_error():
    fn = lambda p, x: x @ p["w"]
    with pytest.raises(ValueError, match="failed on the example inputs"):
        osp.find_groups(fn, {"w": jnp.ones((3, 2))}, jnp.ones((4, 5)))


def test_non_float_leaves_are_named():
    with pytest.raises(ValueError, match="'b'"):
        osp.find_groups(
            lambda p, x: x @ p["w"],
            {"w": jnp.ones((3, 2)), "b": jnp.ones(2, int)},
            jnp.ones((4, 3)),
        )
    with pytest.raises(ValueError, match="'name'"):
        osp.find_groups(lambda p, x: x, {"w": jnp.ones((3, 2)), "name": "dense"}, jnp.ones(3))


def test_linen_module_needs_its_variables():
    with pytest.raises(ValueError, match="variables"):
        osp.find_groups(ResNet(), jnp.ones((2, 8, 8, 3)))


def test_report_table():
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    variables = ResNet().init(jax.random.key(1), x)
    found = osp.find_groups(ResNet(), variables, x)
    table = str(found)
    assert "Dense_0/kernel" in table and "per unit (out last)" in table
    row = next(r for r in found.reports if r.path == "Conv_0/kernel")
    assert (row.group_size, row.num_groups) == (27, 8)
    assert row.sensitivity["unit"] < found.tolerance
    head = next(r for r in found.reports if r.path == "Dense_0/kernel")
    assert min(head.sensitivity.values()) > 10 * found.tolerance  # a wide margin


def test_found_groups_work_with_inject_hyperparams_and_report_unknown_paths():
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    variables = ResNet().init(jax.random.key(1), x)
    found = osp.find_groups(ResNet(), variables, x)
    tx = optax.inject_hyperparams(osp.adam_srt)(learning_rate=1e-3, groups=found)
    state = tx.init(variables["params"])
    assert state.hyperparams["learning_rate"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="'other/kernel'"):
        osp.adam_srt(1e-3, groups=found).init({"other": {"kernel": jnp.ones((3, 3))}})


# ---------------------------------------------------------------------------------------------
# Safe defaults


def test_default_groups_warn_and_reduce_to_the_base_optimizer():
    params = {"Dense_0": {"kernel": jnp.ones((4, 3)) * 0.5, "bias": jnp.zeros(3)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    with pytest.warns(UserWarning, match="find_groups"):
        tx = osp.adam_srt(1e-2, weight_decay=1e-3)
        state = tx.init(params)
        default, _ = tx.update(grads, state, params)
    base = osp.adam_srt(1e-2, weight_decay=1e-3, groups=None)
    expected, _ = base.update(grads, base.init(params), params)
    chex.assert_trees_all_equal(default, expected)


def test_unit_on_an_out_first_layout_warns():
    params = {"linear": {"weight": jnp.ones((4, 3)), "bias": jnp.ones(4)}}
    with pytest.warns(UserWarning, match="unit_out_first"):
        osp.resolve_groups("unit", params)
    grp = osp.resolve_groups("unit_out_first", params)
    assert grp["linear"]["weight"] == osp.Group((1,))


# ---------------------------------------------------------------------------------------------
# Seeing a wrong group during training


def test_monitored_flags_groups_that_are_not_invariant():
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 10)
    model = ResNet()
    variables = model.init(jax.random.key(2), x)
    params = variables["params"]
    # "unit" groups the classifier head too: that group is not radially invariant
    tx = osp.monitored(optax.adam(1e-3), groups="unit")
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        def loss_fn(p):
            logits, _ = model.apply(
                {**variables, "params": p}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = osp.History()
    with pytest.warns(UserWarning, match="Dense_0/kernel"):
        for i in range(3):
            params, state = step(params, state)
            history.record(i, state)
    logs = jax.device_get(osp.metrics(state))
    assert logs["Dense_0/kernel/radial_gradient/flagged"] > 0
    conv = [k for k in logs if k.endswith("kernel/radial_gradient/flagged") and "Conv" in k]
    assert len(conv) == 6 and all(logs[k] == 0 for k in conv)
    assert logs["Conv_0/kernel/radial_gradient/max"] < 1e-3
    assert history.flagged() == ["Dense_0/kernel"]
    ax = osp.plots.plot_angular_updates(history)
    labels = [line.get_label() for line in ax.get_lines()]
    assert "Dense_0/kernel (NOT radially invariant)" in labels


def test_low_precision_parameters_are_probed_in_float32():
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    variables = ResNet().init(jax.random.key(1), x)
    half = {
        **variables,
        "params": jax.tree.map(lambda p: p.astype(jnp.bfloat16), variables["params"]),
    }
    assert _found(ResNet(), half, x) == _found(ResNet(), variables, x)


class _BNNet(nn.Module):
    dropout: bool = False

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Dense(8, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        if self.dropout:
            x = nn.Dropout(0.5, deterministic=False)(x)
        return nn.Dense(3)(x)


@pytest.mark.parametrize(
    "case, cause",
    [
        ("eval mode", "running averages"),
        ("batch of one", "batch holds one example"),
        ("eval mode, dropout on", "dropout on"),
    ],
)
def test_no_groups_warning_names_the_cause_it_can_check(case, cause):
    x = jax.random.normal(jax.random.key(0), (16, 5))
    net = _BNNet(dropout="dropout" in case)
    variables = _BNNet().init(jax.random.key(1), x)
    inputs = x[:1] if case == "batch of one" else x
    kwargs = {"train": case == "batch of one", "rngs": {"dropout": jax.random.key(2)}}
    with pytest.warns(UserWarning, match=cause):
        found = osp.find_groups(net, variables, inputs, **kwargs)
    assert found.grouped == []
    # in training mode, on a batch, the same model's kernel is found
    assert osp.find_groups(_BNNet(), variables, x, train=True).grouped == ["Dense_0/kernel"]


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.tanh(nn.Dense(8)(x)))


def test_no_groups_warning_without_a_checkable_cause_says_so():
    x = jax.random.normal(jax.random.key(0), (16, 5))
    variables = _Mlp().init(jax.random.key(1), x)
    with pytest.warns(UserWarning, match="normalises nothing") as record:
        osp.find_groups(_Mlp(), variables, x)
    assert "BatchNorm" not in str(record[0].message)

    def mlp(p, x):  # a function with no normalisation: no BatchNorm hint
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    params = {"w1": jnp.ones((5, 8)) / 3, "w2": jnp.ones((8, 2)) / 3}
    with pytest.warns(UserWarning, match="normalises nothing") as record:
        osp.find_groups(mlp, params, x)
    assert "BatchNorm" not in str(record[0].message)


def test_no_groups_on_a_pre_ln_transformer_is_said_to_be_expected():
    import transformer_models as tm

    model, variables, apply = tm.linen_lm(0)
    tokens = jnp.asarray(tm.markov_batches(0, 4, 1)[0, :, : tm.CONTEXT])
    with pytest.warns(UserWarning, match="expected where the normalisations sit on a residual"):
        found = osp.find_groups(apply, variables["params"], tokens)
    assert found.grouped == []
    message = str(next(w for w in record_warnings(apply, variables["params"], tokens)).message)
    assert "rotational_groups" in message and "running averages" not in message


def record_warnings(*args):
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        osp.find_groups(*args)
    return record


def test_the_report_names_the_parameters_without_a_layer_structure():
    x = jax.random.normal(jax.random.key(0), (16, 5))
    variables = _BNNet().init(jax.random.key(1), x)
    table = osp.find_groups(_BNNet(), variables, x, train=True).table()
    assert "No layer structure for BatchNorm_0/bias, BatchNorm_0/scale, Dense_1/bias" in table
    assert "expected, they have no units" in table


def test_no_groups_warning_names_running_averages_of_an_nnx_model_in_eval_mode():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(5, 8, use_bias=False, rngs=rngs)
            self.norm = nnx.BatchNorm(8, rngs=rngs)
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.norm(self.dense(x))))

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (16, 5))
    model.eval()
    with pytest.warns(UserWarning, match="keeps running statistics"):
        assert osp.find_groups(model, x).grouped == []
    model.train()
    assert osp.find_groups(model, x).grouped == ["dense/kernel"]
