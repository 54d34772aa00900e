"""Sharded and data-parallel runs give the single-device results, for every alias.

Runs on the 8 simulated CPU devices of ``conftest.py``: parameters and optimizer state split
with ``jax.sharding`` (including a group axis split across devices, FSDP style, so the
per-group reductions cross devices), and ``jax.pmap`` data parallelism with ``lax.pmean`` of
the gradients. Aliases not in this build are skipped, so each one is covered as soon as it
exists.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import assert_within, float64_bound, leaf_relative_error

import optax_sphere as osp

# The claim is exact: a sharded or data-parallel run computes the single-device run's
# arithmetic, with the sums of a group or of a gradient split across devices and so added in
# another order. So it is checked in float64, where reordering a sum moves its result by the
# unit roundoff times the condition of the sum; over the steps, the condition of a step (a
# division by a norm, a renormalisation) multiplies it. Measured here: 2e-15 on the iterate and
# the first moments. Second moments and the other per-group sums of squares are quadratic in
# the gradient (d(g^2) / g^2 = 2 dg / g) and a difference of sums for the rotational tracker
# q = ||U_perp||^2, which doubles to quintuples their condition.
RTOL = float64_bound(steps=3, condition=100)
RTOL_SECOND_MOMENT = 5 * RTOL
PER_GROUP_SUMS = ("nu", "q", "momentum_offset", "mu_offset")
STEPS = 3

ALIASES = {
    "adam_s": {"learning_rate": 1e-2, "weight_decay": 1e-2},
    "adam_st": {"learning_rate": 1e-2, "weight_decay": 1e-2},
    "adam_srt": {"learning_rate": 1e-2, "weight_decay": 1e-2},
    "sgdm_rt": {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
    "adamg": {"learning_rate": 1e-2},
    "sgdg": {"learning_rate": 0.05, "momentum": 0.9},
    "adagradg": {"learning_rate": 0.05},
    # PSI steps are lr ||w||^2 g: ||w||^2 ~ 36 for the conv groups here, so lr = 0.002 takes
    # steps like the SGD ones (lr 0.05 made 1.8 per element: a trajectory so ill-conditioned
    # that float32 on one device is itself 4e-5 away from float64, and sharding can't match)
    "psi_sgd": {"learning_rate": 0.002},
    "psi_sgdm": {"learning_rate": 0.002, "momentum": 0.9},
    "rv_adamw": {"learning_rate": 1e-2, "weight_decay": 0.1},
    "rv_sgdm": {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
    "rv_lion": {"learning_rate": 1e-3, "weight_decay": 0.1},
    "adamp": {"learning_rate": 1e-2, "weight_decay": 1e-2},
    "sgdp": {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
}


def _alias(name: str, **extra) -> optax.GradientTransformation:
    return getattr(osp, name)(**{"groups": "unit", **ALIASES[name], **extra})


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


FSDP = ("data", "model")  # both mesh axes: a split over all 8 devices

# name: (shape, partition spec, group spec)
LEAVES = {
    "conv": ((3, 3, 16, 8), P(None, None, FSDP, None), "unit"),  # group axis over 8 devices
    "conv_bn_scale": ((8,), P("model"), None),
    "dense": ((32, 8), P("model", "data"), "unit"),  # group axis over 4, units over 2
    "dense_bias": ((8,), P("data"), None),
    "head": ((16, 8), P(None, FSDP), "unit"),  # units split, each group whole on a device
    "table": ((8, 4, 6), P("data", "model", None), "tensor"),  # one group over all devices
}
GROUPS = {k: g for k, (_, _, g) in LEAVES.items()}

# State leaves of the initial state whose layout is checked, when not one per parameter:
# psi_sgd without momentum keeps no per-parameter state (as optax.sgd); adagradg keeps only
# per-group scalars, and the one of the "tensor" group of 'table' is a single number.
LAID_OUT_AT_INIT = {"psi_sgd": 0, "adagradg": len(LEAVES) - 1}


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(0.5 * rng.normal(size=s), jnp.float64) for k, (s, _, _) in LEAVES.items()
    }


def _gradient(params: dict, t: jax.Array) -> dict:
    # Depends on the iterate (so errors compound over steps) and is exact under any sharding.
    return jax.tree.map(lambda p: jnp.cos(3.0 * p + t) + 0.1 * p, params)


def _run(tx: optax.GradientTransformation, params: dict, state) -> tuple[dict, object]:
    @jax.jit
    def step(params, state, t):
        updates, state = tx.update(_gradient(params, t), state, params)
        return optax.apply_updates(params, updates), state

    for t in range(STEPS):
        params, state = step(params, state, jnp.float64(t))
    return params, state


def _assert_close(actual, expected, what: str) -> None:
    leaves_a, treedef_a = jax.tree_util.tree_flatten_with_path(actual)
    leaves_e, treedef_e = jax.tree_util.tree_flatten_with_path(expected)
    assert treedef_a == treedef_e, what
    for (path, a), (_, e) in zip(leaves_a, leaves_e):
        assert np.asarray(a).dtype != np.float32, f"{what}: float32, the run is float64"
        second_moment = any(getattr(k, "name", None) in PER_GROUP_SUMS for k in path)
        rtol = RTOL_SECOND_MOMENT if second_moment else RTOL
        where = f"{what}{jax.tree_util.keystr(path)}: relative error"
        assert_within(leaf_relative_error(a, e), rtol, where)


def _expected_sharding(mesh: Mesh, spec: P, param_shape, leaf_shape) -> NamedSharding | None:
    """A state leaf shaped like its parameter, or a keepdims per-group scalar of it, must be
    split like the parameter on every axis it keeps (size-1 axes replicated)."""
    if len(leaf_shape) != len(param_shape):
        return None
    if any(n not in (1, m) for n, m in zip(leaf_shape, param_shape)):
        return None
    spec = tuple(spec) + (None,) * (len(param_shape) - len(spec))
    kept = [s if n == m else None for s, n, m in zip(spec, leaf_shape, param_shape)]
    return NamedSharding(mesh, P(*kept))


def _assert_state_follows_params(state, mesh: Mesh) -> int:
    """Checks every state leaf found under a parameter's key; returns how many were checked."""
    checked = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [getattr(k, "key", None) for k in path]
        names = [k for k in keys if k in LEAVES]
        if not names or not hasattr(leaf, "sharding"):
            continue
        shape, spec, _ = LEAVES[names[-1]]
        expected = _expected_sharding(mesh, spec, shape, leaf.shape)
        if expected is None or leaf.size == 1:
            continue
        where = jax.tree_util.keystr(path)
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (
            f"state{where} {leaf.shape} is laid out as {leaf.sharding}, expected {expected.spec}"
        )
        checked += 1
    return checked


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_sharded_run_equals_single_device_run(name):
    """Per-unit and per-tensor groups, with group axes and unit axes split over devices."""
    tx = _alias(name, groups=GROUPS)
    params = _params()
    expected_params, expected_state = _run(tx, params, jax.jit(tx.init)(params))

    mesh = _mesh()
    shardings = {k: NamedSharding(mesh, spec) for k, (_, spec, _) in LEAVES.items()}
    sharded = jax.device_put(params, shardings)
    init_state = tx.init(sharded)
    expected = LAID_OUT_AT_INIT.get(name, len(LEAVES))
    assert _assert_state_follows_params(init_state, mesh) >= expected, "init"

    actual_params, actual_state = _run(tx, sharded, init_state)
    for k, x in actual_params.items():
        assert x.sharding.is_equivalent_to(shardings[k], x.ndim), k
    _assert_state_follows_params(actual_state, mesh)
    _assert_close(actual_params, expected_params, "params")
    _assert_close(actual_state, expected_state, "state")


class _Mlp(nn.Module):
    """Dense -> LayerNorm -> Dense: 2-D kernels are grouped per unit, the rest is not."""

    param_dtype: jnp.dtype = jnp.float64  # the tests run in float64

    @nn.compact
    def __call__(self, x):
        dt = self.param_dtype
        x = nn.Dense(16, dtype=dt, param_dtype=dt)(x)
        x = nn.relu(nn.LayerNorm(dtype=dt, param_dtype=dt)(x))
        return nn.Dense(4, dtype=dt, param_dtype=dt)(x)


def _loss(params, x, y):
    logits = _Mlp().apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_pmap_data_parallel_equals_full_batch(name):
    """8 replicas, each with 1/8 of the batch and ``lax.pmean`` of the gradients, follow the
    single-device full-batch run, and stay identical to each other."""
    tx = _alias(name)
    n = 8
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(n * 4, 8)), jnp.float64)
    y = jnp.asarray(rng.integers(0, 4, size=n * 4), jnp.int32)
    params = _Mlp().init(jax.random.key(0), x[:1])["params"]

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def replica_step(params, state, x, y):
        grads = jax.lax.pmean(jax.grad(_loss)(params, x, y), "batch")
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    devices = jax.devices()[:n]
    p_step = jax.pmap(replica_step, axis_name="batch", devices=devices)

    def split(a):  # leading axis: one slice per device, laid out as pmap lays it out
        return jax.device_put(a, NamedSharding(Mesh(np.array(devices), ("batch",)), P("batch")))

    def replicate(tree):
        return jax.tree.map(lambda a: split(np.broadcast_to(a, (n, *np.shape(a)))), tree)

    ref_params, ref_state = params, jax.jit(tx.init)(params)
    rep_params, rep_state = replicate(params), replicate(ref_state)
    xs, ys = split(x.reshape(n, 4, 8)), split(y.reshape(n, 4))
    for _ in range(STEPS):
        ref_params, ref_state = step(ref_params, ref_state, x, y)
        rep_params, rep_state = p_step(rep_params, rep_state, xs, ys)

    rep_params, rep_state = jax.tree.map(np.asarray, (rep_params, rep_state))
    for i in range(n):
        replica = jax.tree.map(lambda a, i=i: a[i], (rep_params, rep_state))
        _assert_close(replica[0], ref_params, f"replica {i} params")
        _assert_close(replica[1], ref_state, f"replica {i} state")
