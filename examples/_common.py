"""Shared code of the examples: a Flax training loop, optimizer look-up, results, plots.

One epoch of one run is one ``jax.jit``-ed ``lax.scan`` over the steps (no host transfer
inside the training step). The optimizer is built inside the traced function from a schedule
of a traced learning rate, so all runs of one optimizer (learning rates x seeds) share one
compiled program. Runs are executed one after the other: on CPU, ``jax.vmap`` over runs turns
the convolutions into grouped convolutions, which are slower than running them in turn.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sphere
from optax_sphere.geometry import angle
from optax_sphere.groups import path_str, resolve_groups

PyTree = Any
Batch = tuple[jax.Array, jax.Array]


# ------------------------------------------------------------------------------- optimizers
def lookup(name: str) -> Callable[..., optax.GradientTransformation] | None:
    """``optax_sphere.<name>``, or ``None`` (with a message) when this version lacks it."""
    alias = getattr(optax_sphere, name, None)
    if alias is None:
        print(f"skipping {name}: optax_sphere {optax_sphere.__version__} has no `{name}` yet")
    return alias


def step_decay(init_value: Any, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The papers' fixed-frequency decay: ``* 0.1`` at 1/3, 5/9 and 7/9 of training.

    ``init_value`` may be a traced scalar (one learning rate per vmapped run).
    """
    bounds = jnp.asarray([round(total_steps * f) for f in (1 / 3, 5 / 9, 7 / 9)])

    def schedule(count: jax.Array) -> jax.Array:
        return init_value * 0.1 ** jnp.sum(count >= bounds)

    return schedule


@dataclass
class Candidate:
    """One optimizer of a comparison: ``make(**keywords)`` builds it."""

    name: str
    label: str
    hyperparams: dict[str, Any]  # the starting point; learning_rate is searched around it
    source: str
    make: Callable[..., optax.GradientTransformation]


# ---------------------------------------------------------------------------------- training
@dataclass
class Task:
    """What the loop needs from a model, all pure functions.

    init(key) -> (params, state); loss(params, state, batch, key) -> (loss, new_state);
    evaluate(params, state, batch) -> dict of per-batch metric sums (e.g. correct count,
    summed loss) which the loop adds over evaluation chunks and divides by the size.
    """

    init: Callable[[jax.Array], tuple[PyTree, PyTree]]
    loss: Callable[[PyTree, PyTree, Batch, jax.Array], tuple[jax.Array, PyTree]]
    evaluate: Callable[[PyTree, PyTree, Batch], dict[str, jax.Array]]
    groups: Any = None  # which leaves get angular-update curves (default: per_unit)


@dataclass
class RunSet:
    """Results of several runs trained together (leading axis = run)."""

    curves: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (runs, epochs)
    angles: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (runs, epochs)
    seconds: float = 0.0


def _layer_angles(groups: PyTree, old: PyTree, new: PyTree) -> dict[str, jax.Array]:
    """Mean angular update (radians) over the groups of each grouped leaf."""
    out = {}
    flat_old = jax.tree_util.tree_flatten_with_path(old)[0]
    flat_new = jax.tree.leaves(new)
    flat_groups = jax.tree.leaves(groups, is_leaf=lambda g: g is None)
    for (path, x_old), x_new, group in zip(flat_old, flat_new, flat_groups):
        if group is not None:
            out[path_str(path)] = jnp.mean(angle(x_old, x_new, group))
    return out


_zeros_like = jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree))  # shared compilations


def _evaluator(task: Task) -> Callable[..., Any]:
    """One compiled evaluation per task (it does not depend on the optimizer)."""
    cached = getattr(task, "_compiled_evaluate", None)
    if cached is None:
        cached = jax.jit(task.evaluate)
        task._compiled_evaluate = cached
    return cached


def train_runs(
    task: Task,
    make_tx: Callable[[Callable[[jax.Array], jax.Array]], optax.GradientTransformation],
    train: Batch,
    evals: Mapping[str, Batch],
    *,
    learning_rates: Sequence[float],
    seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    schedule: Callable[[Any, int], Callable[[jax.Array], jax.Array]] = step_decay,
    eval_batch: int = 500,
    progress: Any = None,
) -> RunSet:
    """Trains ``len(seeds)`` runs at once (run ``i``: learning rate ``learning_rates[i]``,
    seed ``seeds[i]``: initialisation and data order), evaluating after every epoch.

    ``make_tx(schedule)`` builds the optimizer for one run. Curves: ``train_loss`` (mean over
    the epoch's steps) and, for each ``evals`` split, each metric of ``task.evaluate``.
    """
    x_train, y_train = (np.asarray(a) for a in train)
    n = len(x_train)
    steps = n // batch_size
    total_steps = steps * epochs
    lrs = [jnp.asarray(lr, jnp.float32) for lr in learning_rates]
    keys = [jax.random.key(s) for s in seeds]

    def build(lr):
        return make_tx(schedule(lr, total_steps))

    def init_one(key, lr):
        params, state = task.init(key)
        return params, state, build(lr).init(params), jax.random.fold_in(key, 1)

    def step_one(carry, lr, idx, xs, ys):
        params, state, opt_state, key, sums = carry
        tx = build(lr)
        groups = resolve_groups(task.groups if task.groups is not None else "unit", params)
        key, step_key = jax.random.split(key)
        (loss, state), grads = jax.value_and_grad(task.loss, has_aux=True)(
            params, state, (xs[idx], ys[idx]), step_key
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        step_sums = {"loss": loss, "angles": _layer_angles(groups, params, new_params)}
        sums = jax.tree.map(jnp.add, sums, step_sums)
        return new_params, state, opt_state, key, sums

    def zero_sums(params):
        groups = resolve_groups(task.groups if task.groups is not None else "unit", params)
        angles = _layer_angles(groups, params, params)
        return {"loss": jnp.zeros(()), "angles": jax.tree.map(jnp.zeros_like, angles)}

    # On CPU a Python loop of jitted steps runs several times faster than the same step
    # inside lax.scan (XLA's while loops miss the fast convolution path); dispatch is async.
    init_run = jax.jit(init_one)
    step_run = jax.jit(step_one, donate_argnums=0)
    evaluate_run = _evaluator(task)

    start = time.perf_counter()
    xs_dev, ys_dev = jnp.asarray(x_train), jnp.asarray(y_train)
    eval_sets = {}
    for split, (xe, ye) in evals.items():
        count = len(xe)
        size = max(d for d in range(1, min(eval_batch, count) + 1) if count % d == 0)
        chunks = [
            (jnp.asarray(xe[i : i + size]), jnp.asarray(ye[i : i + size]))
            for i in range(0, count, size)
        ]
        eval_sets[split] = (chunks, count)

    carries = []
    for key, lr in zip(keys, lrs):
        params, state, opt_state, run_key = init_run(key, lr)
        carries.append((params, state, opt_state, run_key, zero_sums(params)))
    orders = [np.random.default_rng([seed, 1]) for seed in seeds]
    curves: dict[str, list] = {"train_loss": []}
    angles: dict[str, list] = {}
    for _ in range(epochs):
        sums = []
        for i, lr in enumerate(lrs):
            order = orders[i].permutation(n)[: steps * batch_size].reshape(steps, batch_size)
            carry = (*carries[i][:4], _zeros_like(carries[i][4]))
            for idx in order:
                carry = step_run(carry, lr, idx, xs_dev, ys_dev)
            carries[i] = carry
            sums.append(carry[4])
        curves["train_loss"].append(jnp.stack([s["loss"] for s in sums]) / steps)
        for layer in sums[0]["angles"]:
            values = jnp.stack([s["angles"][layer] for s in sums]) / steps
            angles.setdefault(layer, []).append(values)
        for split, (chunks, count) in eval_sets.items():
            metrics = []
            for c in carries:
                totals = [evaluate_run(c[0], c[1], chunk) for chunk in chunks]
                metrics.append(jax.tree.map(lambda *v: sum(v), *totals))
            for metric in metrics[0]:
                values = jnp.stack([m[metric] for m in metrics]) / count
                curves.setdefault(f"{split}_{metric}", []).append(values)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{float(jnp.nanmean(curves['train_loss'][-1])):.3f}")
    jax.block_until_ready(carries)
    result = RunSet(seconds=time.perf_counter() - start)
    result.curves = {k: np.stack([np.asarray(v) for v in vs], 1) for k, vs in curves.items()}
    result.angles = {k: np.stack([np.asarray(v) for v in vs], 1) for k, vs in angles.items()}
    return result


def run_grid(
    task: Task,
    cand: Candidate,
    data: Mapping[str, Batch],
    *,
    learning_rates: Sequence[float],
    seeds: Sequence[int],
    metric: str = "accuracy",
    higher_is_better: bool = True,
    **train_kwargs: Any,
) -> tuple[dict[str, Any], RunSet]:
    """Every (learning rate, seed) pair on ``data["train"]``; the learning rate with the best
    mean final validation ``metric`` over seeds is selected; returns the results entry (all
    runs, summary of the selected ones) and the selected runs' curves."""
    run_lrs = [lr for lr in learning_rates for _ in seeds]
    run_seeds = [s for _ in learning_rates for s in seeds]
    hp = {k: v for k, v in cand.hyperparams.items() if k != "learning_rate"}
    evals = {k: v for k, v in data.items() if k != "train"}
    out = train_runs(
        task,
        lambda schedule: cand.make(learning_rate=schedule, **hp),
        data["train"],
        evals,
        learning_rates=run_lrs,
        seeds=run_seeds,
        **train_kwargs,
    )
    val = out.curves[f"val_{metric}"][:, -1].reshape(len(learning_rates), len(seeds))
    worst = -np.inf if higher_is_better else np.inf
    val = np.where(np.isfinite(val), val, worst).mean(1)
    best = int(np.argmax(val) if higher_is_better else np.argmin(val))
    picked = slice(best * len(seeds), (best + 1) * len(seeds))
    runs = []
    for i, (lr, seed) in enumerate(zip(run_lrs, run_seeds)):
        run = {
            "seed": seed,
            "hyperparameters": {**hp, "learning_rate": lr},
            "selected": i // len(seeds) == best,
            "final_train_loss": finite_or_none(out.curves["train_loss"][i, -1]),
        }
        for split in evals:
            for name in [k for k in out.curves if k.startswith(split + "_")]:
                run[name] = finite_or_none(out.curves[name][i, -1])
        run["seconds"] = out.seconds / len(run_lrs)
        run["curves"] = {k: [finite_or_none(v) for v in c[i]] for k, c in out.curves.items()}
        runs.append(run)
    summary = {}
    for key in ["final_train_loss"] + [k for k in runs[0] if k.startswith(("val_", "test_"))]:
        values = [r[key] for r in runs if r["selected"]]
        if any(v is None for v in values):
            summary[f"{key}_mean"], summary[f"{key}_std"] = None, None
        else:
            summary[f"{key}_mean"], summary[f"{key}_std"] = mean_std(values)
    summary["seconds_per_run"] = out.seconds / len(run_lrs)
    entry = {
        "label": cand.label,
        "source": cand.source,
        "learning_rate_grid": list(learning_rates),
        "selected_learning_rate": learning_rates[best],
        "hyperparameters": {**hp, "learning_rate": learning_rates[best]},
        "summary": summary,
        "angular_updates": {
            layer: [float(v) for v in a[picked].mean(0)] for layer, a in out.angles.items()
        },
        "runs": runs,
    }
    selected = RunSet(
        curves={k: v[picked] for k, v in out.curves.items()},
        angles={k: v[picked] for k, v in out.angles.items()},
        seconds=out.seconds,
    )
    return entry, selected


def run_all(
    task: Task,
    chosen: Sequence[Candidate],
    data: Mapping[str, Batch],
    *,
    factors: Sequence[float],
    seeds: Sequence[int],
    progress: Any,
    metric: str = "accuracy",
    **grid_kwargs: Any,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """:func:`run_grid` for every candidate over its learning rate times ``factors``.

    Returns the results entries by optimizer name, the selected runs' ``test <metric>`` and
    ``train loss`` curves and their per-layer angular updates, ready for :func:`write_outputs`.
    """
    entries: dict[str, Any] = {}
    curves: dict[str, dict[str, np.ndarray]] = {f"test {metric}": {}, "train loss": {}}
    angles: dict[str, Any] = {}
    for cand in chosen:
        progress.set_description(cand.name)
        entries[cand.name], picked = run_grid(
            task,
            cand,
            data,
            learning_rates=[cand.hyperparams["learning_rate"] * f for f in factors],
            seeds=seeds,
            metric=metric,
            progress=progress,
            **grid_kwargs,
        )
        curves[f"test {metric}"][cand.name] = picked.curves[f"test_{metric}"]
        curves["train loss"][cand.name] = picked.curves["train_loss"]
        angles[cand.name] = picked.angles
    return entries, curves, angles


# ----------------------------------------------------------------------------------- output
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def format_table(results: Mapping[str, Any], metric: str = "accuracy") -> str:
    """The comparison table, best test ``metric`` first (accuracy shown in %)."""
    rows = results["optimizers"]
    key = f"test_{metric}_mean"
    scale = 100.0 if metric == "accuracy" else 1.0
    higher = metric == "accuracy"

    def order(name):
        v = rows[name]["summary"].get(key)
        return math.inf if v is None else (-v if higher else v)

    n_seeds = len(results["protocol"]["seeds"])
    unit = " %" if metric == "accuracy" else ""
    head = f"test {metric}{unit} (mean +- std, {n_seeds} seed{'s' if n_seeds > 1 else ''})"
    lines = [
        f"{'rank':>4}  {'optimizer':<26} {'lr':>8} {'train loss':>10} {'val ' + metric:>12} "
        f"{head:>40} {'s/run':>6}"
    ]

    def fmt(v, width, digits=2):
        return f"{'nan':>{width}}" if v is None else f"{scale * v:>{width}.{digits}f}"

    for rank, name in enumerate(sorted(rows, key=order), 1):
        r, s = rows[name], rows[name]["summary"]
        loss = s["final_train_loss_mean"]
        loss = "nan" if loss is None else f"{loss:.4f}"
        std = s.get(f"test_{metric}_std")
        lines.append(
            f"{rank:>4}  {r['label']:<26} {r['selected_learning_rate']:>8.2g} {loss:>10} "
            f"{fmt(s.get(f'val_{metric}_mean'), 12)} {fmt(s.get(key), 30)} +- "
            f"{'nan' if std is None else f'{scale * std:.2f}':<6} {s['seconds_per_run']:>6.1f}"
        )
    for name, why in results.get("skipped", {}).items():
        lines.append(f"   -  {name:<26} skipped: {why}")
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")


def write_outputs(
    out: str,
    results: Mapping[str, Any],
    curves: Mapping[str, Mapping[str, np.ndarray]],
    angles: Mapping[str, Mapping[str, np.ndarray]],
    title: str,
) -> None:
    """``results.json`` and, when something was trained, ``curves.png`` and
    ``angular_updates.png`` in the directory ``out``."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "results.json"), results)
    if results["optimizers"]:
        plot_curves(os.path.join(out, "curves.png"), curves, title)
        plot_angles(os.path.join(out, "angular_updates.png"), angles)


def plot_curves(path: str, series: Mapping[str, Mapping[str, np.ndarray]], title: str) -> None:
    """One panel per metric; ``series[metric][label]`` = (runs, epochs), mean +- std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.2), squeeze=False)
    for ax, (metric, by_label) in zip(axes[0], series.items()):
        for label, values in by_label.items():
            values = np.asarray(values, np.float64)
            epochs = np.arange(1, values.shape[1] + 1)
            mean = values.mean(0)
            (line,) = ax.plot(epochs, mean, label=label)
            if len(values) > 1:
                std = values.std(0)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.15, color=line.get_color())
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        if "loss" in metric:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_angles(path: str, by_optimizer: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Angular update per layer over training (Kosson et al. fig. 4): one panel per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(by_optimizer)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True
    )
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        for layer, values in by_optimizer[name].items():
            values = np.asarray(values, np.float64).mean(0)
            ax.plot(np.arange(1, len(values) + 1), values, label=layer, lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean angular update per step (rad)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
