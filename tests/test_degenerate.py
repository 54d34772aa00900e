"""Degenerate data never turns into NaN: zero-norm groups (a zero-initialised kernel, a dead
unit), groups of dimension 1, empty and scalar leaves, denormal values, and non-finite
gradients (contained by ``optax.apply_if_finite``; without it, confined to their own leaf).

Documented behaviour (docs/reliability.md): a group at the origin has no direction, so the
transports and rescalings leave its momentum as it is; with a zero gradient it stays exactly at
the origin; with a nonzero gradient it moves like its base optimizer would ("moves"), except for
optimizers whose step is proportional to the group's norm (rotational and PSI optimizers), for
which the origin is a fixed point ("stays").
"""

import alias_cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sphere as osp


def _finite(tree):
    return all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    )


def _nonfinite_paths(tree):
    return [
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and not bool(jnp.all(jnp.isfinite(x)))
    ]


def degenerate_params():
    """One parameter tree holding every degenerate leaf at once, beside ordinary ones."""
    rng = np.random.default_rng(0)
    dead = rng.normal(size=(5, 4))
    dead[:, 1] = 0.0  # a dead unit: one output unit with all-zero weights
    return {
        "zero_kernel": jnp.zeros((3, 3, 2, 4), jnp.float32),  # zero-initialised kernel
        "dead_unit": jnp.asarray(dead, jnp.float32),
        "dim1": jnp.asarray(rng.normal(size=(1, 4)), jnp.float32),  # per-unit groups of d = 1
        "empty_rows": jnp.zeros((0, 4), jnp.float32),  # 4 groups of dimension 0
        "empty_cols": jnp.zeros((4, 0), jnp.float32),  # no group at all
        "empty_vector": jnp.zeros((0,), jnp.float32),
        "scalar": jnp.asarray(0.7, jnp.float32),
        "denormal": jnp.full((3, 4), 1e-40, jnp.float32),  # below float32's smallest normal
        "kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
    }


GRADIENTS = {
    "zero": lambda p, t: jax.tree.map(jnp.zeros_like, p),
    "smooth": lambda p, t: jax.tree.map(lambda x: jnp.sin(3.0 * x + t + 1.0), p),
    "denormal": lambda p, t: jax.tree.map(lambda x: jnp.full_like(x, 1e-41), p),
    "large": lambda p, t: jax.tree.map(lambda x: jnp.full_like(x, 1e15), p),
}


def _run(tx, params, grad_fn, steps=4):
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates = None
    for t in range(steps):
        updates, state = update(grad_fn(params, t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state, updates


@pytest.mark.parametrize("case", alias_cases.params())
def test_degenerate_leaves_give_finite_updates_and_state(case):
    """Every degenerate leaf, under zero, smooth, denormal and large gradients in turn."""
    kinds = ["zero", "smooth", "denormal", "large", "smooth", "zero"]
    params = degenerate_params()
    tx = case.make()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t, kind in enumerate(kinds):
        updates, state = update(GRADIENTS[kind](params, t), state, params)
        params = optax.apply_updates(params, updates)
        for tree, what in ((updates, "updates"), (state, "state"), (params, "params")):
            assert _finite(tree), (
                f"{case.name}: non-finite {what} after a {kind} gradient at "
                f"{_nonfinite_paths(tree)}"
            )
    assert params["empty_rows"].shape == (0, 4) and params["scalar"].shape == ()


@pytest.mark.parametrize("case", alias_cases.params())
def test_zero_group_with_zero_gradient_stays_exactly_at_the_origin(case):
    params = degenerate_params()
    tx = case.make()
    state = tx.init(params)
    for t in range(3):
        grads = GRADIENTS["smooth"](params, t)
        grads["zero_kernel"] = jnp.zeros_like(grads["zero_kernel"])
        grads["dead_unit"] = grads["dead_unit"].at[:, 1].set(0.0)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert not np.any(np.asarray(params["zero_kernel"]))
    assert not np.any(np.asarray(params["dead_unit"][:, 1]))
    assert np.all(
        np.asarray(params["dead_unit"][:, 0]) != np.asarray(degenerate_params()["dead_unit"][:, 0])
    )


@pytest.mark.parametrize("case", alias_cases.params())
def test_zero_group_moves_with_its_gradient_or_stays_as_documented(case):
    params = degenerate_params()
    params_after, _, _ = _run(case.make(), params, GRADIENTS["smooth"], steps=2)
    moved = np.abs(np.asarray(params_after["zero_kernel"])).max()
    moved_unit = np.abs(np.asarray(params_after["dead_unit"][:, 1])).max()
    if case.zero_group == "moves":
        assert moved > 0 and moved_unit > 0
    else:
        assert moved == 0 and moved_unit == 0


def test_groups_of_dimension_one_make_standardisation_adam():
    """A group of one element: standardisation is then Adam's element-wise second moment
    (Roburin et al. eq. 60 with d = 1), so Adam-S is Adam with coupled L2."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(1, 3)) + 3.0, jnp.float32)}  # 3 groups, d = 1
    tx = osp.adam_s(1e-2, 0.9, 0.99, 1e-8, 1e-3, groups={"w": "unit"})
    ref = optax.chain(optax.add_decayed_weights(1e-3), optax.adam(1e-2, 0.9, 0.99, 1e-8))
    a, _, _ = _run(tx, params, GRADIENTS["smooth"], steps=5)
    b, _, _ = _run(ref, params, GRADIENTS["smooth"], steps=5)
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)


@pytest.mark.parametrize("alias", [osp.adam_st, osp.adam_srt, osp.sgdm_rt])
def test_groups_of_dimension_one_have_no_tangent_momentum(alias):
    """The sphere of a group of one element is two points: its tangent space is {0}, so the
    transport of Roburin et al. eq. 72 sends the momentum to zero after every step that keeps the
    sign (``<u_k, u_k+1> a - <a, u_k+1> u_k = a - a``). Each step is then the current
    gradient's step: finite, and no stale momentum."""
    params = {"w": jnp.asarray([[3.0, -2.0, 4.0]], jnp.float32)}
    tx = alias(learning_rate=1e-2, groups={"w": "unit"})
    state = tx.init(params)
    field = "mu" if hasattr(osp.grouped_state(state), "mu") else "trace"

    def momentum(state):
        return getattr(osp.grouped_state(state), field)

    def without_momentum(state):  # the same state, its groups' momentum zero
        inner = dict(state.inner_states)
        sphere = osp.grouped_state(state)
        zero = sphere._replace(**{field: jax.tree.map(jnp.zeros_like, momentum(state))})
        inner["grouped"] = inner["grouped"]._replace(inner_state=zero)
        return state._replace(inner_states=inner)

    for t in range(3):
        grads = GRADIENTS["smooth"](params, t)
        # The state holds the momentum before its transport (documented): the transported
        # part of the previous momentum is what must vanish, so the step equals, bit for
        # bit, the one from a zero momentum.
        stale = momentum(state)["w"]
        fresh_updates, fresh_state = tx.update(grads, without_momentum(state), params)
        updates, state = tx.update(grads, state, params)
        assert np.any(np.asarray(updates["w"]))
        assert t == 0 or np.any(np.asarray(stale))  # there was a momentum to drop
        np.testing.assert_array_equal(updates["w"], fresh_updates["w"])
        np.testing.assert_array_equal(momentum(state)["w"], momentum(fresh_state)["w"])
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("case", alias_cases.params())
def test_non_finite_gradient_without_apply_if_finite_stays_in_its_own_leaf(case):
    """Without ``optax.apply_if_finite`` a NaN or Inf gradient reaches the update and the
    state of the leaf it is in (as in optax), and no other leaf."""
    params = degenerate_params()
    tx = case.make()
    state = tx.init(params)
    for bad in (jnp.nan, jnp.inf):
        grads = GRADIENTS["smooth"](params, 0)
        grads["kernel"] = grads["kernel"].at[2, 1].set(bad)
        updates, new_state = tx.update(grads, state, params)
        assert not _finite(updates["kernel"])
        others = {k: v for k, v in updates.items() if k != "kernel"}
        assert _finite(others), f"{case.name}: the non-finite gradient leaked to {others.keys()}"


@pytest.mark.parametrize("case", alias_cases.params())
def test_non_finite_gradient_under_apply_if_finite_leaves_state_exactly_unchanged(case):
    params = degenerate_params()
    tx = optax.apply_if_finite(case.make(), max_consecutive_errors=5)
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates, state = update(GRADIENTS["smooth"](params, 0), state, params)
    params = optax.apply_updates(params, updates)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        grads = GRADIENTS["smooth"](params, 1)
        grads["dead_unit"] = grads["dead_unit"].at[0, 0].set(bad)
        updates, new_state = update(grads, state, params)
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
        before, after = state.inner_state, new_state.inner_state
        assert jax.tree.structure(before) == jax.tree.structure(after)
        for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        assert int(new_state.notfinite_count) == int(state.notfinite_count) + 1
        state = new_state
    updates, state = update(GRADIENTS["smooth"](params, 2), state, params)
    assert _finite(updates) and any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
