"""The structure of every weight read from the computation (``optax_sphere.structure``), and the
groups ``find_groups`` finds on it: stacked layers, attention heads and every layout, in plain
functions, Flax linen, flax.nnx, Equinox and Haiku, each against a grouping derived by hand."""

from __future__ import annotations

import warnings

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tolerances import assert_within, float32_bound

import optax_sphere as osp
from optax_sphere.discovery import _candidates
from optax_sphere.groups import named_axes
from optax_sphere.structure import trace_structure

X = jnp.linspace(-1.0, 1.0, 2 * 4).reshape(2, 4)


def named_or_axes(report) -> tuple[int, ...]:
    """The axes of a report's grouping (a named spec or a tuple of axes)."""
    g = report.grouping
    return g if isinstance(g, tuple) else named_axes(g, len(report.shape))


def _matmul_custom_vjp():
    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    return matmul


def _matmul_custom_jvp():
    @jax.custom_jvp
    def matmul(x, w):
        return x @ w

    matmul.defjvp(lambda p, t: (p[0] @ p[1], t[0] @ p[1] + p[0] @ t[1]))
    return matmul


def _shard_map(fn):
    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(), P()), out_specs=P())


def _rnn(p, x):
    def body(carry):
        i, h = carry
        return i + 1, jnp.tanh(h @ p["w"] + x)

    return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, jnp.zeros_like(x)))[1]


# (function of (params, x), params, expected (input axes, unit axes, stack axes) per leaf)
CASES = {
    "dense": (lambda p, x: x @ p["w"], {"w": (4, 5)}, {"w": ((0,), (1,), ())}),
    "transposed (out, in)": (lambda p, x: x @ p["w"].T, {"w": (5, 4)}, {"w": ((1,), (0,), ())}),
    "einsum": (
        lambda p, x: jnp.einsum("bi,oi->bo", x, p["w"]),
        {"w": (5, 4)},
        {"w": ((1,), (0,), ())},
    ),
    "cast to bfloat16": (
        lambda p, x: x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16),
        {"w": (4, 5)},
        {"w": ((0,), (1,), ())},
    ),
    "weight normalisation": (
        lambda p, x: x @ (p["w"] / jnp.linalg.norm(p["w"], axis=0, keepdims=True)),
        {"w": (4, 5)},
        {"w": ((0,), (1,), ())},
    ),
    "gain times kernel": (
        lambda p, x: x @ (p["w"] * p["g"]),
        {"w": (4, 5), "g": (5,)},
        # the gain scales each unit of the layer: its axis indexes the units, no input axis
        {"w": ((0,), (1,), ()), "g": ((), (0,), ())},
    ),
    "heads (in, heads, head_dim)": (
        lambda p, x: jnp.einsum("bi,ihd->bhd", x, p["q"]),
        {"q": (4, 2, 3)},
        {"q": ((0,), (1, 2), ())},
    ),
    "merged inputs (heads, head_dim, out)": (
        lambda p, x: jnp.einsum("bhd,hdo->bo", x.reshape(2, 2, 2), p["o"]),
        {"o": (2, 2, 5)},
        {"o": ((0, 1), (2,), ())},
    ),
    "kernel stored flat, split by a reshape": (
        lambda p, x: jnp.einsum("bij,ijo->bo", x.reshape(2, 2, 2), p["w"].reshape(2, 2, 5)),
        {"w": (4, 5)},
        {"w": ((0,), (1,), ())},
    ),
    "kernel stored split, merged by a reshape": (
        lambda p, x: x @ p["w"].reshape(4, 6),
        {"w": (4, 2, 3)},
        {"w": ((0,), (1, 2), ())},
    ),
    "scan over a stack": (
        lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0],
        {"w": (3, 4, 4)},
        {"w": ((1,), (2,), (0,))},
    ),
    "fori_loop indexing a stack": (
        lambda p, x: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x),
        {"w": (3, 4, 4)},
        {"w": ((1,), (2,), (0,))},
    ),
    "vmap over stacked weights": (
        lambda p, x: jax.vmap(lambda w, x: x @ w)(p["w"], jnp.stack([x, 2 * x, 3 * x])),
        {"w": (3, 4, 5)},
        {"w": ((1,), (2,), (0,))},
    ),
    "while loop from zeros (recurrent)": (_rnn, {"w": (4, 4)}, {"w": ((0,), (1,), ())}),
    "cond": (
        lambda p, x: jax.lax.cond(x.sum() > 0, lambda: x @ p["w"], lambda: x @ (2 * p["w"])),
        {"w": (4, 5)},
        {"w": ((0,), (1,), ())},
    ),
    "nested jit and remat": (
        lambda p, x: jax.jit(jax.checkpoint(lambda w, x: jnp.tanh(x @ w)))(p["w"], x),
        {"w": (4, 5)},
        {"w": ((0,), (1,), ())},
    ),
    "custom_vjp": (
        lambda p, x: _matmul_custom_vjp()(x, p["w"]),
        {"w": (4, 5)},
        {"w": ((0,), (1,), ())},
    ),
    "custom_jvp": (
        lambda p, x: _matmul_custom_jvp()(x, p["w"]),
        {"w": (4, 5)},
        {"w": ((0,), (1,), ())},
    ),
    "shard_map": (
        lambda p, x: _shard_map(lambda w, x: x @ w)(p["w"], x),
        {"w": (4, 5)},
        {"w": ((0,), (1,), ())},
    ),
    "convolution (out, in, kh, kw)": (
        lambda p, x: jax.lax.conv_general_dilated(
            x.reshape(1, 2, 2, 2),
            p["w"],
            (1, 1),
            "SAME",
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        ),
        {"w": (3, 2, 3, 3)},
        {"w": ((1, 2, 3), (0,), ())},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_structure_read_through_every_form(case):
    fn, shapes, expected = CASES[case]
    params = {k: jnp.full(s, 0.5) for k, s in shapes.items()}
    structure = trace_structure(fn, params, X)
    for path, (inputs, units, stack) in expected.items():
        leaf = structure[path]
        assert (leaf.input_axes, leaf.unit_axes, leaf.stack_axes) == (inputs, units, stack), leaf
        assert leaf.known


def test_embedding_lookup_tied_head_bias_and_unknown_structures_in_words():
    def fn(p, ids):
        x = p["embed"][ids] + p["bias"]  # (B, D)
        h = x @ (p["a"] @ p["b"])  # a low-rank product: two parameters before the data
        return (h @ p["embed"].T) * p["temperature"]  # tied head, a learnable temperature

    params = {
        "embed": jnp.ones((7, 4)),
        "bias": jnp.ones(4),
        "a": jnp.ones((4, 2)),
        "b": jnp.ones((2, 4)),
        "unused": jnp.ones((3, 3)),
        "temperature": jnp.ones(()),
        "empty": jnp.ones((0, 4)),
    }
    s = trace_structure(fn, params, jnp.array([1, 2]))
    embed = s["embed"]
    assert (embed.input_axes, embed.unit_axes) == ((1,), (0,))
    assert embed.lookup and embed.head
    assert set(embed.consumers) == {"gather", "dot_general"}
    assert "elementwise" in s["bias"].note
    assert "another parameter" in s["a"].note and "another parameter" in s["b"].note
    assert s["unused"].note == "the outputs do not depend on it"
    assert "elementwise" in s["temperature"].note  # a scalar is followed too
    assert s["empty"].note == "the outputs do not depend on it"
    assert "structure unknown" in s["a"].describe()
    assert "rows on axis 0" in embed.describe() and "the head" in embed.describe()
    assert "unused" in s.table()


# ---------------------------------------------------------------------------------------------
# Frameworks


def _structure(model, *args, **kwargs):
    from optax_sphere._models import as_function

    f, params, inputs, _ = as_function(model, args, kwargs)
    return {leaf.path: leaf for leaf in trace_structure(f, params, *inputs)}


def test_haiku_linear_and_conv_are_out_last():
    def forward(x):
        x = hk.Conv2D(4, 3)(x)
        return hk.Linear(3)(x.reshape(x.shape[0], -1))

    net = hk.without_apply_rng(hk.transform(forward))
    x = jnp.ones((2, 5, 5, 2))
    params = net.init(jax.random.key(0), x)
    s = _structure(net.apply, params, x)
    assert (s["conv2_d/w"].input_axes, s["conv2_d/w"].unit_axes) == ((0, 1, 2), (3,))
    assert (s["linear/w"].input_axes, s["linear/w"].unit_axes) == ((0,), (1,))
    assert s["linear/w"].head and not s["conv2_d/w"].head


def test_equinox_conv_and_linear_are_out_first():
    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        linear: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.conv = eqx.nn.Conv2d(2, 4, 3, key=k1)
            self.linear = eqx.nn.Linear(4 * 3 * 3, 3, key=k2)

        def __call__(self, x):
            return jax.vmap(lambda x: self.linear(self.conv(x).ravel()))(x)

    s = _structure(Net(jax.random.key(0)), jnp.ones((2, 2, 5, 5)))
    assert (s["conv/weight"].input_axes, s["conv/weight"].unit_axes) == ((1, 2, 3), (0,))
    assert (s["linear/weight"].input_axes, s["linear/weight"].unit_axes) == ((1,), (0,))
    # the conv bias (out, 1, 1) is added elementwise
    assert not s["conv/bias"].known


class _ScannedLayer(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x, _):
        y = nn.Dense(16, use_bias=False)(x)
        if self.norm == "batch":
            y = nn.BatchNorm(use_running_average=False)(y)
        else:
            y = nn.LayerNorm(use_bias=False, use_scale=False)(y)
        return nn.relu(y), None


class _LinenStack(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _ScannedLayer,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=4,
        )
        x, _ = stack(self.norm, name="stack")(x, None)
        return nn.Dense(3)(x)


@pytest.mark.parametrize(
    "norm, groups, size, words",
    [
        ("batch", 64, 16, "per layer of a stack of 4, per unit"),  # one per layer and unit
        ("layer", 4, 256, "per layer of a stack of 4"),  # one per layer
    ],
)
def test_linen_scanned_stack_is_grouped_one_layer_at_a_time(norm, groups, size, words):
    x = jax.random.normal(jax.random.key(0), (8, 16))
    variables = _LinenStack(norm).init(jax.random.key(1), x)
    found = osp.find_groups(_LinenStack(norm), variables, x)
    row = next(r for r in found.reports if r.path == "stack/Dense_0/kernel")
    assert row.shape == (4, 16, 16)
    assert (row.num_groups, row.group_size, row.description) == (groups, size, words)
    assert named_or_axes(row) == ((1,) if norm == "batch" else (1, 2))
    assert "a stack of 4 on axis 0" in row.structure
    # the coarser groupings that cross the stack are invariant too, but not chosen
    assert row.sensitivity["tensor"] < found.tolerance


class _EqxStack(eqx.Module):
    """Four layers ``(out, in)`` stacked on axis 0 and scanned, each followed by a batch
    normalisation (per unit, over the batch) or a layer normalisation (over the layer's
    outputs), written by hand."""

    weight: jax.Array
    head: eqx.nn.Linear
    norm: str = eqx.field(static=True)

    def __init__(self, norm, key):
        k1, k2 = jax.random.split(key)
        self.weight = jax.random.normal(k1, (4, 16, 16)) / 4
        self.head = eqx.nn.Linear(16, 3, key=k2)
        self.norm = norm

    def __call__(self, x):  # a batch (B, 16)
        axis = 0 if self.norm == "batch" else 1

        def layer(h, w):
            y = h @ w.T
            y = (y - y.mean(axis, keepdims=True)) / jnp.sqrt(y.var(axis, keepdims=True) + 1e-6)
            return jax.nn.relu(y), None

        h, _ = jax.lax.scan(layer, x, self.weight)
        return jax.vmap(self.head)(h)


@pytest.mark.parametrize(
    "norm, grouping, groups, size", [("batch", (2,), 64, 16), ("layer", (1, 2), 4, 256)]
)
def test_equinox_stacked_layers_out_first_are_grouped_one_layer_at_a_time(
    norm, grouping, groups, size
):
    x = jax.random.normal(jax.random.key(0), (8, 16))
    found = osp.find_groups(_EqxStack(norm, jax.random.key(1)), x)
    row = next(r for r in found.reports if r.path == "weight")
    assert (named_or_axes(row), row.num_groups, row.group_size) == (grouping, groups, size)
    assert row.description.startswith("per layer of a stack of 4")


def test_nnx_scanned_stack_is_grouped_one_layer_at_a_time():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(8, 8, use_bias=False, rngs=rngs)
            self.norm = nnx.BatchNorm(8, use_running_average=False, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.norm(self.linear(x)))

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)
            self.head = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(x, block):
                return block(x)

            return self.head(run(x, self.blocks))

    model = Model(nnx.Rngs(0))
    found = osp.find_groups(model, jax.random.normal(jax.random.key(0), (8, 8)))
    row = next(r for r in found.reports if r.path == "blocks/linear/kernel")
    assert (row.shape, row.grouping, row.num_groups, row.group_size) == ((3, 8, 8), (1,), 24, 8)
    assert found.grouped == ["blocks/linear/kernel"]


def test_nnx_attention_with_qk_norm_is_grouped_per_head():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.attention = nnx.MultiHeadAttention(
                4, 16, qkv_features=32, use_bias=False, normalize_qk=True, decode=False, rngs=rngs
            )

        def __call__(self, x):
            return self.attention(x)

    found = osp.find_groups(Model(nnx.Rngs(0)), jax.random.normal(jax.random.key(0), (2, 5, 16)))
    by_path = {r.path: r for r in found.reports}
    for name in ("query", "key"):
        row = by_path[f"attention/{name}/kernel"]
        assert row.shape == (16, 4, 8)
        assert (row.grouping, row.num_groups, row.group_size) == ((0, 2), 4, 128)
        assert row.description == "per head (axis 1)"
        assert row.units_per_group == 8  # a head's width: the units one group holds
    assert by_path["attention/value/kernel"].grouping is None


# ---------------------------------------------------------------------------------------------
# Specs checked against the structure


def test_check_groups_names_a_spec_that_crosses_a_stack_or_splits_the_inputs():
    x = jax.random.normal(jax.random.key(0), (8, 16))
    variables = _LinenStack("batch").init(jax.random.key(1), x)
    model = _LinenStack("batch")
    params = variables["params"]
    spec = jax.tree.map(lambda _: None, params)
    spec["stack"]["Dense_0"]["kernel"] = "unit"  # all axes but the last: crosses the stack
    with pytest.raises(ValueError, match=r"stack/Dense_0/kernel.*cross the stack on axis 0"):
        osp.check_groups(spec, model, variables, x)
    spec["stack"]["Dense_0"]["kernel"] = (2,)  # the outputs of a unit: splits its inputs
    with pytest.raises(ValueError, match=r"axes \(1,\) of one unit's inputs are split"):
        osp.check_groups(spec, model, variables, x)
    for fits in ((1,), "unit_out_first"):  # one layer's units, one layer
        spec["stack"]["Dense_0"]["kernel"] = fits
        osp.check_groups(spec, model, variables, x)
    found = osp.find_groups(model, variables, x)
    found.check(found, params)
    with pytest.raises(ValueError, match="cross the stack"):
        found.check({**spec, "stack": {**spec["stack"], "Dense_0": {"kernel": "tensor"}}}, params)


def test_unit_out_first_on_a_flax_kernel_warns():
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    with pytest.warns(UserWarning, match=r"named 'kernel'.*groups='unit'"):
        osp.resolve_groups("unit_out_first", params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert osp.resolve_groups("unit", params)["Dense_0"]["kernel"] == osp.Group((0,))


# ---------------------------------------------------------------------------------------------
# Random stacked and multi-head networks


NORMS = ("batch", "layer", "none")
HEAD_NORMS = ("per_head", "all_heads", "none")


def _net(layers, width, heads, head_dim, norm, head_norm, seed):
    """A stack of ``layers`` layers ``(width, width)``, scanned, each followed by ``norm``;
    then a query-like kernel ``(width, heads, head_dim)`` followed by ``head_norm``; then a
    head. Returns ``fn, params`` and the expected (number of groups, group size) of the stack
    and of the query kernel (``None``: not invariant)."""
    k = jax.random.split(jax.random.key(seed), 3)
    params = {
        "stack": jax.random.normal(k[0], (layers, width, width)) / np.sqrt(width),
        "query": jax.random.normal(k[1], (width, heads, head_dim)) / np.sqrt(width),
        "head": jax.random.normal(k[2], (heads * head_dim, 3)),
    }

    def normalise(y, axes):
        y = y - y.mean(axes, keepdims=True)
        return y / jnp.sqrt((y * y).mean(axes, keepdims=True) + 1e-12)

    def fn(p, x):
        def layer(h, w):
            y = h @ w
            y = {"batch": normalise(y, 0), "layer": normalise(y, 1), "none": y}[norm]
            return jnp.tanh(y) + 0.1 * h, None

        h, _ = jax.lax.scan(layer, x, p["stack"])
        q = jnp.einsum("bi,ihd->bhd", h, p["query"])
        q = {"per_head": normalise(q, 2), "all_heads": normalise(q, (1, 2)), "none": q}[head_norm]
        return jnp.tanh(q.reshape(q.shape[0], -1)) @ p["head"]

    stack = {
        "batch": (layers * width, width),
        "layer": (layers, width * width),
        "none": None,
    }[norm]
    query = {
        "per_head": (heads, width * head_dim),
        "all_heads": (1, width * heads * head_dim),
        "none": None,
    }[head_norm]
    return fn, params, stack, query


@settings(max_examples=10, deadline=None)
@given(
    layers=st.integers(1, 3),
    width=st.integers(3, 6),
    heads=st.integers(1, 3),
    # a normalisation over 2 values outputs +-1: invariant to anything (test_discovery.py)
    head_dim=st.integers(3, 4),
    norm=st.sampled_from(NORMS),
    head_norm=st.sampled_from(HEAD_NORMS),
    seed=st.integers(0, 2**16),
)
def test_property_groups_of_stacked_multi_head_nets_are_invariant_and_none_finer(
    layers, width, heads, head_dim, norm, head_norm, seed
):
    fn, params, stack, query = _net(layers, width, heads, head_dim, norm, head_norm, seed)
    x = jax.random.normal(jax.random.key(seed + 1), (16, width))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a net with no invariant group warns
        found = osp.find_groups(fn, params, x)
    rows = {r.path: r for r in found.reports}
    for path, expected in (("stack", stack), ("query", query)):
        row = rows[path]
        got = None if row.grouping is None else (row.num_groups, row.group_size)
        if expected is not None and expected[1] < 2:
            expected = None
        assert got == expected, (path, row)
    # every group found is invariant, and no finer candidate is
    out = fn(params, x)
    rng = np.random.default_rng(seed)
    structure = found.structure
    for path in ("stack", "query"):
        row = rows[path]
        if row.grouping is None:
            continue
        chosen = set(
            osp.resolve_groups({**{k: None for k in params}, path: row.grouping}, params)[path].axes
        )
        leaf = params[path]
        for candidate in _candidates(leaf.shape, "out_last", structure[path]):
            axes = set(candidate.axes)
            if not axes <= chosen:
                continue
            # factors spread over [1/2, 2], every group its own: no two groups alike
            shape = osp.Group(candidate.axes).scalar_shape(leaf.shape)
            factors = np.exp(np.linspace(-np.log(2), np.log(2), int(np.prod(shape))))
            c = jnp.asarray(rng.permutation(factors).reshape(shape))
            change = jnp.max(jnp.abs(fn({**params, path: leaf * c}, x) - out)) / jnp.max(
                jnp.abs(out)
            )
            if axes == chosen:  # invariant up to float32 rounding through the network
                assert_within(float(change), float32_bound(layers + 3, condition=1e3), path)
            else:
                assert change > 1e-2, (path, candidate)  # a finer grouping is seen
