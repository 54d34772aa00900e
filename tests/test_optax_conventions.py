"""Every alias against the conventions of optax's own optimizers, with the optax optimizer it
extends as the control (in the manner of optax's ``alias_test.py``): one compilation per train
step, extra keyword arguments, ``None`` leaves, abstract ``init``, ``inject_hyperparams``,
states built before the parameters are sharded, and finding a monitor inside optax wrappers."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tolerances import assert_trees_close, float32_bound

import optax_sphere as osp

# alias name -> (keyword arguments, the optax optimizer it extends)
ALIASES = {
    "adam_s": ({"learning_rate": 1e-2}, lambda: optax.adam(1e-2)),
    "adam_st": ({"learning_rate": 1e-2}, lambda: optax.adam(1e-2)),
    "adam_srt": ({"learning_rate": 1e-2}, lambda: optax.adam(1e-2)),
    "sgdm_rt": ({"learning_rate": 0.1}, lambda: optax.sgd(0.1, 0.9)),
    "rv_adamw": ({"learning_rate": 1e-2}, lambda: optax.adamw(1e-2)),
    "rv_sgdm": ({"learning_rate": 0.1}, lambda: optax.sgd(0.1, 0.9)),
    "rv_lion": ({"learning_rate": 1e-3}, lambda: optax.lion(1e-3)),
    "wrapped_adam_l2": ({"learning_rate": 1e-2}, lambda: optax.adam(1e-2)),
    "adamg": ({"learning_rate": 1e-2}, lambda: optax.adam(1e-2)),
    "sgdg": ({"learning_rate": 0.1}, lambda: optax.sgd(0.1, 0.9)),
    "adagradg": ({"learning_rate": 0.1}, lambda: optax.adagrad(0.1)),
    "psi_sgd": ({"learning_rate": 0.1}, lambda: optax.sgd(0.1)),
    "psi_sgdm": ({"learning_rate": 0.1}, lambda: optax.sgd(0.1, 0.9)),
    "adamp": ({"learning_rate": 1e-2}, lambda: optax.adam(1e-2)),
    "sgdp": ({"learning_rate": 0.1}, lambda: optax.sgd(0.1, 0.9)),
}
NAMES = list(ALIASES)


def _make(name: str, **overrides) -> optax.GradientTransformation:
    kwargs, _ = ALIASES[name]
    return getattr(osp, name)(**{**kwargs, "groups": "unit", **overrides})


def _controls(name: str):
    """The alias and its optax base: every check below runs on both."""
    return [("alias", _make(name)), ("optax", ALIASES[name][1]())]


def _params():
    k = jax.random.split(jax.random.key(0), 2)
    return {
        "conv": {"kernel": jax.random.normal(k[0], (3, 3, 4, 8))},
        "dense": {"kernel": jax.random.normal(k[1], (8, 5)), "bias": jnp.zeros(5)},
    }


def _grads(params, i=0):
    return jax.tree.map(lambda p: jnp.cos(p + i) * 0.1, params)


@pytest.mark.parametrize("name", NAMES)
def test_one_compilation_per_train_step(name):
    for label, tx in _controls(name):
        traces = []
        step = jax.jit(_train_step(tx, traces))
        params = _params()
        state = tx.init(params)
        for i in range(4):
            params, state = step(params, state, i)
        assert len(traces) == 1, label


def _train_step(tx, traces):
    def step(params, state, i):
        traces.append(1)
        updates, state = tx.update(_grads(params, i), state, params)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("name", NAMES)
def test_state_is_uncommitted_like_optax(name):
    params = _params()
    for label, tx in _controls(name):
        for leaf in jax.tree.leaves(tx.init(params)):
            assert not getattr(leaf, "_committed", False), label


@pytest.mark.parametrize("name", NAMES)
def test_extra_keyword_arguments_to_update(name):
    params = _params()
    for _, tx in _controls(name):
        tx = optax.with_extra_args_support(tx)
        state = tx.init(params)
        plain, _ = tx.update(_grads(params), state, params)
        extra, _ = tx.update(_grads(params), state, params, value=jnp.ones(()), grad=None)
        chex.assert_trees_all_equal(plain, extra)
    assert isinstance(_make(name), optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize("name", NAMES)
def test_none_leaves_as_equinox_filter_leaves_them(name):
    params = {**_params(), "activation": None, "static": {"flag": None}}
    for label, tx in _controls(name):
        state = tx.init(params)
        updates, _ = tx.update(_grads(params), state, params)
        assert updates["activation"] is None and updates["static"]["flag"] is None, label
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", NAMES)
def test_init_on_abstract_values(name):
    params = _params()
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    for label, tx in _controls(name):
        concrete = tx.init(params)
        shapes = jax.eval_shape(tx.init, params)
        direct = tx.init(abstract)
        for other in (shapes, direct):
            assert jax.tree.structure(other) == jax.tree.structure(concrete), label
            for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(concrete)):
                assert (a.shape, a.dtype) == (b.shape, b.dtype), label


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_keeps_the_state_structure(name):
    params = _params()
    kwargs, _ = ALIASES[name]
    plain = _make(name).init(params)
    injected = optax.inject_hyperparams(getattr(osp, name))(**kwargs, groups="unit")
    state = injected.init(params)
    assert jax.tree.structure(state.inner_state) == jax.tree.structure(plain)
    ours, _ = injected.update(_grads(params), state, params)
    reference, _ = _make(name).update(_grads(params), plain, params)
    # the injected hyperparameters are float32 arrays: one step of float32 rounding apart,
    # through AdamP's divisions by norms and cosines (condition up to 1e3)
    assert_trees_close(ours, reference, float32_bound(steps=1, condition=1e3))


@pytest.mark.parametrize("name", NAMES)
def test_state_from_unsharded_params_works_once_they_are_sharded(name):
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    params = _params()
    spec = {"conv": {"kernel": PartitionSpec(None, None, None, "data")},
            "dense": {"kernel": PartitionSpec(None, None), "bias": PartitionSpec()}}  # fmt: skip
    for label, tx in _controls(name):
        state = tx.init(params)  # before the parameters are sharded
        sharded = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), params, spec)
        step = jax.jit(lambda p, s, tx=tx: tx.update(_grads(p), s, p))
        updates, _ = step(sharded, state)
        expected, _ = tx.update(_grads(params), state, params)
        # a split reduction sums in another order: one step of float32 rounding, amplified by
        # the rotational normalisation of a group (a division by a difference of sums)
        assert_trees_close(updates, expected, float32_bound(steps=1, condition=100))
        assert label


def test_monitor_found_inside_multi_transform_and_masked():
    params = _params()
    tx = optax.multi_transform(
        {
            "sphere": optax.chain(osp.adam_srt(1e-2, groups="unit"), osp.monitor(groups="unit")),
            "rest": optax.sgd(0.1),
        },
        {"conv": "sphere", "dense": "rest"},
    )
    state = tx.init(params)
    _, state = tx.update(_grads(params), state, params)
    found = osp.find_monitor_state(state)
    assert isinstance(found, osp.MonitorState)
    assert "conv/kernel/angular_update/mean" in osp.metrics(state)
    masked = optax.masked(optax.chain(optax.adam(1e-2), osp.monitor(groups="unit")),
                          {"conv": True, "dense": False})  # fmt: skip
    assert isinstance(osp.find_monitor_state(masked.init(params)), osp.MonitorState)


WEIGHT_DECAY_ALIASES = ["adam_s", "adam_st", "adam_srt", "sgdm_rt", "adamp", "sgdp"]


@pytest.mark.parametrize("name", WEIGHT_DECAY_ALIASES)
def test_weight_decay_mask_as_optax_adamw(name):
    """``mask`` keeps the decay off the masked-out leaves: with a mask that selects nothing the
    alias is the alias without decay; a callable mask and a tree mask agree."""
    params = _params()
    grads = _grads(params)
    none = jax.tree.map(lambda _: False, params)
    only_kernels = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    without = _make(name, weight_decay=0.0)
    off = _make(name, weight_decay=0.1, mask=none)
    a, _ = without.update(grads, without.init(params), params)
    b, _ = off.update(grads, off.init(params), params)
    chex.assert_trees_all_equal(a, b)
    as_tree = _make(name, weight_decay=0.1, mask=only_kernels(params))
    as_callable = _make(name, weight_decay=0.1, mask=only_kernels)
    full = _make(name, weight_decay=0.1)
    c, _ = as_tree.update(grads, as_tree.init(params), params)
    d, _ = as_callable.update(grads, as_callable.init(params), params)
    e, _ = full.update(grads, full.init(params), params)
    chex.assert_trees_all_equal(c, d)
    np.testing.assert_array_equal(c["dense"]["bias"], a["dense"]["bias"])  # masked out
    assert not np.allclose(c["dense"]["kernel"], a["dense"]["kernel"])  # decayed
    np.testing.assert_array_equal(c["dense"]["kernel"], e["dense"]["kernel"])


def _is_view_of(treedef, tree):
    try:
        treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
        return False
    return True


@pytest.mark.parametrize("name", NAMES)
def test_tree_map_params_with_a_spec_tree_maps_every_buffer_like_the_params(name):
    """``optax.tree.map_params`` calls ``init`` on a placeholder with no leaves: a spec written
    leaf by leaf must accept it, and the map must reach every field shaped like the params
    (here casting them to bfloat16) and nothing else."""
    params = _params()
    spec = {"conv": {"kernel": "unit"}, "dense": {"kernel": "unit", "bias": None}}
    for label, tx in (("alias", _make(name, groups=spec)), ("optax", ALIASES[name][1]())):
        state = tx.init(params)
        updates, state = tx.update(_grads(params), state, params)
        cast = optax.tree.map_params(tx, lambda v: v.astype(jnp.bfloat16), state)
        like = jax.tree.structure(params)
        for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(cast)):
            assert after.shape == before.shape, label
        # shaped like the params, or a view of them (MaskedNode in the place of the leaves of
        # the other part of on_groups' partition)
        buffers = [
            n for n in osp._utils.named_fields(cast, osp._utils.MOMENTUM_FIELDS)
            if jax.tree.leaves(n) and _is_view_of(like, n)
        ]  # fmt: skip
        no_momentum = name in ("adagradg", "psi_sgd")  # neither keeps a momentum
        assert (buffers or no_momentum) and all(
            x.dtype == jnp.bfloat16 for b in buffers for x in jax.tree.leaves(b)
        ), label
