"""One trace per leaf signature: ``map_groups(..., trace_once=True)`` and the optimizers on it.

Inside ``jit`` the grouped leaves that share a group, shapes and dtypes go through one nested
``jax.jit`` of the per-group function, so a stack of identical layers is traced once; the
results are the per-leaf function's, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sphere
from optax_sphere.groups import Group, group_sq_norm, map_groups


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def _layers(n: int, width: int = 4, dtype=jnp.float64) -> dict:
    rng = np.random.default_rng(0)
    return {
        f"layer_{i}": {
            "kernel": jnp.asarray(rng.standard_normal((width + 1, width)), dtype),
            "bias": jnp.asarray(rng.standard_normal(width), dtype),
        }
        for i in range(n)
    }


def _normalised(calls: list):
    def fn(group, u, x):
        calls.append(u.shape)
        scale = 1.0 if group.units is None else 1.0 / group.units
        return scale * u / jnp.sqrt(group_sq_norm(x, group)), group_sq_norm(u, group)

    return fn


def _groups(params: dict) -> dict:
    return {k: {"kernel": Group((0,), units=1), "bias": None} for k in params}


def _no_bias(fn):
    def leaf(group, u, x):
        return (u, jnp.zeros(())) if group is None else fn(group, u, x)

    return leaf


def test_leaves_of_one_signature_are_traced_once_under_jit_with_the_same_results():
    params = _layers(6)
    grads = jax.tree.map(lambda x: 0.1 * x + 1.0, params)
    groups = _groups(params)
    once, each = [], []
    out_once = jax.jit(
        lambda u, x: map_groups(_no_bias(_normalised(once)), groups, u, x, trace_once=True)
    )(grads, params)
    out_each = jax.jit(lambda u, x: map_groups(_no_bias(_normalised(each)), groups, u, x))(
        grads, params
    )
    assert len(once) == 1 and len(each) == 6
    for a, b in zip(jax.tree.leaves(out_once), jax.tree.leaves(out_each)):
        np.testing.assert_array_equal(a, b)


def test_a_new_shape_dtype_axes_or_units_is_a_new_trace():
    params = _layers(2)
    params["wide"] = {"kernel": jnp.ones((5, 7)), "bias": jnp.zeros(7)}
    params["single"] = {"kernel": jnp.ones((5, 4), jnp.float32), "bias": jnp.zeros(4)}
    params["rows"] = {"kernel": jnp.ones((5, 4)), "bias": jnp.zeros(4)}
    params["many_units"] = {"kernel": jnp.ones((5, 4)), "bias": jnp.zeros(4)}
    groups = _groups(params)
    groups["rows"]["kernel"] = Group((1,), units=1)
    groups["many_units"]["kernel"] = Group((0,), units=4)  # equal to Group((0,)) as a group
    calls: list = []
    out = jax.jit(
        lambda u, x: map_groups(_no_bias(_normalised(calls)), groups, u, x, trace_once=True)
    )(params, params)
    # layer_0 and layer_1 share one trace; wide, single (float32), rows and many_units each
    # have their own
    assert len(calls) == 5
    plain = map_groups(_no_bias(_normalised([])), groups, params, params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # the float32 leaf's rounding
    # the units of the many_units group reached its own trace: u / ||x|| / 4
    np.testing.assert_allclose(out["many_units"]["kernel"][0], 0.25 / np.sqrt(5), rtol=1e-14)


def test_non_array_arguments_are_static_and_split_the_traces_by_value():
    params = _layers(4)
    rates = {k: {"kernel": 0.5 if i % 2 else 2.0, "bias": 1.0} for i, k in enumerate(params)}
    groups = _groups(params)
    calls: list = []

    def fn(group, x, rate):
        calls.append(rate)
        return rate * x

    out = jax.jit(lambda x: map_groups(fn, groups, x, rates, trace_once=True))(params)
    assert sorted(set(calls)) == [0.5, 1.0, 2.0] and calls.count(2.0) == 1
    for k in params:
        np.testing.assert_array_equal(out[k]["kernel"], rates[k]["kernel"] * params[k]["kernel"])


def test_outside_a_trace_the_function_runs_per_leaf():
    params = _layers(3)
    calls: list = []
    out = map_groups(_no_bias(_normalised(calls)), _groups(params), params, params, trace_once=True)
    assert len(calls) == 3
    assert isinstance(out["layer_0"]["kernel"][0], jax.Array)


def _jaxpr_size(jaxpr, seen=None) -> int:
    """Equations of a jaxpr, each distinct sub-jaxpr (a traced call) counted once."""
    seen = set() if seen is None else seen
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            sub = getattr(value, "jaxpr", value)
            if hasattr(sub, "eqns") and id(sub) not in seen:
                seen.add(id(sub))
                total += _jaxpr_size(sub, seen)
    return total


def _step_size(tx, params) -> int:
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return _jaxpr_size(jax.make_jaxpr(step)(params, state, params).jaxpr)


ALIASES = {
    "adam_s": {},
    "adam_srt": {},
    "sgdm_rt": {"learning_rate": 0.01},
    "psi_sgdm": {"learning_rate": 0.01},
    "sgdg": {"learning_rate": 0.01},
    "adamg": {},
    "adagradg": {"learning_rate": 0.01},
    "rv_adamw": {},
    "rv_sgdm": {"learning_rate": 0.01},
    "rv_lion": {"learning_rate": 1e-4},
    "adamp": {},
    "sgdp": {"learning_rate": 0.01},
    "adamh": {"learning_rate": 0.02, "ungrouped_learning_rate": 1e-3},
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_a_layer_more_costs_the_alias_what_it_costs_its_base_plus_a_few_calls(name):
    """The traced step grows per layer of one shape by the base optimizer's per-leaf
    operations and a few calls of the groups' kernels, not by the kernels' operations."""
    kwargs = ALIASES[name]
    alias = getattr(optax_sphere, name)

    def growth(**extra):
        sizes = [_step_size(alias(**kwargs, **extra), _layers(n)) for n in (4, 8)]
        return (sizes[1] - sizes[0]) / 4

    per_layer, base_per_layer = growth(groups="unit"), growth(groups=None)
    assert per_layer <= base_per_layer + 16, (per_layer, base_per_layer)
