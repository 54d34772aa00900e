"""Compile time of each alias's train step against its optax baseline, split into tracing and
lowering (Python, JAX) and XLA's compilation.

A step is ``bench.py``'s: ``tx.update`` + ``optax.apply_updates`` under ``jax.jit`` with the
parameters and the state donated. Each measurement builds a new ``jax.jit`` of a new step
function, so nothing is reused from an earlier one (JAX's in-memory caches are keyed on the
function), and the alias and its baseline alternate (A, B, A, B, ...) so that both see the
same machine load. Reported: the median over ``--repeats`` of each part, in seconds.

    python benchmarks/compile_time.py                          # many_small, every alias
    python benchmarks/compile_time.py --trees many_small transformer --repeats 5
    python benchmarks/compile_time.py --aliases rv_adamw sgdg --out compile.json

To compare two versions of the library, run it with each on ``PYTHONPATH`` (a checkout of
each), alternately, and compare the ``alias`` columns: see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the trees, aliases and baselines of the step-time benchmark)

from optax_sphere.experiments.environment import environment  # noqa: E402
from optax_sphere.experiments.trees import make_tree  # noqa: E402


def compile_seconds(tx: optax.GradientTransformation, params: Any, grads: Any) -> dict:
    """Seconds to trace and lower, and to compile, one new jitted step of ``tx``."""
    state = tx.init(params)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {
        "lower_s": t1 - t0,
        "xla_s": t2 - t1,
        "total_s": t2 - t0,
        "kernels": bench.count_kernels(compiled.as_text()),
    }


def measure(alias: str, tree: str, repeats: int) -> dict | None:
    """The medians of ``repeats`` alternating measurements of ``alias`` and its baseline."""
    shapes, groups = bench.TREES[tree]
    params = make_tree(shapes(), 0, 0.1)
    grads = make_tree(shapes(), 1, 0.01)
    if bench.build_alias(alias, groups) is None:
        return None
    _, baseline_name, baseline = bench.ALIASES[alias]
    runs: dict[str, list[dict]] = {"alias": [], "baseline": []}
    for _ in range(repeats):
        runs["alias"].append(compile_seconds(bench.build_alias(alias, groups), params, grads))
        runs["baseline"].append(compile_seconds(baseline(), params, grads))
    row: dict[str, Any] = {"tree": tree, "alias": alias, "baseline": baseline_name}
    for side, rs in runs.items():
        for part in ("lower_s", "xla_s", "total_s"):
            row[f"{side}_{part}"] = statistics.median(r[part] for r in rs)
        row[f"{side}_kernels"] = rs[0]["kernels"]
    return row


def table(rows: list[dict]) -> str:
    head = (
        f"{'tree':<12}{'alias':<10}{'A lower':>9}{'A xla':>8}{'A total':>9}"
        f"{'B lower':>9}{'B xla':>8}{'B total':>9}{'A/B':>7}{'A krn':>7}{'B krn':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['tree']:<12}{r['alias']:<10}{r['alias_lower_s']:>9.2f}{r['alias_xla_s']:>8.2f}"
            f"{r['alias_total_s']:>9.2f}{r['baseline_lower_s']:>9.2f}"
            f"{r['baseline_xla_s']:>8.2f}{r['baseline_total_s']:>9.2f}"
            f"{r['alias_total_s'] / r['baseline_total_s']:>7.2f}"
            f"{r['alias_kernels']:>7}{r['baseline_kernels']:>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", default=["many_small"], choices=list(bench.TREES))
    parser.add_argument(
        "--aliases", nargs="+", default=list(bench.ALIASES), choices=list(bench.ALIASES)
    )
    parser.add_argument("--repeats", type=int, default=3, help="measurements per side")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    rows, skipped = [], []
    for tree in args.trees:
        for alias in args.aliases:
            row = measure(alias, tree, args.repeats)
            if row is None:
                skipped.append(alias)
                continue
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    if skipped:
        print(f"skipped (not in this version): {sorted(set(skipped))}")
    result = {"environment": environment(), "repeats": args.repeats, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
