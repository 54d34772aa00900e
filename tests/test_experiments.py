"""The experiment harness: selection, divergence, paired statistics, tables and figures."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as scipy_stats

from optax_sphere.experiments import harness, stats


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(8, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(2)(nn.relu(x))


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    return x, y


def _task():
    model = _Tiny()

    def init(key):
        v = model.init(key, jnp.zeros((2, 4)), train=False)
        return v["params"], v["batch_stats"]

    def loss(params, state, batch, key):
        x, y = batch
        logits, new = model.apply(
            {"params": params, "batch_stats": state}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

    def evaluate(params, state, batch):
        x, y = batch
        logits = model.apply({"params": params, "batch_stats": state}, x, train=False)
        return {"accuracy": jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32)}

    groups = {"Dense_0": {"kernel": "unit"}, "Dense_1": {"kernel": None, "bias": None}}
    groups = {**groups, "BatchNorm_0": {"scale": None, "bias": None}}
    return harness.Task(init, loss, evaluate, groups=groups)


DATA = {"train": _data(96, 0), "val": _data(32, 1), "test": _data(32, 2)}
PROTOCOL = harness.Protocol(epochs=2, batch_size=32, seeds=3, selection_seeds=2, exponents=(0, 1))


def _sgd(name, lr, base=None):
    return harness.Candidate(
        name, name, {"learning_rate": lr}, "test", lambda **kw: optax.sgd(**kw), base, "SGD"
    )


def test_a_diverging_learning_rate_is_marked_and_never_selected():
    # lr 1e2 trains; lr 1e2 * 10^(1/2)... is pushed to divergence by a huge start
    cand = _sgd("sgd", 3e18)
    entry = harness.compare_one(_task(), cand, DATA, PROTOCOL)
    assert all(s["diverged_seeds"] == 2 for s in entry["search"])
    assert entry["selected_learning_rate"] is None
    # the run went on: every seed ran, each marked diverged at its first epoch
    runs = [r for r in entry["runs"] if r["selected"]]
    assert len(runs) == PROTOCOL.seeds
    assert all(r["diverged_epoch"] == 1 and r["final_train_loss"] is None for r in runs)
    assert entry["summary"]["diverged_seeds"] == PROTOCOL.seeds
    assert "diverged" in harness.format_table(
        {"optimizers": {"sgd": entry}, "protocol": {"seeds": PROTOCOL.seeds}}
    )


def test_a_winning_end_of_the_grid_is_extended_and_seeds_are_reused():
    # from a small start, the larger rates win: the grid grows upwards
    entry = harness.compare_one(_task(), _sgd("sgd", 0.03), DATA, PROTOCOL)
    grid = entry["learning_rate_grid"]
    assert len(grid) == len(PROTOCOL.exponents) + PROTOCOL.extensions
    assert grid == sorted(grid) and grid[-1] == pytest.approx(0.03 * 10 ** (3 / 2))
    scores = [s["val_accuracy_mean"] for s in entry["search"]]
    assert scores[-1] > scores[1]  # the extension found a better rate than the first grid
    selected = [r for r in entry["runs"] if r["selected"]]
    assert sorted(r["seed"] for r in selected) == [0, 1, 2]
    # 2 seeds per searched rate, plus the one seed not searched at the selected rate
    assert len(entry["runs"]) == 2 * len(grid) + 1


def test_the_same_protocol_gives_the_same_numbers():
    a = harness.compare_one(_task(), _sgd("sgd", 0.3), DATA, PROTOCOL)
    b = harness.compare_one(_task(), _sgd("sgd", 0.3), DATA, PROTOCOL)
    for ra, rb in zip(a["runs"], b["runs"]):
        assert ra["curves"] == rb["curves"]


def test_compare_pairs_each_optimizer_with_its_base_by_seed():
    chosen = [_sgd("base", 0.3), _sgd("other", 0.1, base="base")]
    protocol = harness.Protocol(
        epochs=2, batch_size=32, seeds=4, selection_seeds=1, exponents=(0,), extensions=0
    )
    entries = harness.compare(_task(), chosen, DATA, protocol)
    vs = entries["other"]["versus_base"]
    mine = harness.selected_values(entries["other"], "test_accuracy")
    theirs = harness.selected_values(entries["base"], "test_accuracy")
    assert vs["n"] == 4
    assert vs["mean_difference"] == pytest.approx(np.mean(np.subtract(mine, theirs)))
    assert "versus_base" not in entries["base"]
    table = harness.format_table({"optimizers": entries, "protocol": {"seeds": 4}})
    assert "(base)" in table and vs["verdict"] in table


def test_paired_interval_is_students_t_of_the_differences():
    rng = np.random.default_rng(0)
    b = rng.normal(0.9, 0.01, 10)
    a = b + rng.normal(0.002, 0.003, 10)
    c = stats.paired_comparison(a, b)
    d = a - b
    half = scipy_stats.t.ppf(0.975, 9) * d.std(ddof=1) / math.sqrt(10)
    assert c.low == pytest.approx(d.mean() - half) and c.high == pytest.approx(d.mean() + half)
    assert c.half_width == pytest.approx(half)
    assert c.verdict == ("better" if c.low > 0 else "no detectable difference")


@pytest.mark.parametrize(
    "shift, higher, verdict",
    [
        (0.05, True, "better"),
        (-0.05, True, "worse"),
        (0.05, False, "worse"),  # a higher loss is worse
        (0.0, True, "no detectable difference"),
    ],
)
def test_paired_verdicts(shift, higher, verdict):
    b = np.linspace(0.5, 0.6, 6)
    noise = np.array([1, -1, 1, -1, 1, -1]) * 1e-3
    c = stats.paired_comparison(b + shift + noise, b, higher_is_better=higher)
    assert c.verdict == verdict


def test_paired_comparison_degenerate_inputs():
    assert stats.paired_comparison([0.5], [0.4]).verdict == "too few seeds"
    same = stats.paired_comparison([0.5, 0.6], [0.4, 0.5])  # identical differences
    assert same.verdict == "better" and same.low == same.high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="one value per seed"):
        stats.paired_comparison([0.5, 0.6], [0.4])


def test_figures_draw_every_optimizer_distinguishably(tmp_path):
    chosen = [_sgd("base", 0.3)] + [_sgd(f"v{i}", 0.1 * (i + 1), base="base") for i in range(6)]
    protocol = harness.Protocol(
        epochs=2, batch_size=32, seeds=2, selection_seeds=1, exponents=(0,), extensions=0
    )
    results = {
        "optimizers": harness.compare(_task(), chosen, DATA, protocol),
        "protocol": {"seeds": 2},
    }
    style = harness.styles(results)
    pairs = {(s["color"], s["linestyle"]) for s in style.values()}
    assert len(pairs) == len(chosen)
    assert style["base"]["color"] == "black"
    harness.write_outputs(str(tmp_path), results, "t", {"base": [0.01, 0.01]})
    for name in ("results.json", "curves.png", "angular_updates.png"):
        assert (tmp_path / name).stat().st_size > 0
    jax.clear_caches()
