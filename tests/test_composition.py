"""Every optimizer composes with the optax wrappers people train with: ``chain`` with
``clip_by_global_norm``, ``inject_hyperparams`` (learning rate changed between steps),
``MultiSteps`` (gradient accumulation), ``masked`` and ``multi_transform`` (including a
``groups`` spec written for the whole tree), learning-rate schedules; and it is deterministic.
(``apply_if_finite`` is in ``test_degenerate.py``.)"""

import inspect

import alias_cases
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_trees_close, float32_bound, float64_bound

import optax_sphere as osp


def _params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float64)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float64),
            "bias": jnp.asarray(rng.normal(size=3), jnp.float64),
        },
    }


def _grads(params, t):
    return jax.tree.map(lambda x: jnp.cos(2.0 * x + 0.3 * t) + 0.1 * x, params)


def _run(tx, params, steps, update=None, grads=_grads):
    state = tx.init(params)
    update = update or tx.update
    for t in range(steps):
        updates, state = update(grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


# Every claim of this file is an identity between two ways of running one optimizer, so it is
# checked in float64: a few steps, each of condition up to 1e3 (AdamP's and the rotational
# optimizers' divisions by norms), of float64 rounding.
EXACT = float64_bound(steps=4, condition=1e3)


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def _close(a, b):
    assert_trees_close(a, b, EXACT)


def _equal(a, b):
    chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize("case", alias_cases.params())
def test_chain_after_clip_by_global_norm(case):
    """``chain(clip_by_global_norm(c), tx)`` is ``tx`` fed the clipped gradients."""
    params = _params()
    clip, tx = optax.clip_by_global_norm(0.5), case.make()
    chained = optax.chain(clip, tx)
    a = _run(chained, params, 3)[0]

    s_clip, s_tx, p = clip.init(params), tx.init(params), params
    for t in range(3):
        g, s_clip = clip.update(_grads(p, t), s_clip, p)
        assert optax.global_norm(g) <= 0.5 * (1 + 1e-6)
        u, s_tx = tx.update(g, s_tx, p)
        p = optax.apply_updates(p, u)
    _equal(a, p)


def _lr(case):
    return case.kwargs["learning_rate"]


@pytest.mark.parametrize("case", alias_cases.params())
def test_inject_hyperparams_learning_rate_changed_between_steps(case):
    """Setting ``state.hyperparams['learning_rate']`` between steps is the same as a schedule
    that changes at that step."""
    lr = _lr(case)
    injected = optax.inject_hyperparams(case.factory)(**case.kwargs)
    params = _params()
    state = injected.init(params)
    for t in range(4):
        if t == 2:
            state.hyperparams["learning_rate"] = jnp.asarray(lr / 4, jnp.float64)
        updates, state = injected.update(_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)

    schedule = lambda count: jnp.where(count < 2, jnp.float64(lr), jnp.float64(lr / 4))  # noqa: E731
    reference = _run(case.make(learning_rate=schedule), _params(), 4)[0]
    _close(params, reference)
    unchanged = _run(case.make(), _params(), 4)[0]
    assert not np.allclose(unchanged["dense"]["kernel"], params["dense"]["kernel"])


@pytest.mark.parametrize("case", alias_cases.params())
def test_inject_hyperparams_with_groups_as_a_static_argument(case):
    """``groups`` is a callable, which ``inject_hyperparams`` would take for a schedule: name it
    in ``static_args``."""
    spec = {"conv": {"kernel": "tensor"}, "dense": {"kernel": (0,), "bias": None}}
    injected = optax.inject_hyperparams(case.factory, static_args=("groups",))(
        **{**case.kwargs, "groups": spec}
    )
    _close(_run(injected, _params(), 3)[0], _run(case.make(groups=spec), _params(), 3)[0])


def _user_rule(params):
    return jax.tree.map(lambda x: "unit" if x.ndim >= 2 else None, params)


@pytest.mark.parametrize("rule", [osp.per_unit, osp.per_tensor], ids=lambda r: r.__name__)
@pytest.mark.parametrize("case", alias_cases.params())
def test_inject_hyperparams_with_a_callable_groups_not_named_static_raises(case, rule):
    """Taken for a schedule, a rule of the library is called with the step count and would
    group nothing: ``init`` raises, naming ``static_args``; named static, it is the alias
    itself."""
    injected = optax.inject_hyperparams(case.factory)(**{**case.kwargs, "groups": rule})
    with pytest.raises(ValueError, match=r"static_args=\('groups',\)"):
        injected.init(_params())
    static = optax.inject_hyperparams(case.factory, static_args=("groups",))
    got = _run(static(**{**case.kwargs, "groups": rule}), _params(), 3)[0]
    # the same arithmetic, with the hyperparameters as arrays instead of constants
    _close(got, _run(case.make(groups=rule), _params(), 3)[0])


@pytest.mark.parametrize("case", alias_cases.params())
def test_inject_hyperparams_with_a_group_rule_needs_no_static_args(case):
    """A user's rule wrapped in ``GroupRule`` is not callable: ``inject_hyperparams`` passes it
    on, and the alias groups as with the bare rule (and unlike with no groups)."""
    seen = []
    rule = osp.GroupRule(lambda params: seen.append(params) or _user_rule(params))
    injected = optax.inject_hyperparams(case.factory)(**{**case.kwargs, "groups": rule})
    got = _run(injected, _params(), 3)[0]
    _close(got, _run(case.make(groups=_user_rule), _params(), 3)[0])
    # the rule was given the parameters, never a step count
    assert seen and all(isinstance(p, dict) and "dense" in p for p in seen)


@pytest.mark.parametrize("case", alias_cases.params())
def test_multisteps_accumulation_is_one_step_on_the_mean_gradient(case):
    params = _params()
    tx = case.make()
    accumulated = optax.MultiSteps(case.make(), every_k_schedule=2)
    state = accumulated.init(params)
    g0, g1 = _grads(params, 0), _grads(params, 1)
    u0, state = accumulated.update(g0, state, params)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(u0))  # nothing until k grads
    u1, state = accumulated.update(g1, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
    expected, _ = tx.update(mean, tx.init(params), params)
    # optax.MultiSteps accumulates the gradients in float32, whatever their dtype
    assert_trees_close(u1, expected, float32_bound(steps=2, condition=10))


MASK = {"conv": {"kernel": True}, "dense": {"kernel": True, "bias": False}}
LABELS = {"conv": {"kernel": "sphere"}, "dense": {"kernel": "sphere", "bias": "plain"}}
FULL_SPEC = {"conv": {"kernel": "unit"}, "dense": {"kernel": "tensor", "bias": None}}


def _selected(tree):
    return {"conv": tree["conv"], "dense": {"kernel": tree["dense"]["kernel"]}}


@pytest.mark.parametrize(
    "spec", [None, FULL_SPEC], ids=["default_groups", "spec_for_the_whole_tree"]
)
@pytest.mark.parametrize("case", alias_cases.params())
def test_masked(case, spec):
    """Masked-in leaves get the optimizer's update on the sub-tree, masked-out leaves pass
    through; a ``groups`` spec may be written for the whole tree."""
    kwargs = {} if spec is None else {"groups": spec}
    params = _params()
    tx = optax.masked(case.make(**kwargs), MASK)
    state = tx.init(params)
    sub_kwargs = {} if spec is None else {"groups": _selected(spec)}
    sub = case.make(**sub_kwargs)
    sub_state = sub.init(_selected(params))
    for t in range(2):
        g = _grads(params, t)
        updates, state = tx.update(g, state, params)
        expected, sub_state = sub.update(_selected(g), sub_state, _selected(params))
        _close(_selected(updates), expected)
        _equal(updates["dense"]["bias"], g["dense"]["bias"])
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("case", alias_cases.params())
def test_multi_transform(case):
    params = _params()
    tx = optax.multi_transform(
        {"sphere": case.make(groups=FULL_SPEC), "plain": optax.sgd(0.1)}, LABELS
    )
    state = tx.init(params)
    sub = case.make(groups=_selected(FULL_SPEC))
    sub_state = sub.init(_selected(params))
    for t in range(2):
        g = _grads(params, t)
        updates, state = tx.update(g, state, params)
        expected, sub_state = sub.update(_selected(g), sub_state, _selected(params))
        _close(_selected(updates), expected)
        np.testing.assert_allclose(updates["dense"]["bias"], -0.1 * g["dense"]["bias"], rtol=1e-6)
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("case", alias_cases.params())
def test_learning_rate_schedule(case):
    """A constant schedule is the constant; a schedule that drops to zero stops the motion."""
    lr = _lr(case)
    constant = _run(case.make(learning_rate=optax.constant_schedule(lr)), _params(), 3)[0]
    _close(constant, _run(case.make(), _params(), 3)[0])

    stop = optax.piecewise_constant_schedule(lr, {2: 0.0})
    # the sphere optimizers give the leaves off the sphere a learning rate of their own
    own = "ungrouped_learning_rate" in inspect.signature(case.factory).parameters
    tx = case.make(learning_rate=stop, **({"ungrouped_learning_rate": stop} if own else {}))
    params = _params()
    state = tx.init(params)
    for t in range(4):
        updates, state = tx.update(_grads(params, t), state, params)
        size = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates))
        if t < 2:
            assert size > 1e-4
        else:  # zero, up to the rounding of a renormalisation to the same norm
            assert size < 1e-6
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("case", alias_cases.params())
def test_deterministic(case):
    """Two optimizers built alike, fed alike, give bit-identical trajectories under jit."""
    runs = []
    for _ in range(2):
        tx = case.make()
        runs.append(_run(tx, _params(), 4, update=jax.jit(tx.update)))
    _equal(runs[0], runs[1])


def test_masked_spec_for_the_whole_tree_still_rejects_a_missing_entry():
    spec = {"conv": {"kernel": "unit"}, "dense": {"bias": None}}  # no entry for dense/kernel
    tx = optax.masked(osp.adam_srt(groups=spec), MASK)
    with pytest.raises(ValueError, match="dense/kernel"):
        tx.init(_params())
