"""A Flax training loop for comparing optimizers, its protocol, results files and figures.

The protocol (Roburin et al. app. E.1, in small, with paired seeds):

1. **Learning-rate search.** Each optimizer starts from its published learning rate ``lr0``
   and tries ``lr0 * 10**(k/2)`` for the protocol's ``exponents`` on ``selection_seeds``
   seeds, scored by the mean final accuracy on the validation split. When the best rate is
   at an end of the grid, the grid grows by one half-decade on that side (at most
   ``extensions`` times), so a selected rate is never an unexplored edge by accident.
2. **Every seed at the selected rate.** Seeds ``0 .. seeds-1`` (those of the search are
   reused) give the test accuracies. Seed ``s`` fixes the initialisation and the data order,
   the same for every optimizer, so optimizers compare seed by seed
   (:mod:`optax_sphere.experiments.stats`).
3. **Divergence.** A run whose training loss becomes NaN or infinite stops there and is
   marked diverged; a learning rate with a diverged search run cannot be selected. A diverged
   run at the selected rate keeps the accuracy its parameters give (chance level), and the
   table says how many diverged.

Each run is a sequence of ``jax.jit``-ed steps (one compilation per optimizer, the learning
rate is an argument): on CPU this is several times faster than ``lax.scan`` over the steps or
``vmap`` over runs, which turn the convolutions into slower while-loop or grouped forms.
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

from optax_sphere import presets
from optax_sphere._paths import path_str
from optax_sphere.experiments.stats import paired_comparison
from optax_sphere.geometry import angle
from optax_sphere.groups import resolve_groups

PyTree = Any
Batch = tuple[jax.Array, jax.Array]


@dataclass(frozen=True)
class Candidate:
    """One optimizer of a comparison: ``make(learning_rate=..., **hyperparams)`` builds it.

    ``base``: the name of the optimizer it modifies (``None`` for a baseline), against which
    it is compared seed by seed; ``family``: the figure panel and table block it belongs to.
    """

    name: str
    label: str
    hyperparams: Mapping[str, Any]  # the starting point; learning_rate is searched around it
    source: str
    make: Callable[..., optax.GradientTransformation]
    base: str | None = None
    family: str = ""


@dataclass(frozen=True)
class Task:
    """What the loop needs from a model, all pure functions.

    ``init(key) -> (params, state)``; ``loss(params, state, batch, key) -> (loss,
    new_state)``; ``evaluate(params, state, batch) -> {metric: per-batch sum}`` (the loop adds
    the sums over evaluation chunks and divides by the split's size); ``groups``: the groups
    whose angular updates are recorded (a spec accepted by ``resolve_groups``).
    """

    init: Callable[[jax.Array], tuple[PyTree, PyTree]]
    loss: Callable[[PyTree, PyTree, Batch, jax.Array], tuple[jax.Array, PyTree]]
    evaluate: Callable[[PyTree, PyTree, Batch], dict[str, jax.Array]]
    groups: Any = "unit"


@dataclass(frozen=True)
class Protocol:
    """How a comparison is run (see the module docstring)."""

    epochs: int
    batch_size: int
    seeds: int
    selection_seeds: int
    exponents: tuple[int, ...]
    extensions: int = 2
    metric: str = "accuracy"
    higher_is_better: bool = True
    eval_batch: int = 500
    curve_splits: tuple[str, ...] = ("val",)  # evaluated every epoch; the others at the end
    schedule: Callable[[Any, int], optax.Schedule] = presets.roburin_step_schedule

    def learning_rate(self, start: float, exponent: int) -> float:
        return float(start * 10 ** (exponent / 2))


@dataclass
class Run:
    """One training run: per-epoch curves, per-layer angular updates, wall time."""

    learning_rate: float
    seed: int
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    angles: dict[str, np.ndarray] = field(default_factory=dict)
    finals: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    diverged_epoch: int | None = None

    def final(self, name: str) -> float:
        return float(self.finals[name] if name in self.finals else self.curves[name][-1])


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


class Trainer:
    """Compiled training of one optimizer on one task; :meth:`run` trains one (lr, seed)."""

    def __init__(
        self,
        task: Task,
        make_tx: Callable[[optax.Schedule], optax.GradientTransformation],
        protocol: Protocol,
        train: Batch,
        evals: Mapping[str, Batch],
    ):
        self.protocol = protocol
        self.x_train, self.y_train = (np.asarray(a) for a in train)
        n = len(self.x_train)
        self.steps = n // protocol.batch_size
        total_steps = self.steps * protocol.epochs

        def build(lr):
            return make_tx(protocol.schedule(lr, total_steps))

        def init_one(key, lr):
            params, state = task.init(key)
            groups = resolve_groups(task.groups, params)
            zero = jax.tree.map(jnp.zeros_like, _layer_angles(groups, params, params))
            sums = {"loss": jnp.zeros(()), "angles": zero}
            return params, state, build(lr).init(params), jax.random.fold_in(key, 1), sums

        def step_one(carry, lr, idx, xs, ys):
            params, state, opt_state, key, sums = carry
            groups = resolve_groups(task.groups, params)
            key, step_key = jax.random.split(key)
            (loss, state), grads = jax.value_and_grad(task.loss, has_aux=True)(
                params, state, (xs[idx], ys[idx]), step_key
            )
            updates, opt_state = build(lr).update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            step_sums = {"loss": loss, "angles": _layer_angles(groups, params, new_params)}
            sums = jax.tree.map(jnp.add, sums, step_sums)
            return new_params, state, opt_state, key, sums

        self._init = jax.jit(init_one)
        self._step = jax.jit(step_one, donate_argnums=0)
        self._zeros = jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree))
        self._evaluate = jax.jit(task.evaluate)
        self._xs, self._ys = jnp.asarray(self.x_train), jnp.asarray(self.y_train)
        self._evals = {}
        for split, (xe, ye) in evals.items():
            count = len(xe)
            size = max(d for d in range(1, min(protocol.eval_batch, count) + 1) if count % d == 0)
            chunks = [
                (jnp.asarray(xe[i : i + size]), jnp.asarray(ye[i : i + size]))
                for i in range(0, count, size)
            ]
            self._evals[split] = (chunks, count)

    def _evaluate_split(self, carry: tuple, split: str) -> dict[str, float]:
        chunks, count = self._evals[split]
        totals = [self._evaluate(carry[0], carry[1], c) for c in chunks]
        sums = jax.device_get(jax.tree.map(lambda *v: sum(v), *totals))
        return {f"{split}_{metric}": float(value) / count for metric, value in sums.items()}

    def run(self, learning_rate: float, seed: int, progress: Any = None) -> Run:
        p = self.protocol
        start = time.perf_counter()
        lr = jnp.asarray(learning_rate, jnp.float32)
        carry = self._init(jax.random.key(seed), lr)
        order_rng = np.random.default_rng([seed, 1])
        n = len(self.x_train)
        curves: dict[str, list[float]] = {"train_loss": []}
        angles: dict[str, list[float]] = {}
        run = Run(learning_rate, seed)
        for epoch in range(p.epochs):
            order = order_rng.permutation(n)[: self.steps * p.batch_size]
            carry = (*carry[:4], self._zeros(carry[4]))
            for idx in order.reshape(self.steps, p.batch_size):
                carry = self._step(carry, lr, idx, self._xs, self._ys)
            sums = jax.device_get(carry[4])
            curves["train_loss"].append(float(sums["loss"]) / self.steps)
            for layer, value in sums["angles"].items():
                angles.setdefault(layer, []).append(float(value) / self.steps)
            diverged = not math.isfinite(curves["train_loss"][-1])
            last = diverged or epoch == p.epochs - 1
            for split in self._evals:
                if split in p.curve_splits or last:
                    for name, value in self._evaluate_split(carry, split).items():
                        if split in p.curve_splits:
                            curves.setdefault(name, []).append(value)
                        if last:
                            run.finals[name] = value
            if progress is not None:
                progress.update(1)
            if diverged:
                run.diverged_epoch = epoch + 1
                if progress is not None:
                    progress.update(p.epochs - epoch - 1)
                break
        pad = p.epochs - len(curves["train_loss"])  # a diverged run's remaining epochs: NaN
        run.curves = {k: np.asarray(v + [v[-1]] * pad, np.float64) for k, v in curves.items()}
        run.curves["train_loss"][p.epochs - pad :] = np.nan
        run.angles = {k: np.asarray(v + [np.nan] * pad, np.float64) for k, v in angles.items()}
        run.seconds = time.perf_counter() - start
        return run


def _score(runs: Sequence[Run], protocol: Protocol) -> float:
    """Mean final validation metric; a diverged run disqualifies its learning rate."""
    worst = -math.inf if protocol.higher_is_better else math.inf
    values = [r.final(f"val_{protocol.metric}") for r in runs]
    if any(r.diverged_epoch is not None or not math.isfinite(v) for r, v in zip(runs, values)):
        return worst
    return float(np.mean(values))


def compare_one(
    task: Task,
    cand: Candidate,
    data: Mapping[str, Batch],
    protocol: Protocol,
    progress: Any = None,
) -> dict[str, Any]:
    """The protocol for one optimizer: search, selection, every seed; its results entry."""
    hp = {k: v for k, v in cand.hyperparams.items() if k != "learning_rate"}
    lr0 = float(cand.hyperparams["learning_rate"])
    evals = {k: v for k, v in data.items() if k != "train"}
    trainer = Trainer(
        task,
        lambda schedule: cand.make(learning_rate=schedule, **hp),
        protocol,
        data["train"],
        evals,
    )
    runs: dict[tuple[int, int], Run] = {}  # (exponent, seed) -> run

    def search(exponent: int) -> None:
        for seed in range(protocol.selection_seeds):
            lr = protocol.learning_rate(lr0, exponent)
            runs[exponent, seed] = trainer.run(lr, seed, progress)

    exponents = sorted(protocol.exponents)
    for k in exponents:
        search(k)
    sign = 1 if protocol.higher_is_better else -1

    def scores() -> dict[int, float]:
        return {
            k: _score([runs[k, s] for s in range(protocol.selection_seeds)], protocol)
            for k in exponents
        }

    for _ in range(protocol.extensions):
        by_k = scores()
        best = max(exponents, key=lambda k: sign * by_k[k])
        if not math.isfinite(by_k[best]) or best not in (exponents[0], exponents[-1]):
            break
        if len(exponents) > 1 and by_k[exponents[0]] == by_k[exponents[-1]]:
            break
        new = best - 1 if best == exponents[0] else best + 1
        if progress is not None:
            progress.total += protocol.selection_seeds * protocol.epochs
        search(new)
        exponents = sorted([*exponents, new])
    by_k = scores()
    best = max(exponents, key=lambda k: sign * by_k[k])
    selected = math.isfinite(by_k[best])
    for seed in range(protocol.selection_seeds, protocol.seeds):
        runs[best, seed] = trainer.run(protocol.learning_rate(lr0, best), seed, progress)

    final = [runs[best, s] for s in range(protocol.seeds)]
    metric = protocol.metric
    summary: dict[str, Any] = {}
    for key in ("train_loss", f"val_{metric}", f"test_{metric}"):
        values = [r.final(key) for r in final]
        finite = all(math.isfinite(v) for v in values)
        summary[f"{key}_mean"] = float(np.mean(values)) if finite else None
        summary[f"{key}_std"] = (
            float(np.std(values, ddof=1))
            if finite and len(values) > 1
            else (0.0 if finite else None)
        )
    summary["diverged_seeds"] = sum(r.diverged_epoch is not None for r in final)
    summary["seconds_per_run"] = float(np.mean([r.seconds for r in runs.values()]))
    grid = [protocol.learning_rate(lr0, k) for k in exponents]
    return {
        "label": cand.label,
        "family": cand.family,
        "base": cand.base,
        "source": cand.source,
        "hyperparameters": {**hp, "learning_rate": protocol.learning_rate(lr0, best)},
        "learning_rate_grid": grid,
        "search": [
            {
                "learning_rate": protocol.learning_rate(lr0, k),
                f"val_{metric}_mean": _finite_or_none(by_k[k]),
                "diverged_seeds": sum(
                    runs[k, s].diverged_epoch is not None for s in range(protocol.selection_seeds)
                ),
            }
            for k in exponents
        ],
        "selected_learning_rate": protocol.learning_rate(lr0, best) if selected else None,
        # the best rate is still an end of the grid after every extension: a better one may lie
        # beyond it
        "selected_at_grid_end": selected and best in (exponents[0], exponents[-1]),
        "summary": summary,
        "angular_updates": {
            layer: [_finite_or_none(v) for v in _mean_over_finite([r.angles[layer] for r in final])]
            for layer in final[0].angles
        },
        "runs": [
            {
                "seed": r.seed,
                "learning_rate": r.learning_rate,
                "selected": k == best,
                "diverged_epoch": r.diverged_epoch,
                "final_train_loss": _finite_or_none(r.final("train_loss")),
                **{name: _finite_or_none(v) for name, v in r.finals.items()},
                "seconds": r.seconds,
                "curves": {name: [_finite_or_none(v) for v in c] for name, c in r.curves.items()},
            }
            for (k, _), r in sorted(runs.items(), key=lambda item: item[0])
        ],
    }


def compare(
    task: Task,
    chosen: Sequence[Candidate],
    data: Mapping[str, Batch],
    protocol: Protocol,
    progress: Any = None,
) -> dict[str, Any]:
    """:func:`compare_one` for every candidate, then each one's paired comparison with its
    base (``entry["versus_base"]``)."""
    entries = {}
    for cand in chosen:
        if progress is not None:
            progress.set_description(cand.name)
        entries[cand.name] = compare_one(task, cand, data, protocol, progress)
    key = f"test_{protocol.metric}"
    for entry in entries.values():
        base = entry["base"]
        if base is None or base not in entries:
            continue
        mine = selected_values(entry, key)
        theirs = selected_values(entries[base], key)
        comparison = paired_comparison(mine, theirs, higher_is_better=protocol.higher_is_better)
        entry["versus_base"] = {"base": base, **comparison.as_dict()}
    return entries


def selected_values(entry: Mapping[str, Any], key: str) -> list[float]:
    """The final ``key`` of an optimizer's runs at its selected learning rate, by seed."""
    runs = sorted((r for r in entry["runs"] if r["selected"]), key=lambda r: r["seed"])
    return [math.nan if r[key] is None else r[key] for r in runs]


def _mean_over_finite(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Column means over the finite entries (NaN where none is)."""
    a = np.asarray(rows, np.float64)
    ok = np.isfinite(a)
    count = ok.sum(0)
    return np.where(count > 0, np.where(ok, a, 0.0).sum(0) / np.maximum(count, 1), np.nan)


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------ output
def format_table(results: Mapping[str, Any], metric: str = "accuracy") -> str:
    """The table by family (each base first, then the optimizers that modify it), with each
    optimizer's paired difference to its base and the verdict."""
    rows = results["optimizers"]
    scale, unit = (100.0, " %") if metric == "accuracy" else (1.0, "")
    n = results["protocol"]["seeds"]
    lines = [
        f"test {metric}{unit}: mean +- std over {n} seeds; difference to the base optimizer, "
        f"paired by seed, with its 95% confidence interval",
        f"{'optimizer':<26} {'lr':>8} {'train loss':>10} {'test ' + metric:>17} "
        f"{'vs base [95% CI]':>27}  verdict",
    ]
    for family in dict.fromkeys(r["family"] for r in rows.values()):
        lines.append(f"-- {family}")
        for r in rows.values():
            if r["family"] != family:
                continue
            s = r["summary"]
            lr = r["selected_learning_rate"]
            lr = (
                "diverged"
                if lr is None
                else f"{lr:.3g}" + ("*" if r["selected_at_grid_end"] else "")
            )
            loss = s["train_loss_mean"]
            loss = "nan" if loss is None else f"{loss:.4f}"
            mean, std = s[f"test_{metric}_mean"], s[f"test_{metric}_std"]
            value = "nan" if mean is None else f"{scale * mean:.2f} +- {scale * std:.2f}"
            if s["diverged_seeds"]:
                value += f" ({s['diverged_seeds']} diverged)"
            vs = r.get("versus_base")
            if vs is None:
                diff, verdict = "(base)" if r["base"] is None else "", ""
            elif vs["low"] is None:
                diff, verdict = f"{scale * vs['mean_difference']:+.2f}", vs["verdict"]
            else:
                diff = (
                    f"{scale * vs['mean_difference']:+.2f} "
                    f"[{scale * vs['low']:+.2f}, {scale * vs['high']:+.2f}]"
                )
                verdict = vs["verdict"]
            lines.append(f"{r['label']:<26} {lr:>8} {loss:>10} {value:>17} {diff:>27}  {verdict}")
    if any(r["selected_at_grid_end"] for r in rows.values()):
        lines.append("* the selected learning rate is an end of the searched grid")
    widths = [v["versus_base"]["half_width"] for v in rows.values() if "versus_base" in v]
    widths = [w for w in widths if w is not None]
    if widths:
        lines.append(
            f"the intervals' half-widths are {scale * min(widths):.2f} to {scale * max(widths):.2f}"
            f"{unit}: smaller differences are not separated from 0 by {n} seeds"
        )
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")


def write_outputs(
    out: str,
    results: Mapping[str, Any],
    title: str,
    predictions: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """``results.json``, ``curves.png`` and ``angular_updates.png`` in the folder ``out``."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "results.json"), results)
    metric = results["protocol"].get("metric", "accuracy")
    plot_curves(os.path.join(out, "curves.png"), results, title, metric)
    plot_angles(os.path.join(out, "angular_updates.png"), results, predictions)


# One colour per optimizer (tab20 has 20) and the base of each family drawn black and solid.
_LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)))


def styles(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A colour and line style per optimizer, every optimizer distinguishable."""
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors + matplotlib.colormaps["Dark2"].colors
    out, i = {}, 0
    by_family: dict[str, int] = {}
    for name, r in results["optimizers"].items():
        j = by_family.get(r["family"], 0)
        by_family[r["family"]] = j + 1
        if r["base"] is None:
            out[name] = {"color": "black", "linestyle": "-", "linewidth": 1.8}
        else:
            out[name] = {
                "color": colors[i % len(colors)],
                "linestyle": _LINE_STYLES[j % len(_LINE_STYLES)],
                "linewidth": 1.3,
            }
            i += 1
    return out


def plot_curves(
    path: str, results: Mapping[str, Any], title: str, metric: str = "accuracy"
) -> None:
    """Per family (a row): validation ``metric`` and training loss over epochs at the selected
    learning rates, mean over seeds with a +- std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["optimizers"]
    families = list(dict.fromkeys(r["family"] for r in rows.values()))
    style = styles(results)
    fig, axes = plt.subplots(len(families), 2, figsize=(12, 3.6 * len(families)), squeeze=False)
    for row, family in zip(axes, families):
        for ax, key, name in (
            (row[0], f"val_{metric}", f"validation {metric}"),
            (row[1], "train_loss", "train loss"),
        ):
            for opt, r in rows.items():
                if r["family"] != family:
                    continue
                curves = np.asarray(
                    [
                        [np.nan if v is None else v for v in run["curves"][key]]
                        for run in r["runs"]
                        if run["selected"]
                    ],
                    np.float64,
                )
                epochs = np.arange(1, curves.shape[1] + 1)
                mean = np.nanmean(curves, 0)
                ax.plot(epochs, mean, label=r["label"], **style[opt])
                if len(curves) > 1:
                    std = np.nanstd(curves, 0)
                    ax.fill_between(
                        epochs, mean - std, mean + std, alpha=0.12, color=style[opt]["color"]
                    )
            ax.set_title(f"{family}: {name}", fontsize=10)
            ax.set_xlabel("epoch")
            if "loss" in key:
                ax.set_yscale("log")
            else:
                finals = [r["summary"][f"val_{metric}_mean"] for r in rows.values()]
                finals = [v for v in finals if v is not None]
                if finals:  # the end of training, where the optimizers differ
                    ax.set_ylim(min(finals) - 0.03, max(finals) + 0.01)
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=8, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_angles(
    path: str,
    results: Mapping[str, Any],
    predictions: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Mean angular update per step of each grouped layer over training (Kosson et al.
    fig. 4), one panel per optimizer in family order; ``predictions[name]``: the equilibrium
    angular update per epoch that Kosson et al. predict for that optimizer, drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: v for k, v in results["optimizers"].items() if v["angular_updates"]}
    names = list(rows)
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False, sharey=True
    )
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        for layer, values in rows[name]["angular_updates"].items():
            values = np.asarray([np.nan if v is None else v for v in values], np.float64)
            ax.plot(np.arange(1, len(values) + 1), values, label=layer, lw=1)
        if predictions and name in predictions:
            pred = np.asarray(predictions[name], np.float64)
            ax.plot(np.arange(1, len(pred) + 1), pred, "k--", lw=1, label="equilibrium (Kosson)")
        ax.set_title(rows[name]["label"], fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean angular update per step (rad)")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
