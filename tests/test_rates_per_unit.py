"""Rates per unit: the units each group holds, and SGD-G / PSI at one rate for every group size.

A unit-norm group of ``k`` units turns about ``k`` times as far per step as one unit at the
same rate of SGD-G or PSI; with ``rate_per="unit"`` (the default) a group of ``k`` units takes
``rate / k``. The units are counted from the model's structure (``find_groups``), are 1 for
the named per-unit specs and can be given (``Group(axes, units=k)``); where they are unknown,
``init`` says so.
"""

import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_sphere as osp

SIZED = {
    "sgdg": lambda lr, **kw: osp.sgdg(lr, **kw),
    "psi_sgd": lambda lr, **kw: osp.psi_sgd(lr, **kw),
    "psi_sgdm": lambda lr, **kw: osp.psi_sgdm(lr, **kw),
    "scale_by_psi_metric": lambda lr, **kw: optax.chain(
        osp.scale_by_psi_metric(**kw), optax.sgd(lr, momentum=0.9)
    ),
}


class _MLP(nn.Module):
    """Two LayerNorm layers of ``width`` units (kernels without bias) and a head."""

    width: int

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.relu(nn.LayerNorm()(nn.Dense(self.width, use_bias=False)(x)))
        return nn.Dense(4)(x)


class _EqxLN(eqx.Module):
    proj: eqx.nn.Linear
    ln: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k0, k1 = jax.random.split(key)
        self.proj = eqx.nn.Linear(16, 48, use_bias=False, key=k0)
        self.ln = eqx.nn.LayerNorm(48)
        self.head = eqx.nn.Linear(48, 3, key=k1)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.ln(self.proj(x))))


def _found_linen():
    x = jax.random.normal(jax.random.key(1), (8, 16))
    model = _MLP(48)
    params = model.init(jax.random.key(0), x)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    return osp.find_groups(apply, params, x), params, ("Dense_0", "kernel")


def _found_equinox():
    x = jax.random.normal(jax.random.key(1), (8, 16))
    model = _EqxLN(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    apply = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    return osp.find_groups(apply, params, x), params, ("proj", "weight")


def _leaf(tree, path):
    for name in path:
        tree = tree[name] if isinstance(tree, dict) else getattr(tree, name)
    return tree


@pytest.mark.parametrize("build", [_found_linen, _found_equinox], ids=["linen", "equinox"])
def test_a_layernorm_kernel_grouped_per_tensor_holds_all_its_units(build):
    found, params, path = build()
    row = next(r for r in found.reports if r.path == "/".join(path))
    assert (row.grouping, row.units_per_group) == ("tensor", 48)
    group = _leaf(osp.resolve_groups(found, params), path)
    assert group.units == 48 and group == osp.Group((0, 1))  # units are metadata
    assert all(r.units_per_group is None for r in found.reports if r.grouping is None)


def test_units_per_layer_of_a_stack():
    def stacked(p, x):  # 3 layers of (16, 24) kernels, each layer normalised per tensor
        def layer(h, w):
            z = h @ w
            z = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-6)
            return jnp.tanh(z[..., :16]), None

        return jax.lax.scan(layer, x, p["blocks"])[0] @ p["head"]

    rng = np.random.default_rng(0)
    p = {"blocks": jnp.asarray(rng.normal(size=(3, 16, 24))), "head": jnp.ones((16, 2))}
    found = osp.find_groups(stacked, p, jnp.asarray(rng.normal(size=(6, 16))))
    row = next(r for r in found.reports if r.path == "blocks")
    assert (row.num_groups, row.group_size, row.units_per_group) == (3, 16 * 24, 24)
    group = osp.resolve_groups(found, p)["blocks"]
    assert (group.axes, group.units) == ((1, 2), 24)


def test_named_specs_count_one_unit_and_tensor_specs_are_not_known():
    w = jnp.ones((4, 3))
    assert osp.resolve_groups("unit", w).units == 1
    assert osp.resolve_groups("unit_out_first", w).units == 1
    assert osp.resolve_groups((0,), w).units == 1  # the same axes as 'unit'
    assert osp.resolve_groups("tensor", w).units is None
    assert osp.resolve_groups((0,), jnp.ones(5)).units == 1  # a vector: one direction
    assert osp.resolve_groups(osp.Group((0, 1), units=3), w).units == 3
    assert repr(osp.Group((0, 1), units=3)) == "Group(axes=(0, 1), units=3)"
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="units"):
            osp.Group((0,), units=bad)


@pytest.mark.parametrize("name", sorted(SIZED))
def test_init_names_the_groups_whose_units_are_not_known_at_any_rate(name):
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    for lr in (0.2, 1e-3):
        with pytest.warns(UserWarning, match=r"how many units the groups of 'w' \(4, 3\)"):
            SIZED[name](lr, groups={"w": "tensor", "b": None}).init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for groups in (
            {"w": "unit", "b": None},
            {"w": osp.Group((0, 1), units=3), "b": None},
        ):
            SIZED[name](0.2, groups=groups).init(params)
        SIZED[name](0.2, rate_per="group", groups={"w": "tensor", "b": None}).init(params)
    with pytest.raises(ValueError, match="rate_per"):
        SIZED[name](0.2, rate_per="tensor", groups=None)


def _copies_loss(k):
    """A per-tensor invariant loss of ``k`` units, ``sum_i phi(sqrt(k) w_i / ||W||)``: at ``k``
    equal units it is ``k`` copies of the one-unit loss ``phi(u / ||u||)``."""
    a = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4)))

    def phi(u):  # u: (d,) of unit norm
        return jnp.sum(jnp.sin(a[:, : u.shape[0]] @ u + 0.3) ** 2)

    def loss(w):  # w: (d, k), units in columns
        unit = jnp.sqrt(k) * w / jnp.linalg.norm(w)
        return sum(phi(unit[:, i]) for i in range(k))

    return loss


def _trajectory(tx, loss, w, steps):
    @jax.jit
    def step(w, state):
        updates, state = tx.update(jax.grad(loss)(w), state, w)
        return optax.apply_updates(w, updates), state

    state, out = tx.init(w), []
    for _ in range(steps):
        w, state = step(w, state)
        out.append(w)
    return out


@settings(max_examples=10, deadline=None)
@given(
    k=st.integers(2, 6),
    d=st.integers(2, 4),
    lr=st.floats(0.01, 0.3),
    name=st.sampled_from(sorted(SIZED)),
)
def test_a_tensor_of_k_equal_units_follows_one_units_trajectory_at_the_same_rate(k, d, lr, name):
    """SGD-G and PSI per unit: a group of ``k`` equal units moves each of them as the unit
    alone moves at the same rate; at the rate as given (``rate_per="group"``) it does not."""
    with jax.enable_x64(True):
        v = jnp.asarray(np.random.default_rng(k * 10 + d).normal(size=(d, 1)))
        if name == "sgdg":  # Cho & Lee's gradient is taken where the point is: on the sphere
            v = v / jnp.linalg.norm(v)
        # SGD-G keeps the whole group on the unit sphere: each copy at 1 / sqrt(k) of the unit
        scale = 1 / np.sqrt(k) if name == "sgdg" else 1.0
        tensor = scale * jnp.tile(v, (1, k))  # k copies of the unit v
        unit_path = _trajectory(SIZED[name](lr, groups="unit"), _copies_loss(1), v, 8)
        group = osp.Group((0, 1), units=k)
        tensor_path = _trajectory(SIZED[name](lr, groups=group), _copies_loss(k), tensor, 8)
        for x1, xk in zip(unit_path, tensor_path):
            # Cho & Lee's 1e-8 in every normalisation meets norms k times apart: 1e-8 relative
            np.testing.assert_allclose(xk, scale * np.tile(x1, (1, k)), rtol=1e-6, atol=1e-9)
        as_given = SIZED[name](lr, rate_per="group", groups=osp.Group((0, 1)))
        first = _trajectory(as_given, _copies_loss(k), tensor, 1)[0]
        assert np.max(np.abs(first - scale * np.tile(unit_path[0], (1, k)))) > 1e-4


# ---------------------------------------------------------------------------------------------
# A LayerNorm MLP whose kernels find_groups groups per tensor: one rate at every width

#: each alias at its rate (one unit's) and its base (the registry's) at the same rates, both
#: built from the groups (which the base ignores)
TRAINED = {
    "sgdg": (
        lambda groups: osp.sgdg(0.02, ungrouped_learning_rate=0.2, groups=groups),
        lambda _: optax.sgd(0.2, momentum=0.9, nesterov=True),
    ),
    "psi_sgd": (lambda groups: osp.psi_sgd(0.1, groups=groups), lambda _: optax.sgd(0.1)),
    "psi_sgdm": (
        lambda groups: osp.psi_sgdm(0.03, groups=groups),
        lambda _: optax.sgd(0.03, momentum=0.9),
    ),
}
WIDTHS = (32, 128)
#: the alias's final training loss is at most its base's plus this (the losses start near 1.4)
MARGIN = 0.15


def _teacher_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, 16)).astype(np.float32)
    hidden = np.tanh(x @ rng.standard_normal((16, 32)))
    return x, np.argmax(hidden @ rng.standard_normal((32, 4)), axis=1)


def _final_loss(width, build, steps=300, batch=64):
    """The training loss after ``steps`` of the optimizer ``build(groups)`` (``find_groups``'s
    groups of the MLP of this width), same initialisation and batches for every optimizer."""
    x, y = _teacher_data()
    model = _MLP(width)
    params = model.init(jax.random.key(0), x[:2])["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    tx = build(osp.find_groups(apply, params, x[:64]))
    loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    @jax.jit
    def step(p, state, xb, yb):
        updates, state = tx.update(jax.grad(loss)(p, xb, yb), state, p)
        return optax.apply_updates(p, updates), state

    state, order = tx.init(params), np.random.default_rng(1)
    for _ in range(steps):
        idx = order.integers(0, len(x), batch)
        params, state = step(params, state, x[idx], y[idx])
    return float(loss(params, x, y))


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_a_layernorm_mlp_grouped_per_tensor_trains_as_its_base_at_one_rate_for_every_width(name):
    alias, base = TRAINED[name]
    for width in WIDTHS:
        ours, theirs = _final_loss(width, alias), _final_loss(width, base)
        assert np.isfinite(ours) and ours <= theirs + MARGIN, (width, ours, theirs)


def test_sgdg_at_its_rate_taken_per_group_fails_on_a_wide_layernorm_layer():
    """The rate per group turns a 128-unit group 128 times as far: it diverges (the norm
    scales off the sphere follow the noise until the gradients overflow) or does not train."""
    as_given = lambda g: osp.sgdg(0.02, ungrouped_learning_rate=0.2, rate_per="group", groups=g)
    per_unit = _final_loss(WIDTHS[-1], TRAINED["sgdg"][0])
    loss = _final_loss(WIDTHS[-1], as_given)
    assert not np.isfinite(loss) or loss > per_unit + 0.3, (loss, per_unit)


if __name__ == "__main__":  # the losses behind the tests above: python tests/test_rates_per_unit.py
    for name, (alias, base) in sorted(TRAINED.items()):
        for width in (32, 128, 512):
            ours, theirs = _final_loss(width, alias), _final_loss(width, base)
            print(f"{name:9s} width {width:4d}: {ours:.3f} (base {theirs:.3f})", flush=True)
