"""Masks and Muon's dimension numbers read from the structure (``weight_decay_mask``,
``muon_dimension_numbers``) on the transformer language models of Flax linen, flax.nnx
(stacked blocks, ``nnx.scan``) and Equinox (stacked blocks, ``lax.scan``), and on a mixture of
experts whose weights are ``(layers, experts, d_in, d_out)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformer_models as tm
from optax.contrib import MuonDimensionNumbers

import optax_sphere as osp
from optax_sphere._paths import path_str
from optax_sphere.structure import muon_dimension_numbers, weight_decay_mask

MODELS = {"linen": tm.linen_lm, "nnx": tm.nnx_lm, "equinox": tm.eqx_lm}
EXPECTED = {"linen": tm.LINEN_GROUPS, "nnx": tm.NNX_GROUPS, "equinox": tm.EQX_GROUPS}
TOKENS = jnp.zeros((2, tm.CONTEXT), jnp.int32)
is_numbers = lambda x: x is None or isinstance(x, MuonDimensionNumbers)


def _args(framework):
    model, variables, _ = MODELS[framework](0)
    return model, ((variables, TOKENS) if framework == "linen" else (TOKENS,))


def _params(framework):
    model, variables, _ = MODELS[framework](0)
    return variables["params"] if framework == "linen" else variables


def _tree(numbers):
    """The tree of an Equinox model's numbers comes behind a function (optax calls a callable
    argument, and a module is callable)."""
    return numbers(None) if callable(numbers) and not hasattr(numbers, "items") else numbers


def _flat(tree, is_leaf=None):
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf)[0]}


@pytest.mark.parametrize("framework", MODELS)
def test_the_weight_decay_mask_is_the_kernels_and_embeddings_stacked_or_not(framework):
    model, args = _args(framework)
    mask = weight_decay_mask(model, *args)
    decayed = {p for p, x in _flat(mask).items() if x}
    # every kernel and embedding (the rotational groups of Kosson et al.), nothing else:
    # not the (L, d) norm scales and gains of a stack, which ndim >= 2 would decay
    assert decayed == set(EXPECTED[framework])
    params = _params(framework)
    stacked_2d = [p for p, x in _flat(params).items() if x.ndim == 2 and p not in decayed]
    assert (framework == "linen") or stacked_2d  # the trap is there on the stacked trees
    # optax takes it as is: with a zero gradient only the masked leaves decay
    tx = optax.adamw(1e-2, weight_decay=0.5, mask=mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, u in _flat(updates).items():
        expected = -1e-2 * 0.5 * _flat(params)[path] if path in decayed else 0 * u
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-9, err_msg=path)


@pytest.mark.parametrize("framework", MODELS)
def test_muon_dimension_numbers_cover_the_hidden_matrices_with_the_stack_as_batch(framework):
    model, args = _args(framework)
    numbers = _flat(_tree(muon_dimension_numbers(model, *args)), is_numbers)
    given = {p for p, x in numbers.items() if x is not None}
    hidden = {p for p in EXPECTED[framework] if not p.startswith(("head", "embed", "Embed"))}
    assert given == hidden
    params = _flat(_params(framework))
    for path in given:
        n, shape = numbers[path], params[path].shape
        batch = set(range(len(shape))) - set(n.reduction_axis) - set(n.output_axis)
        assert batch == ({0} if framework != "linen" else set()), (path, n)
    # the head too on request
    with_head = _flat(_tree(muon_dimension_numbers(model, *args, head=True)), is_numbers)
    assert {p for p, x in with_head.items() if x is not None} == given | {
        p for p in EXPECTED[framework] if p.startswith("head")
    }


def _muon_updates(params, grads, numbers):
    tx = optax.contrib.muon(0.02, muon_weight_dimension_numbers=numbers)
    return tx.update(grads, tx.init(params), params)[0]


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_muon_with_the_numbers_equals_muon_applied_to_each_layer_by_hand(framework):
    model, args = _args(framework)
    params = _params(framework)
    grads = jax.tree.map(lambda x: jnp.cos(3.0 * x + 1.0), params)
    numbers = muon_dimension_numbers(model, *args)
    updates = _flat(_muon_updates(params, grads, numbers))
    flat_numbers, flat_params, flat_grads = (
        _flat(_tree(numbers), is_numbers),
        _flat(params),
        _flat(grads),
    )
    checked = 0
    for path, n in flat_numbers.items():
        if n is None or len(flat_params[path].shape) != 3:
            continue
        # one layer of the stack, a plain matrix with the layer's (reduction, output) axes
        layer_numbers = MuonDimensionNumbers(n.reduction_axis[0] - 1, n.output_axis[0] - 1)
        for layer in range(tm.BLOCKS):
            by_hand = _muon_updates(
                {"w": flat_params[path][layer]}, {"w": flat_grads[path][layer]},
                {"w": layer_numbers},
            )["w"]  # fmt: skip
            np.testing.assert_allclose(updates[path][layer], by_hand, rtol=2e-5, atol=1e-7)
            checked += 1
    assert checked >= 2 * tm.BLOCKS


def test_muon_per_head_orthogonalises_each_head_of_an_attention_kernel():
    model, args = _args("linen")
    params = _params("linen")
    grads = jax.tree.map(lambda x: jnp.cos(3.0 * x + 1.0), params)
    numbers = muon_dimension_numbers(model, *args, per_head=True)
    query = "LinenBlock_0/MultiHeadDotProductAttention_0/query/kernel"  # (d, heads, head_dim)
    out = "LinenBlock_0/MultiHeadDotProductAttention_0/out/kernel"  # (heads, head_dim, d)
    flat = _flat(numbers, is_numbers)
    assert flat[query] == MuonDimensionNumbers((0,), (2,))
    assert flat[out] == MuonDimensionNumbers((1,), (2,))
    updates = _flat(_muon_updates(params, grads, numbers))
    g = _flat(grads)[query]
    for h in range(tm.HEADS):
        by_hand = _muon_updates({"w": _flat(params)[query][:, h]}, {"w": g[:, h]}, None)["w"]
        np.testing.assert_allclose(updates[query][:, h], by_hand, rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# A mixture of experts: (layers, experts, d_in, d_out), tokens dispatched to every expert


LAYERS, EXPERTS, DIM = 2, 3, 8


def _moe(p, x):
    def layer(h, w):
        gate = jax.nn.softmax(h @ w["router"], axis=-1)  # (B, E)
        dispatched = jnp.broadcast_to(h, (EXPERTS, *h.shape))  # (E, B, d)
        out = jax.lax.dot_general(dispatched, w["experts"], (((2,), (1,)), ((0,), (0,))))
        mixed = jnp.einsum("ebd,be->bd", jax.nn.gelu(out), gate)
        return h + mixed * w["gain"], None

    return jax.lax.scan(layer, x, p)[0]


def _moe_params():
    k = jax.random.split(jax.random.key(0), 2)
    return {
        "experts": jax.random.normal(k[0], (LAYERS, EXPERTS, DIM, DIM)) / DIM**0.5,
        "router": jax.random.normal(k[1], (LAYERS, DIM, EXPERTS)) / DIM**0.5,
        "gain": jnp.ones((LAYERS, DIM)),
    }


def test_a_mixture_of_experts_gets_groups_per_expert_within_a_layer():
    params, x = _moe_params(), jax.random.normal(jax.random.key(1), (4, DIM))
    structure = osp.structure.trace_structure(_moe, params, x)
    experts = structure["experts"]
    assert experts.stack_axes == (0, 1) and experts.input_axes == (2,)
    assert experts.unit_axes == (3,)
    found = osp.rotational_groups(_moe, params, x)
    (report,) = [r for r in found.reports if r.path == "experts"]
    assert report.grouping == (2,) and report.num_groups == LAYERS * EXPERTS * DIM
    # Muon: one orthogonalisation per layer and expert; no decay on the stacked gains
    n = muon_dimension_numbers(_moe, params, x, head=True)["experts"]
    assert n == MuonDimensionNumbers((2,), (3,))
    assert weight_decay_mask(_moe, params, x) == {"experts": True, "router": True, "gain": False}
