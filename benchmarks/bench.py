"""Step time and optimizer-state memory of the optax_sphere aliases against optax.

Each alias is timed against the optax optimizer it extends, on the same parameter tree, in one
process and interleaved (A, B, A, B, ...), so that both see the same machine load; the ratio of
the median step times is reported. A step is the jit-compiled ``update`` + ``apply_updates``
with the parameters and the optimizer state donated (for both sides alike), which is how a
training step uses an optimizer. See ``benchmarks/README.md`` for how to read the output.

    python benchmarks/bench.py                       # all trees, all aliases, full run
    python benchmarks/bench.py --trees resnet18 --aliases adam_s adam_srt --steps 50
    python benchmarks/bench.py --quick               # a smoke run (a few steps)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sphere
from optax_sphere import registry
from optax_sphere.experiments.environment import environment
from optax_sphere.experiments.trees import (
    kernels_per_tensor,
    make_tree,
    many_small_shapes,
    resnet18_shapes,
    transformer_shapes,
)

PyTree = Any

# --------------------------------------------------------------------------------------------
# Parameter trees (optax_sphere.experiments.trees).
# --------------------------------------------------------------------------------------------

TREES: dict[str, tuple[Callable[[], dict], Any]] = {
    # name: (shapes, groups given to every alias). Shape rules, not optax_sphere.find_groups:
    # these trees are synthetic (no model to measure), built to the shapes of real models
    "resnet18": (resnet18_shapes, "unit"),
    "transformer": (transformer_shapes, kernels_per_tensor),
    "many_small": (many_small_shapes, "unit"),
}


# --------------------------------------------------------------------------------------------
# Aliases and the optax optimizer each one extends.
# --------------------------------------------------------------------------------------------

LR_ADAM, LR_SGD, WD = 1e-3, 1e-2, 1e-2


# name: the alias's keyword arguments; its baseline is the optax optimizer it extends, at the
# same values (optax_sphere.registry)
KEYWORDS: dict[str, dict] = {
    "adam_s": {"learning_rate": LR_ADAM},
    "adam_st": {"learning_rate": LR_ADAM},
    "adam_srt": {"learning_rate": LR_ADAM},
    "adamg": {"learning_rate": LR_ADAM},
    "adamp": {"learning_rate": LR_ADAM},
    "rv_adamw": {"learning_rate": LR_ADAM, "weight_decay": WD},
    "sgdm_rt": {"learning_rate": LR_SGD, "momentum": 0.9},
    "psi_sgdm": {"learning_rate": LR_SGD, "momentum": 0.9},
    "sgdg": {"learning_rate": LR_SGD, "momentum": 0.9},
    "sgdp": {"learning_rate": LR_SGD, "momentum": 0.9, "nesterov": True},
    "rv_sgdm": {"learning_rate": LR_SGD, "momentum": 0.9, "weight_decay": WD},
    "rv_lion": {"learning_rate": 1e-4, "weight_decay": WD},
    "psi_sgd": {"learning_rate": LR_SGD},
    "adagradg": {"learning_rate": LR_SGD},
    "adamh": {"learning_rate": 0.02, "ungrouped_learning_rate": LR_ADAM},
    "muonh": {"learning_rate": 0.02, "ungrouped_learning_rate": LR_ADAM},
}
# name: (alias keyword arguments, baseline name, baseline factory)
ALIASES: dict[str, tuple[dict, str, Callable[[], optax.GradientTransformation]]] = {
    name: (kw, registry.ALIASES[name].base, functools.partial(registry.build_base, name, **kw))
    for name, kw in KEYWORDS.items()
}


def build_alias(name: str, groups: Any) -> optax.GradientTransformation | None:
    factory = getattr(optax_sphere, name, None)
    if factory is None:
        return None
    return factory(**ALIASES[name][0], groups=groups)


# --------------------------------------------------------------------------------------------
# Measurements.
# --------------------------------------------------------------------------------------------


def tree_bytes(tree: PyTree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _copy_tree(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


_FREE_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def count_kernels(hlo: str) -> int:
    """Instructions of the compiled entry computation that run (fusions, copies, ...): each
    is at least one pass over its operands, and one launch."""
    entry = hlo[hlo.index("ENTRY") :].split("\n}")[0]
    count = 0
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = .*? ([a-z][\w\-]*)\(", line)
        if m and m.group(1) not in _FREE_OPS:
            count += 1
    return count


def _bytes_accessed(compiled: Any) -> float | None:
    """XLA's own estimate of the bytes one step reads and writes (``cost_analysis``)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost else float(cost.get("bytes accessed", 0.0)) or None


class Stepper:
    """One optimizer on one tree: a compiled, donating ``update`` + ``apply_updates`` step."""

    def __init__(self, tx: optax.GradientTransformation, params: PyTree, grads: PyTree):
        self.params = _copy_tree(params)
        self.grads = grads
        self.state = tx.init(self.params)
        self.state_bytes = tree_bytes(self.state)

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        t0 = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.state, grads)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.kernels = count_kernels(self.compiled.as_text())
        self.xla_bytes = _bytes_accessed(self.compiled)
        # Floor of the traffic: read params, grads and state once, write params and state once.
        self.min_bytes = 2 * tree_bytes(params) + tree_bytes(grads) + 2 * self.state_bytes
        self.times: list[float] = []

    def run(self, record: bool = True) -> None:
        t0 = time.perf_counter()
        self.params, self.state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        if record:
            self.times.append(time.perf_counter() - t0)

    def finite(self) -> bool:
        return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(self.params))


def measure_copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 15) -> dict:
    """Memory-copy bandwidth (bytes read + bytes written per second), median of ``repeats``:
    ``numpy.copyto`` (one thread's memcpy) and an XLA streaming kernel ``y = a x + b``."""
    n = nbytes // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    memcpy = 2 * nbytes / statistics.median(times)

    stream = jax.jit(lambda x, a: a * x + 1.0, donate_argnums=0)
    x = jnp.ones(n, jnp.float32)
    a = jnp.float32(1.0)
    x = stream(x, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = stream(x, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    xla = 2 * nbytes / statistics.median(times)
    return {"numpy_memcpy_GBps": memcpy / 1e9, "xla_stream_GBps": xla / 1e9, "bytes": nbytes}


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def compare(
    alias: str,
    tree_name: str,
    params: PyTree,
    grads: PyTree,
    groups: Any,
    steps: int,
    warmup: int,
    copy_GBps: float,
    baselines: dict[str, Stepper],
) -> dict | None:
    """Times ``alias`` against its baseline, interleaved; ``baselines`` caches the compiled
    baseline steppers of this tree (one compilation per baseline and tree)."""
    tx = build_alias(alias, groups)
    if tx is None:
        return None
    _, baseline_name, baseline = ALIASES[alias]
    a = Stepper(tx, params, grads)
    if baseline_name not in baselines:
        baselines[baseline_name] = Stepper(baseline(), params, grads)
    b = baselines[baseline_name]
    b.times = []
    for _ in range(warmup):
        a.run(record=False)
        b.run(record=False)
    for i in range(steps):  # interleaved; alternate who goes first
        first, second = (a, b) if i % 2 == 0 else (b, a)
        first.run()
        second.run()
    ta, tb = statistics.median(a.times), statistics.median(b.times)
    pair = [x / y for x, y in zip(a.times, b.times)]
    q1, q2, q3 = quantiles(pair)
    return {
        "tree": tree_name,
        "alias": alias,
        "baseline": baseline_name,
        "time_ratio": ta / tb,
        "pair_ratio_quartiles": [q1, q2, q3],
        "alias_ms": 1e3 * ta,
        "baseline_ms": 1e3 * tb,
        "alias_ms_quartiles": [1e3 * q for q in quantiles(a.times)],
        "baseline_ms_quartiles": [1e3 * q for q in quantiles(b.times)],
        "state_bytes_ratio": _ratio(a.state_bytes, b.state_bytes),
        "alias_state_bytes": a.state_bytes,
        "baseline_state_bytes": b.state_bytes,
        "alias_compile_s": a.compile_s,
        "baseline_compile_s": b.compile_s,
        "alias_kernels": a.kernels,
        "baseline_kernels": b.kernels,
        "alias_min_bytes": a.min_bytes,
        "baseline_min_bytes": b.min_bytes,
        "alias_GBps": a.min_bytes / ta / 1e9,
        "baseline_GBps": b.min_bytes / tb / 1e9,
        "alias_bandwidth_fraction": a.min_bytes / ta / 1e9 / copy_GBps,
        "baseline_bandwidth_fraction": b.min_bytes / tb / 1e9 / copy_GBps,
        # the floor: the minimum bytes at the measured streaming bandwidth
        "alias_over_floor": ta / (a.min_bytes / (copy_GBps * 1e9)),
        "baseline_over_floor": tb / (b.min_bytes / (copy_GBps * 1e9)),
        "alias_xla_bytes": a.xla_bytes,
        "baseline_xla_bytes": b.xla_bytes,
        "finite": a.finite() and b.finite(),
        "steps": steps,
    }


def _ratio(a: int, b: int) -> float | None:
    """a / b; 1 when both are 0 (two stateless optimizers); None when only b is 0."""
    if b == 0:
        return 1.0 if a == 0 else None
    return a / b


def _fmt(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


# Targets on ResNet-18 (float32, CPU): step-time ratio and state-bytes ratio upper bounds.
TARGETS = {
    "adam_s": (1.0, 0.55),
    "adam_st": (1.2, 0.55),
    "adam_srt": (1.2, 0.55),
    "adamg": (2.0, 0.55),
    "adamp": (2.0, 1.05),
    "rv_adamw": (2.0, 1.05),
    "rv_sgdm": (2.0, 1.05),
    "rv_lion": (2.0, 1.05),
    "sgdp": (2.0, 1.05),
    "sgdg": (2.5, 1.05),
    "psi_sgdm": (1.3, 1.05),
}


def target_check(row: dict) -> str:
    if row["tree"] != "resnet18" or row["alias"] not in TARGETS:
        return ""
    t_max, s_max = TARGETS[row["alias"]]
    ok = (t_max is None or row["time_ratio"] <= t_max) and (
        s_max is None or row["state_bytes_ratio"] <= s_max
    )
    bounds = ", ".join(f"{k}<={v}" for k, v in (("time", t_max), ("state", s_max)) if v is not None)
    return f"{'ok' if ok else 'MISSED'} ({bounds})"


def table(rows: list[dict]) -> str:
    head = (
        f"{'tree':<12}{'alias':<10}{'baseline':<30}{'time':>7}{'IQR of A/B':>14}"
        f"{'A ms':>9}{'B ms':>9}{'state':>7}{'A/floor':>8}{'B/floor':>8}{'A cmp s':>8}"
        f"{'B cmp s':>8}{'A krn':>6}{'B krn':>6}  target"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        q1, _, q3 = r["pair_ratio_quartiles"]
        lines.append(
            f"{r['tree']:<12}{r['alias']:<10}{r['baseline']:<30}{r['time_ratio']:>7.3f}"
            f"{f'{q1:.2f}-{q3:.2f}':>14}{r['alias_ms']:>9.3f}{r['baseline_ms']:>9.3f}"
            f"{_fmt(r['state_bytes_ratio']):>7}{r['alias_over_floor']:>8.2f}"
            f"{r['baseline_over_floor']:>8.2f}"
            f"{r['alias_compile_s']:>8.2f}{r['baseline_compile_s']:>8.2f}"
            f"{r['alias_kernels']:>6}{r['baseline_kernels']:>6}  {target_check(r)}"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The main columns as a Markdown table."""
    lines = [
        "| tree | alias | baseline | time ratio | IQR of A/B | ms (alias / baseline) "
        "| state ratio | time over floor (alias / baseline) | XLA kernels (alias / baseline) "
        "| compile s (alias / baseline) | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q1, _, q3 = r["pair_ratio_quartiles"]
        lines.append(
            f"| {r['tree']} | `{r['alias']}` | `{r['baseline']}` | {r['time_ratio']:.3f} "
            f"| {q1:.2f}-{q3:.2f} | {r['alias_ms']:.2f} / {r['baseline_ms']:.2f} "
            f"| {_fmt(r['state_bytes_ratio'])} "
            f"| {r.get('alias_over_floor', float('nan')):.1f} / "
            f"{r.get('baseline_over_floor', float('nan')):.1f} "
            f"| {r['alias_kernels']} / {r['baseline_kernels']} "
            f"| {r['alias_compile_s']:.1f} / {r['baseline_compile_s']:.1f} | {target_check(r)} |"
        )
    return "\n".join(lines)


def default_steps(tree: str, quick: bool) -> tuple[int, int]:
    if quick:
        return 5, 2
    return {"resnet18": (100, 10), "transformer": (80, 10), "many_small": (100, 20)}[tree]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
    parser.add_argument("--aliases", nargs="+", default=list(ALIASES), choices=list(ALIASES))
    parser.add_argument("--steps", type=int, help="timed A/B pairs per alias and tree")
    parser.add_argument("--warmup", type=int, help="untimed A/B pairs before timing")
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke run")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="print the table of a saved run and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        saved = json.loads(args.markdown.read_text())
        print(markdown_table(saved["rows"]))
        return saved

    env = environment()
    print(f"malloc: {env['malloc_settings']}; load average: {env['load_average_1_5_15_min']}")
    copy = measure_copy_bandwidth(repeats=3 if args.quick else 15)
    copy_GBps = copy["xla_stream_GBps"]
    print(
        f"memory copy bandwidth: numpy memcpy {copy['numpy_memcpy_GBps']:.2f} GB/s, "
        f"XLA stream {copy['xla_stream_GBps']:.2f} GB/s (read + write, 256 MiB)",
        flush=True,
    )
    rows, skipped = [], []
    failed: dict[str, str] = {}
    trees_info = {}
    for tree_name in args.trees:
        shapes, groups = TREES[tree_name]
        params = make_tree(shapes(), seed=0, scale=0.05)
        grads = make_tree(shapes(), seed=1, scale=1e-3)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        trees_info[tree_name] = {
            "parameters": int(n_params),
            "leaves": len(jax.tree.leaves(params)),
            "bytes": tree_bytes(params),
        }
        print(
            f"\n{tree_name}: {n_params:,} parameters in {len(jax.tree.leaves(params))} leaves",
            flush=True,
        )
        steps, warmup = default_steps(tree_name, args.quick)
        steps = args.steps or steps
        warmup = args.warmup if args.warmup is not None else warmup
        baselines: dict[str, Stepper] = {}
        for alias in args.aliases:
            try:
                row = compare(
                    alias, tree_name, params, grads, groups, steps, warmup, copy_GBps, baselines
                )
            except Exception as err:  # report and go on: one alias must not stop the run
                failed[f"{tree_name}/{alias}"] = f"{type(err).__name__}: {err}"
                print(f"  {alias:<10} FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            if row is None:
                skipped.append(alias)
                continue
            rows.append(row)
            print(
                f"  {alias:<10} {row['time_ratio']:.3f}x {row['baseline']} "
                f"({row['alias_ms']:.2f} ms vs {row['baseline_ms']:.2f} ms; "
                f"{row['alias_over_floor']:.1f}x vs {row['baseline_over_floor']:.1f}x the floor), "
                f"state {_fmt(row['state_bytes_ratio'])}  {target_check(row)}",
                flush=True,
            )
        del baselines
    skipped = sorted(set(skipped))
    print("\n" + table(rows))
    if skipped:
        print(f"\nnot in this version of optax_sphere (skipped): {', '.join(skipped)}")
    for key, err in failed.items():
        print(f"failed: {key}: {err}")
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "optax": optax.__version__,
            "optax_sphere": optax_sphere.__version__,
        },
        "command": "python benchmarks/bench.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "copy_bandwidth": copy,
        "environment": {**env, "load_average_at_end": environment()["load_average_1_5_15_min"]},
        "trees": trees_info,
        "targets": {k: {"time": t, "state": s} for k, (t, s) in TARGETS.items()},
        "rows": rows,
        "skipped": skipped,
        "failed": failed,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
