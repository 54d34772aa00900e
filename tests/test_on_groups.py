"""on_groups: the split at the group boundary that every alias is built on.

The ungrouped leaves follow the alias's optax base itself (the same arithmetic, to float64
rounding), the groups' kernels see only the grouped leaves, the groups are resolved once per
tree structure, and the split composes with optax's own masking.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sphere as osp
from optax_sphere import registry

# the hyperparameters of bench.py: each alias at the values its base also takes
KEYWORDS = {
    "adam_s": {"learning_rate": 1e-3, "weight_decay": 1e-2},
    "adam_st": {"learning_rate": 1e-3, "weight_decay": 1e-2},
    "adam_srt": {"learning_rate": 1e-3, "weight_decay": 1e-2},
    "adamg": {"learning_rate": 1e-2, "weight_decay": 1e-2},
    "adamp": {"learning_rate": 1e-3},
    "wrapped_adam_l2": {"learning_rate": 1e-3},
    "rv_adamw": {"learning_rate": 1e-3, "weight_decay": 1e-2},
    "sgdm_rt": {"learning_rate": 1e-2, "momentum": 0.9, "weight_decay": 1e-2},
    "psi_sgdm": {"learning_rate": 1e-2, "momentum": 0.9},
    "sgdg": {"learning_rate": 1e-2, "momentum": 0.9, "weight_decay": 1e-2},
    "sgdp": {"learning_rate": 1e-2, "momentum": 0.9, "nesterov": True},
    "rv_sgdm": {"learning_rate": 1e-2, "momentum": 0.9, "weight_decay": 1e-2},
    "rv_lion": {"learning_rate": 1e-4, "weight_decay": 1e-2},
    "psi_sgd": {"learning_rate": 1e-2},
    "adagradg": {"learning_rate": 1e-2},
    "adamh": {"learning_rate": 0.02, "ungrouped_learning_rate": 1e-3},
    "muonh": {"learning_rate": 0.02, "ungrouped_learning_rate": 1e-3},
}


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def _params():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 4))), "bias": jnp.zeros(4)},
        "norm": {"scale": jnp.ones(4)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(4, 3)))},
    }


SPEC = {
    "dense": {"kernel": "unit", "bias": None},
    "norm": {"scale": None},
    "head": {"kernel": None},
}
UNGROUPED = (("dense", "bias"), ("norm", "scale"), ("head", "kernel"))


def _grads(params, t):
    return jax.tree.map(lambda p: jnp.sin(p * (t + 1.0) + 0.3) + 0.1 * (t + 1), params)


def _run(tx, params, steps=5):
    state = tx.init(params)
    history = []
    for t in range(steps):
        updates, state = tx.update(_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


@pytest.mark.parametrize("name", sorted(KEYWORDS))
def test_the_ungrouped_leaves_follow_the_optax_base_itself(name):
    """Leaves off the groups follow ``build_base`` (the optax optimizer the alias extends),
    whatever the groups do: the gradients here do not depend on the parameters, so the base on
    the whole tree gives the ungrouped leaves' trajectory."""
    assert set(KEYWORDS) == set(registry.ALIASES)
    alias = getattr(osp, name)(**KEYWORDS[name], groups=SPEC)
    base = registry.build_base(name, **KEYWORDS[name])
    got, _ = _run(alias, _params())
    want, _ = _run(base, _params())
    for a, b in zip(got, want):
        for path in UNGROUPED:
            np.testing.assert_allclose(a[path[0]][path[1]], b[path[0]][path[1]], rtol=1e-13)
    if name not in ("adamp", "sgdp"):  # these project only a gradient found scale-invariant
        # and the grouped kernel is not the base's
        assert not np.allclose(got[-1]["dense"]["kernel"], want[-1]["dense"]["kernel"])


@pytest.mark.parametrize("name", sorted(KEYWORDS))
def test_with_nothing_grouped_the_alias_is_its_base(name):
    alias = getattr(osp, name)(**KEYWORDS[name], groups=None)
    base = registry.build_base(name, **KEYWORDS[name])
    for a, b in zip(_run(alias, _params())[0], _run(base, _params())[0]):
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def test_the_groups_kernel_sees_only_the_grouped_leaves_and_the_base_the_others():
    seen = {}

    def recorder(label):
        def init_fn(params):
            seen[label] = jax.tree.map(lambda x: x.shape, params)
            return optax.EmptyState()

        return optax.GradientTransformation(init_fn, lambda u, s, p=None: (u, s))

    tx = osp.on_groups(recorder("grouped"), recorder("ungrouped"), SPEC)
    tx.init(_params())
    assert isinstance(seen["grouped"]["dense"]["bias"], optax.MaskedNode)
    assert seen["grouped"]["dense"]["kernel"] == (6, 4)
    assert isinstance(seen["ungrouped"]["dense"]["kernel"], optax.MaskedNode)
    assert seen["ungrouped"]["head"]["kernel"] == (4, 3)


def test_groups_are_resolved_once_per_tree_structure():
    calls = []

    def rule(params):
        calls.append(jax.tree.structure(params))
        return SPEC

    tx = osp.adam_srt(1e-3, groups=rule)
    params = _params()
    state = tx.init(params)
    for t in range(3):
        _, state = tx.update(_grads(params, t), state, params)
    assert len(calls) == 1  # init, every update and the kernel's view: one resolution
    bigger = {**params, "extra": {"kernel": jnp.ones((5, 2))}}
    spec = {**SPEC, "extra": {"kernel": "unit"}}
    calls.clear()
    tx = osp.adam_srt(1e-3, groups=lambda p: calls.append(1) or (spec if "extra" in p else SPEC))
    tx.init(params), tx.init(bigger), tx.init(params)
    assert len(calls) == 2  # a new structure is resolved anew


def test_a_resolution_gives_the_groups_of_a_tree_and_of_its_views():
    resolution = osp.GroupResolution(SPEC)
    whole = resolution(_params())
    assert whole["dense"]["kernel"] == osp.Group((0,), units=1) and whole["head"]["kernel"] is None
    view = {**_params(), "dense": {"kernel": optax.MaskedNode(), "bias": jnp.zeros(4)}}
    groups = resolution(view)
    assert isinstance(groups["dense"]["kernel"], optax.MaskedNode)
    labels = resolution.labels(_params())
    assert labels["dense"]["kernel"] == osp.grouped.GROUPED
    assert labels["norm"]["scale"] == osp.grouped.UNGROUPED
    bad = {**SPEC, "dense": {"kernel": (5,), "bias": None}}
    with pytest.raises(ValueError, match="dense/kernel"):
        osp.GroupResolution(bad)(_params())


def test_an_alias_inside_optax_masked_and_multi_transform():
    """A view of a view: the alias sees MaskedNode where optax.masked hides a leaf, and its
    groups and base step the others as without the mask."""
    params = _params()
    keep = jax.tree.map(lambda _: True, params)
    keep["head"]["kernel"] = False
    inside = optax.masked(osp.adam_srt(1e-3, weight_decay=1e-2, groups=SPEC), keep)
    history, _ = _run(inside, params, 3)
    plain, _ = _run(osp.adam_srt(1e-3, weight_decay=1e-2, groups=SPEC), params, 3)
    for path in (("dense", "kernel"), ("dense", "bias"), ("norm", "scale")):
        np.testing.assert_allclose(
            history[-1][path[0]][path[1]], plain[-1][path[0]][path[1]], rtol=1e-13
        )
    # optax.masked passes the hidden leaf's gradient through as its update
    passed = params["head"]["kernel"]
    for t in range(3):
        passed = passed + _grads({"head": {"kernel": passed}}, t)["head"]["kernel"]
    np.testing.assert_allclose(history[-1]["head"]["kernel"], passed, rtol=1e-13)
    split = optax.multi_transform(
        {"sphere": osp.adam_srt(1e-3, groups=SPEC), "frozen": optax.set_to_zero()},
        {"dense": {"kernel": "sphere", "bias": "sphere"}, "norm": {"scale": "sphere"},
         "head": {"kernel": "frozen"}},
    )  # fmt: skip
    history, _ = _run(split, params, 3)
    np.testing.assert_array_equal(history[-1]["head"]["kernel"], params["head"]["kernel"])
    assert np.all(np.isfinite(history[-1]["dense"]["kernel"]))


def test_a_weight_decay_mask_for_the_whole_tree_reaches_the_base():
    """``mask`` is written for the whole tree; the base sees its part of it."""
    params = _params()
    mask = jax.tree.map(lambda _: True, params)
    mask["norm"]["scale"] = False
    zero = lambda p, t: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    tx = osp.rv_adamw(1e-2, weight_decay=0.5, mask=mask, groups=SPEC)
    state, x = tx.init(params), params
    for t in range(3):
        u, state = tx.update(zero(x, t), state, x)
        x = optax.apply_updates(x, u)
    np.testing.assert_array_equal(x["norm"]["scale"], params["norm"]["scale"])  # masked out
    np.testing.assert_allclose(x["head"]["kernel"], params["head"]["kernel"] * (1 - 5e-3) ** 3)


def test_low_precision_base_state_is_float32_and_updates_keep_the_dtype():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
    for name in ("adam_srt", "sgdg", "rv_adamw", "psi_sgdm", "adagradg"):
        tx = getattr(osp, name)(**KEYWORDS[name], groups=SPEC)
        state = tx.init(params)
        u, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
        floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert all(x.dtype == jnp.float32 for x in floats), name
        assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(u)), name


def test_group_rule_is_a_spec_that_is_not_callable():
    rule = osp.GroupRule(lambda p: SPEC)
    assert not callable(rule)
    assert osp.resolve_groups(rule, _params()) == osp.resolve_groups(SPEC, _params())
    with pytest.raises(TypeError, match="GroupRule"):
        osp.GroupRule("unit")


def test_grouped_state_names_what_it_finds():
    state = osp.adam_srt(1e-3, groups=SPEC).init(_params())
    assert osp.grouped_state(state).nu["dense"]["kernel"].shape == (1, 4)
    with pytest.raises(ValueError, match="found 0"):
        osp.grouped_state(optax.adam(1e-3).init(_params()))


def _nnx_params():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(5, 8, rngs=rngs)
            self.norm = nnx.LayerNorm(8, rngs=rngs)
            self.head = nnx.Linear(8, 3, rngs=rngs)

    return nnx.state(Net(nnx.Rngs(0)), nnx.Param), "unit"


def _equinox_params():
    import equinox as eqx

    model = eqx.nn.MLP(5, 3, 8, 1, key=jax.random.key(0))
    # the activations are not arrays: None leaves after the filter
    return eqx.filter(model, eqx.is_array), "unit_out_first"


@pytest.mark.parametrize("tree", [_nnx_params, _equinox_params], ids=["nnx", "equinox"])
@pytest.mark.parametrize("name", ["adam_srt", "rv_adamw", "sgdg", "psi_sgdm", "adamp"])
def test_nnx_and_equinox_trees_split_at_the_groups_under_one_compilation(tree, name):
    """flax.nnx State (kernels (in, out)) and an Equinox tree (weights (out, in), None leaves):
    the vectors follow the optax base, the matrices their groups, each step traced once."""
    params, spec = tree()
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    runs = {}
    for label, tx in (
        ("alias", getattr(osp, name)(**KEYWORDS[name], groups=spec)),
        ("base", registry.build_base(name, **KEYWORDS[name])),
    ):
        traces = []

        def step(x, s, t, tx=tx, traces=traces):
            traces.append(1)
            updates, s = tx.update(_grads(x, t), s, x)
            return optax.apply_updates(x, updates), s

        step = jax.jit(step)
        x, state = params, tx.init(params)
        for t in range(4):
            x, state = step(x, state, jnp.float64(t))
        assert len(traces) == 1, label
        runs[label] = x
    flat = jax.tree_util.tree_flatten_with_path(runs["alias"])[0]
    base = jax.tree.leaves(runs["base"])
    for (path, got), want in zip(flat, base):
        if got.ndim == 1:  # biases, norm scales: off the groups
            np.testing.assert_allclose(got, want, rtol=1e-13, err_msg=osp.path_str(path))
    assert jax.tree.structure(runs["alias"]) == jax.tree.structure(params)
