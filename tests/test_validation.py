"""Bad input fails early and clearly: invalid hyperparameters at build time, group specs that do
not fit at ``init`` (naming the parameter path), and a parameter tree that changed between
``init`` and ``update`` (a ``ValueError`` naming what changed, not an XLA shape error)."""

import inspect
import math

import alias_cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sphere

# Hyperparameters that must be finite and >= 0, and decay rates that must lie in [0, 1).
RATES = (
    "learning_rate",
    "weight_decay",
    "eps",
    "wd_ratio",
    "delta",
    "omega",
    "v0",
    "eta_r",
    "rotational_eps",
    "ungrouped_weight_decay",
    "ungrouped_learning_rate",
)
DECAYS = ("b1", "b2", "momentum", "rms_decay", "decay")
POSITIVE = ("max_norm", "grad_clip", "radius")  # thresholds and radii: > 0 (or None)
BAD_RATES = (-1e-3, math.nan, math.inf, -math.inf)
BAD_DECAYS = (-0.1, 1.5, math.nan)
BAD_POSITIVE = (-1.0, 0.0, math.nan)
VALID = {
    "learning_rate": 1e-2,
    "ungrouped_learning_rate": 1e-2,
    "weight_decay": 1e-3,
    "eta_r": 1e-2,
}

# Every public builder that takes numeric hyperparameters: aliases and primitives.
BUILDERS = [c.name for c in alias_cases.ALIASES] + [
    "scale_by_standardized_adam",
    "coupled_weight_decay",
    "decoupled_weight_decay",
    "rotational_rms_control",
    "scale_by_adam_l2_direction",
    "scale_invariant_projection",
    "retract_to_sphere",
]


def _builder_params():
    out = []
    for name in BUILDERS:
        getattr(optax_sphere, name)  # a missing builder fails the suite
        out.append(pytest.param(name, id=name))
    return out


def _required(fn):
    """Valid values for the required arguments of ``fn`` (hyperparameters without defaults,
    and the inner optimizer of a wrapper)."""
    values = {**VALID, "inner": optax.scale_by_adam()}
    return {
        n: values[n]
        for n, p in inspect.signature(fn).parameters.items()
        if p.default is inspect.Parameter.empty and n in values
    }


@pytest.mark.parametrize("name", _builder_params())
def test_invalid_hyperparameters_raise_when_built(name):
    fn = getattr(optax_sphere, name)
    names = inspect.signature(fn).parameters
    checked = 0
    checks = [(k, BAD_RATES) for k in RATES] + [(k, BAD_DECAYS) for k in DECAYS]
    for keyword, bad_values in checks + [(k, BAD_POSITIVE) for k in POSITIVE]:
        if keyword not in names:
            continue
        for bad in bad_values:
            with pytest.raises(ValueError, match=keyword):
                fn(**{**_required(fn), keyword: bad})
            checked += 1
    for keyword in ("b1", "b2"):  # Adam's bias correction divides by 1 - b^k
        if keyword in names:
            with pytest.raises(ValueError, match=keyword):
                fn(**{**_required(fn), keyword: 1.0})
    assert checked > 0, f"{name} has no numeric hyperparameter to validate"


@pytest.mark.parametrize("name", _builder_params())
def test_boundary_hyperparameters_are_accepted(name):
    """Zero rates and decays, and schedules, are valid (a constant-zero learning rate, no
    momentum, no weight decay)."""
    fn = getattr(optax_sphere, name)
    names = inspect.signature(fn).parameters
    kwargs = {k: 0.0 for k in ("weight_decay", "b1", "momentum") if k in names}
    if "learning_rate" in names:
        kwargs["learning_rate"] = lambda count: 1e-2 / (1 + count)
    fn(**{**_required(fn), **kwargs})


def test_unknown_optimizer_names_raise():
    with pytest.raises(ValueError, match="unknown groups shorthand"):
        optax_sphere.resolve_groups("channels", {"w": jnp.ones((2, 2))})
    theory = getattr(optax_sphere, "theory", None)
    if theory is not None and hasattr(theory, "equilibrium"):
        with pytest.raises(ValueError, match="nadam"):
            theory.equilibrium("nadam", learning_rate=1e-3, weight_decay=0.1, dim=16)


def _params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
        },
    }


def _spec(**overrides):
    spec = {"conv": {"kernel": "unit"}, "dense": {"kernel": "unit", "bias": None}}
    for path, value in overrides.items():
        module, leaf = path.split("__")
        spec[module][leaf] = value
    return spec


@pytest.mark.parametrize("case", alias_cases.params())
def test_group_spec_errors_at_init_name_the_parameter_path(case):
    params = _params()
    with pytest.raises(ValueError, match=r"conv/kernel.*axis 4 is out of range"):
        case.make(groups=_spec(conv__kernel=(0, 4))).init(params)
    with pytest.raises(ValueError, match=r"dense/bias.*'unit' needs ndim >= 2"):
        case.make(groups=_spec(dense__bias="unit")).init(params)
    spec = _spec()
    del spec["dense"]["bias"]
    with pytest.raises(ValueError, match=r"does not match the parameter tree.*dense/bias"):
        case.make(groups=spec).init(params)


@pytest.mark.parametrize("case", alias_cases.params())
def test_non_array_parameter_leaf_raises_at_init_naming_the_path(case):
    for bad in (0.5, "frozen"):
        params = {**_params(), "temperature": bad}
        with pytest.raises(ValueError, match=r"'temperature'.*not an array"):
            case.make().init(params)


def _changed_trees(params):
    grown = {**params, "head": {"kernel": jnp.ones((3, 2))}}
    shrunk = {"conv": params["conv"], "dense": {"kernel": params["dense"]["kernel"]}}
    reshaped = {**params, "dense": {**params["dense"], "kernel": jnp.ones((7, 3))}}
    return [
        (grown, r"not in the optimizer state: \['head/kernel'\]"),
        (shrunk, r"state entries with no parameter: \['dense/bias'\]"),
        (reshaped, r"'dense/kernel' has shape \(7, 3\).*\(6, 3\)"),
    ]


@pytest.mark.parametrize("case", alias_cases.params())
def test_parameter_tree_changed_since_init_gives_a_clear_error(case):
    """What each optimizer does is its ``changed_tree`` behaviour (``alias_cases.Case``)."""
    params = _params()
    tx = case.make()
    state = tx.init(params)
    changed = _changed_trees(params)
    if case.changed_tree == "per_group":
        # dense/kernel (6, 3) -> (7, 3) keeps its 3 groups; (6, 4) does not
        reshaped, _ = changed.pop()
        grads = jax.tree.map(jnp.ones_like, reshaped)
        updates, _ = tx.update(grads, state, reshaped)
        assert jax.tree.structure(updates) == jax.tree.structure(reshaped)
        units = {**params, "dense": {**params["dense"], "kernel": jnp.ones((6, 4))}}
        changed.append((units, r"'dense/kernel' has shape \(6, 4\).*\(1, 3\)"))
    for new_params, message in changed:
        grads = jax.tree.map(jnp.ones_like, new_params)
        if case.changed_tree == "stateless":
            for update in (tx.update, jax.jit(tx.update)):
                updates, _ = update(grads, state, new_params)
                assert jax.tree.structure(updates) == jax.tree.structure(new_params)
                assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
            continue
        if case.changed_tree == "optax_inner":
            with pytest.raises((ValueError, TypeError)):
                tx.update(grads, state, new_params)
            continue
        with pytest.raises(ValueError, match=message):
            tx.update(grads, state, new_params)
        with pytest.raises(ValueError, match=message):  # raised while tracing, under jit too
            jax.jit(tx.update)(grads, state, new_params)


@pytest.mark.parametrize("case", alias_cases.params())
def test_update_without_params_is_a_value_error_or_works(case):
    """Optimizers that need the parameters say so; none fails with an AttributeError."""
    params = _params()
    tx = case.make()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    try:
        updates, _ = tx.update(grads, state)
    except ValueError as err:
        assert "params" in str(err)
    else:
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
