"""Checkpoints: every optimizer state is a pytree of arrays that round-trips through
``orbax.checkpoint`` and ``flax.serialization``, and a run resumed from a checkpoint taken in
the middle follows the uninterrupted run bit for bit (CPU, same compiled step)."""

import alias_cases
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

STEPS, RESUME_AT = 6, 3


def _params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
        },
    }


def _grads(params, t):
    return jax.tree.map(lambda x: jnp.cos(2.0 * x + 0.3 * t) + 0.1 * x, params)


def _steps(update, params, state, start, stop):
    for t in range(start, stop):
        updates, state = update(_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y)), "not bit-for-bit equal"


def _wrapped(case):
    """The case inside the optax wrappers whose state must be saved with it."""
    inner = optax.inject_hyperparams(case.factory)(**case.kwargs)
    return optax.MultiSteps(optax.apply_if_finite(inner, max_consecutive_errors=3), 2)


@pytest.mark.parametrize("case", alias_cases.params())
def test_state_is_a_pytree_of_arrays(case):
    params = _params()
    tx = case.make()
    state = tx.init(params)
    _, state = tx.update(_grads(params, 0), state, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("case", alias_cases.params())
def test_orbax_resume_in_the_middle_is_bit_for_bit(case, wrapped, tmp_path):
    make = (lambda: _wrapped(case)) if wrapped else case.make
    params0 = _params()
    tx = make()
    update = jax.jit(tx.update)
    full_params, full_state = _steps(update, params0, tx.init(params0), 0, STEPS)

    params, state = _steps(update, params0, tx.init(params0), 0, RESUME_AT)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "step3", {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()

    # a new process: a fresh optimizer, the state's shapes from its init, then the restore
    fresh = make()
    target = jax.eval_shape(lambda p: {"params": p, "opt_state": fresh.init(p)}, params0)
    restored = checkpointer.restore(tmp_path / "step3", target)
    _assert_bitwise_equal(restored, {"params": params, "opt_state": state})
    assert type(restored["opt_state"]) is type(state)

    # the same compiled step (a new process compiles the same program)
    resumed = _steps(update, restored["params"], restored["opt_state"], RESUME_AT, STEPS)
    _assert_bitwise_equal(resumed, (full_params, full_state))


@pytest.mark.parametrize("case", alias_cases.params())
def test_flax_serialization_round_trip_and_resume(case):
    params0 = _params()
    tx = case.make()
    update = tx.update  # eager, both runs
    full = _steps(update, params0, tx.init(params0), 0, STEPS)
    params, state = _steps(update, params0, tx.init(params0), 0, RESUME_AT)

    blob = flax.serialization.to_bytes({"params": params, "opt_state": state})
    fresh = case.make()
    template = {"params": params0, "opt_state": fresh.init(params0)}
    restored = flax.serialization.from_bytes(template, blob)
    _assert_bitwise_equal(restored, {"params": params, "opt_state": state})
    state_dict = flax.serialization.to_state_dict(state)
    _assert_bitwise_equal(
        flax.serialization.from_state_dict(template["opt_state"], state_dict), state
    )

    resumed = _steps(fresh.update, restored["params"], restored["opt_state"], RESUME_AT, STEPS)
    _assert_bitwise_equal(resumed, full)
