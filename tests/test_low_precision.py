"""Low-precision parameters: bfloat16 and float16 params work for every optimizer, per-group
reductions and moments are accumulated in (at least) float32, the state dtype is the documented
one and does not drift between steps, and a bf16 run follows the float32 one."""

import alias_cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_within, bfloat16_bound

LOW = [jnp.bfloat16, jnp.float16]


def _params(dtype, scale=1.0):
    rng = np.random.default_rng(0)
    tree = {
        "conv": rng.normal(size=(3, 3, 4, 8)),
        "dense": rng.normal(size=(16, 8)),
        "bias": rng.normal(size=8),
    }
    return jax.tree.map(lambda x: jnp.asarray(scale * x, dtype), tree)


def _target(params):
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def _grads(params, target):
    """Gradient of ``-<u, a>`` per output unit (scale-invariant: tangent and -1 homogeneous,
    like a kernel followed by BatchNorm), and of ``||p - a||^2 / 2`` for vectors, computed in
    float32 and handed over in the params dtype, as a mixed-precision model would."""

    def leaf(p, a):
        x = p.astype(jnp.float32)
        if x.ndim < 2:
            g = x - a
        else:
            axes = tuple(range(x.ndim - 1))
            r = jnp.sqrt(jnp.sum(x * x, axes, keepdims=True))
            u = x / r
            g = -(a - jnp.sum(a * u, axes, keepdims=True) * u) / r
        return g.astype(p.dtype)

    return jax.tree.map(leaf, params, target)


def _known_float16_limitation(case, dtype, request):
    if dtype == jnp.float16 and case.float16_limitation:
        request.applymarker(pytest.mark.xfail(strict=True, reason=case.float16_limitation))


def _float_leaves(state):
    return [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", alias_cases.params())
def test_low_precision_params_dtypes_of_updates_and_state(case, dtype, request):
    _known_float16_limitation(case, dtype, request)
    params = _params(dtype)
    tx = case.make()
    state = tx.init(params)
    expected = jnp.float32 if case.state_dtype == "float32" else dtype
    assert all(x.dtype == expected for x in _float_leaves(state)), case.state_dtype
    update = jax.jit(tx.update)
    target = _target(params)
    for _ in range(3):
        updates, new_state = update(_grads(params, target), state, params)
        assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
        # same dtypes and structure after the step: usable as a lax.scan / fori_loop carry
        assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)
        params, state = optax.apply_updates(params, updates), new_state
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("case", alias_cases.params())
def test_float16_group_whose_squared_norm_overflows_float16(case, request):
    """Weights of size 200 in groups of 144 elements: ||x||^2 = 5.8e6 is far beyond float16's
    largest value (65504). Reductions accumulated in float16 would give inf and NaN updates."""
    _known_float16_limitation(case, jnp.float16, request)
    params = _params(jnp.float16, scale=200.0)
    tx = case.make()
    state = tx.init(params)
    grads = _grads(params, _target(params))
    assert not bool(jnp.all(jnp.isfinite(jnp.sum(params["conv"] ** 2))))  # the trap is real
    updates, state = tx.update(grads, state, params)
    for tree in (updates, state):
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in _float_leaves(tree)), case.name
    assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))


def _unit_directions(params):
    def leaf(p):
        x = np.asarray(p, np.float64)
        if x.ndim < 2:
            return x
        return x / np.linalg.norm(x.reshape(-1, x.shape[-1]), axis=0)

    return jax.tree.map(leaf, params)


@pytest.mark.parametrize("case", alias_cases.params())
def test_bfloat16_run_stays_close_to_float32(case):
    """20 steps from the same start with bf16 and float32 params: every unit direction (what a
    normalised network computes with) and every vector stays within the bf16 rounding of 20
    steps of the float32 run, and moves as far. bf16 has 8 significant bits, so each weight is
    rounded to about 0.2% every step."""
    finals = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        params = _params(dtype)
        target = _target(params)
        tx = case.make()
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(20):
            updates, state = update(_grads(params, target), state, params)
            params = optax.apply_updates(params, updates)
        finals[jnp.dtype(dtype).name] = _unit_directions(params)
    start = _unit_directions(_params(jnp.float32))
    for name in finals["float32"]:
        full, low = finals["float32"][name], finals["bfloat16"][name]
        moved = np.abs(full - start[name]).max()
        assert moved > 0.05, f"{case.name}/{name}: the float32 run barely moved ({moved})"
        err = np.abs(low - full).max()
        assert_within(err, bfloat16_bound(steps=20), f"{case.name}/{name}: bf16 from float32")
        # and it moves: rounding does not stall it (a bf16 step below half an ulp is lost)
        assert np.abs(low - start[name]).max() > 0.5 * moved, f"{case.name}/{name}: bf16 stalled"


@pytest.mark.parametrize("case", alias_cases.params())
def test_float64_params_keep_a_float64_state(case):
    """Accumulation in at least float32 means float64 for float64 params, whatever the
    state's dtype rule ("float32": at least float32; "params": the params' dtype)."""
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        tx = case.make()
        state = tx.init(params)
        updates, state = tx.update(_grads(params, _target(params)), state, params)
        assert all(x.dtype == jnp.float64 for x in _float_leaves(state))
        assert all(u.dtype == jnp.float64 for u in jax.tree.leaves(updates))
