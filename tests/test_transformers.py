"""Kosson et al.'s rotational groups on pre-LN transformer language models in Flax linen,
flax.nnx (stacked blocks, ``nnx.scan``) and Equinox (stacked blocks, ``lax.scan``): the groups
read from the structure match the ones derived by hand, and RV-AdamW trained on them keeps
every group's norm, turns every group at Table 1's rate and reaches AdamW's loss within its
seed-to-seed noise at the paper's GPT hyperparameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformer_models as tm
from tolerances import assert_approximately, assert_within, float32_bound

import optax_sphere as osp
from optax_sphere.groups import group_sq_norm, named_axes
from optax_sphere.theory.equilibrium import equilibrium

MODELS = {"linen": tm.linen_lm, "nnx": tm.nnx_lm, "equinox": tm.eqx_lm}
EXPECTED = {"linen": tm.LINEN_GROUPS, "nnx": tm.NNX_GROUPS, "equinox": tm.EQX_GROUPS}
TOKENS = jnp.zeros((2, tm.CONTEXT), jnp.int32)
# Kosson et al.'s GPT-like preset (kosson2024/wikitext_gpt), with the usual mask: the
# matrices decay, the gains, biases and norm scales do not (sec. 5)
MATRICES = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
HYPER = {"learning_rate": 5e-3, "weight_decay": 0.5, "b2": 0.95}
STEPS, SEEDS, LAST = 200, 3, 60


def _groups(framework: str, seed: int = 0, **kwargs):
    model, variables, _ = MODELS[framework](seed)
    if framework == "linen":
        return osp.rotational_groups(model, variables, TOKENS, **kwargs)
    return osp.rotational_groups(model, TOKENS, **kwargs)


def _axes(report) -> tuple[int, ...]:
    g = report.grouping
    return g if isinstance(g, tuple) else named_axes(g, len(report.shape))


@pytest.mark.parametrize("framework", MODELS)
def test_rotational_groups_are_every_kernel_per_unit_one_layer_at_a_time(framework):
    found = _groups(framework)
    got = {r.path: (_axes(r), r.num_groups, r.group_size) for r in found.reports if r.grouping}
    assert got == EXPECTED[framework]
    # biases, gains, norm scales and the positions (added elementwise) are not grouped
    for r in found.reports:
        if r.path not in got:
            assert "elementwise" in r.note, (r.path, r.note)


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
@pytest.mark.parametrize("spec", ["unit", "tensor"])
def test_a_shape_rule_on_a_stacked_tree_says_at_init_that_it_spans_the_layers(framework, spec):
    import warnings

    _, params, _ = MODELS[framework](0)
    found = _groups(framework)  # reads the structure: the blocks are stacked on axis 0
    with pytest.warns(UserWarning, match="span the layers of a stack") as record:
        osp.rv_adamw(1e-3, groups=spec).init(params)
    message = next(str(w.message) for w in record if "span the layers" in str(w.message))
    stacked = [r.path for r in found.reports if r.path.startswith("blocks/")]
    assert stacked and all(f"'{p}'" in message for p in stacked if "weight" in p or "kernel" in p)
    assert "rotational_groups" in message
    with warnings.catch_warnings():  # the structure's own groups keep the layers apart
        warnings.simplefilter("error")
        osp.rv_adamw(1e-3, groups=found).init(params)
        osp.rv_adamw(1e-3, groups=None).init(params)


@pytest.mark.parametrize("framework", MODELS)
def test_head_and_embedding_can_be_left_to_the_base_optimizer(framework):
    found = _groups(framework, head=False, embedding=False)
    expected = {p for p in EXPECTED[framework] if not p.startswith(("head", "embed", "Embed"))}
    assert set(found.grouped) == expected
    notes = {r.path: r.note for r in found.reports}
    assert any("head=False" in n for n in notes.values())
    assert any("embedding=False" in n for n in notes.values())


def _train(framework: str, optimizer: str, seed: int):
    model, variables, apply = MODELS[framework](seed)
    params = variables["params"] if framework == "linen" else variables
    groups = None
    if optimizer == "rv_adamw":
        groups = _groups(framework, seed)
        params = osp.center_groups(params, groups=groups)
        tx = osp.rv_adamw(**HYPER, mask=MATRICES, groups=groups)
    else:
        tx = optax.adamw(**HYPER, mask=MATRICES)
    batches = tm.markov_batches(seed, 16, STEPS)
    held_out = jnp.asarray(tm.markov_batches(10_000 + seed, 64, 1)[0])

    def loss_fn(p, batch):
        logits = apply(p, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(p, s, batch):
        g = jax.grad(loss_fn)(p, batch)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state, p, last = tx.init(params), params, []
    for t in range(STEPS):
        p, state = step(p, state, jnp.asarray(batches[t]))
        if t >= STEPS - LAST - 1:
            last.append(p)
    return float(loss_fn(p, held_out)), params, last, groups


@pytest.mark.parametrize("framework", MODELS)
def test_rv_adamw_on_a_transformer_keeps_norms_turns_at_table_1_rate_and_matches_adamw(
    framework,
):
    runs = {opt: [_train(framework, opt, s) for s in range(SEEDS)] for opt in ("adamw", "rv_adamw")}
    # every rotational group keeps its norm (float32 rounding of each step's renormalisation)
    _, start, last, groups = runs["rv_adamw"][0]
    resolved = osp.resolve_groups(groups, start)
    is_group = lambda x: x is None or isinstance(x, osp.Group)
    eta_r = equilibrium("adamw", dim=1, **HYPER).angular_update
    checked = 0
    for path, group in jax.tree_util.tree_leaves_with_path(resolved, is_leaf=is_group):
        if group is None:
            continue
        pick = lambda tree, path=path: _at(tree, path)
        n0 = jnp.sqrt(group_sq_norm(pick(start), group))
        n1 = jnp.sqrt(group_sq_norm(pick(last[-1]), group))
        assert_within(
            float(jnp.max(jnp.abs(n1 / n0 - 1))),
            float32_bound(STEPS, length=group.size(pick(start).shape)),
            what=osp.path_str(path),
        )
        # the angle between successive weights, per group, over the last steps: its mean over
        # every group is Table 1's eta_r, and each group's RMS is near it
        angles = np.stack(
            [
                np.asarray(osp.geometry.angle(pick(a), pick(b), group)).ravel()
                for a, b in zip(last[:-1], last[1:])
            ]
        )
        assert_approximately(np.mean(angles), eta_r, rel=0.15, what=f"mean {path}")
        assert_approximately(np.sqrt(np.mean(angles**2, 0)), eta_r, rel=0.3, what=f"RMS {path}")
        checked += 1
    assert checked == len(EXPECTED[framework])
    # the loss: well below the uniform log(16) = 2.77, and RV-AdamW's mean within twice the
    # seed-to-seed standard deviation of AdamW's (3 seeds; the same data per seed)
    adamw = np.array([r[0] for r in runs["adamw"]])
    rv = np.array([r[0] for r in runs["rv_adamw"]])
    assert np.all(adamw < 1.3) and np.all(rv < 1.3), (adamw, rv)
    assert_approximately(rv.mean(), adamw.mean(), abs=2 * adamw.std(ddof=1), what="loss")


def _at(tree, path):
    for key in path:
        if hasattr(key, "key"):
            tree = tree[key.key]
        elif hasattr(key, "idx"):
            tree = tree[key.idx]
        else:
            tree = getattr(tree, key.name)
    return tree
