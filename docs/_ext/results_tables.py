"""Results tables rendered from the JSON files the scripts write, at build time.

In a page::

    ```{results-table} compare
    ```

renders the table of the source ``compare`` (see :data:`SOURCES`: the JSON file, the command
that writes it, and the renderer). When the file does not exist yet, the page says which
command produces it instead of showing numbers. Nothing in a table is typed by hand.

Pages written elsewhere in the project that a checkout may not have yet (``OPTIONAL_PAGES``)
are dropped from the ``index`` toctree when their file is missing, so the build passes with
``-W`` either way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

OPTIONAL_PAGES = ("scaling", "reliability")


# ----------------------------------------------------------------------------- formatting
def fmt(value: Any) -> str:
    """A table cell: numbers with 4 significant digits, lists joined, markdown escaped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(fmt(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def records_table(records: list[dict[str, Any]]) -> str:
    """A table of a list of flat dicts, columns in order of first appearance."""
    header: list[str] = []
    for rec in records:
        header += [k for k in rec if k not in header]
    return markdown_table(header, [[rec.get(k) for k in header] for rec in records])


def generic(data: Any) -> str:
    """Any JSON of records: a list of dicts, a dict of dicts, or a dict holding such a list."""
    if isinstance(data, dict):
        for key in ("rows", "results", "records", "table"):
            if isinstance(data.get(key), list):
                return generic(data[key])
        if data and all(isinstance(v, dict) for v in data.values()):
            return records_table([{"name": k, **v} for k, v in data.items()])
        return records_table([data])
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return records_table(data)
    raise ValueError("expected a list of records or a dict of records")


def _pct(mean: Any, std: Any = None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def render_compare(data: dict[str, Any]) -> str:
    """The main job's ``results.json``: per family, the base optimizer first, then each
    optimizer with its paired difference to the base (95% interval) and the verdict; then the
    protocol and the environment it ran in."""
    rows = data["optimizers"]
    seeds = data["protocol"]["seeds"]
    table = []
    for family in dict.fromkeys(r["family"] for r in rows.values()):
        for name, r in rows.items():
            if r["family"] != family:
                continue
            s = r["summary"]
            test = _pct(s.get("test_accuracy_mean"), s.get("test_accuracy_std"))
            if s.get("diverged_seeds"):
                test += f" ({s['diverged_seeds']} diverged)"
            vs = r.get("versus_base")
            if vs is None:
                diff, verdict = ("base" if r.get("base") is None else ""), ""
            elif vs.get("low") is None:
                diff, verdict = f"{100 * vs['mean_difference']:+.2f}", vs["verdict"]
            else:
                diff = (
                    f"{100 * vs['mean_difference']:+.2f} "
                    f"[{100 * vs['low']:+.2f}, {100 * vs['high']:+.2f}]"
                )
                verdict = vs["verdict"]
            lr = r.get("selected_learning_rate")
            table.append(
                [
                    family,
                    f"`{name}`" if r.get("label", name) == name else r["label"],
                    "diverged" if lr is None else lr,
                    s.get("train_loss_mean"),
                    test,
                    diff,
                    verdict,
                ]
            )
    header = [
        "family",
        "optimizer",
        "learning rate",
        "final train loss",
        f"test accuracy % (mean ± std, {seeds} seeds)",
        "difference to the base, points [95% CI]",
        "verdict",
    ]
    out = [markdown_table(header, table), ""]
    proto, env = data.get("protocol", {}), data.get("environment", {})
    facts = [f"{data['benchmark']}; {data['model']}." if "benchmark" in data else ""]
    facts.append(
        ", ".join(f"{k}: {fmt(v)}" for k, v in proto.items() if not isinstance(v, dict)) + "."
    )
    facts.append("Environment: " + ", ".join(f"{k} {fmt(v)}" for k, v in env.items()) + ".")
    if "seconds" in data:
        facts.append(f"Wall time of the whole run: {data['seconds'] / 60:.1f} minutes.")
    out += [f for f in facts if f]
    return "\n\n".join(out)


def render_claims(data: dict[str, Any]) -> str:
    """The papers' claims beside the main job's paired comparisons (``results["claims"]``),
    then the measured angular update over Kosson et al.'s equilibrium prediction."""
    table = []
    for c in data.get("claims", []):
        if c.get("low") is None:
            measured = f"{100 * c['mean_difference']:+.2f}"
        else:
            measured = (
                f"{100 * c['mean_difference']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"
            )
        table.append(
            [
                c["claim"],
                c["source"],
                f"`{c['optimizer']}` − `{c['compared_with']}`",
                measured,
                c["verdict"],
                "yes" if c["reproduced"] else "**not at this scale**",
            ]
        )
    header = [
        "claim",
        "where",
        "test accuracy difference",
        "points, mean [95% CI] over paired seeds",
        "verdict",
        "reproduced",
    ]
    out = [markdown_table(header, table)]
    ratios = data.get("equilibrium_ratio", {})
    if ratios:
        rows = []
        for name, by_when in ratios.items():
            for when, layers in by_when.items():
                rows.append([f"`{name}`", when.replace("_", " ")] + list(layers.values()))
        layers = list(next(iter(next(iter(ratios.values())).values())))
        out.append(
            "Measured angular update per step over the equilibrium that Kosson et al. (table 1)"
            " predict at the same learning rate and weight decay, per convolution (1 is"
            " equilibrium):"
        )
        out.append(markdown_table(["optimizer", "when"] + layers, rows))
    return "\n\n".join(out)


def render_benchmarks(data: dict[str, Any]) -> str:
    """``benchmarks/bench.py``'s JSON: per tree, each alias against its optax baseline."""
    targets = data.get("targets", {})

    def verdict(row: dict[str, Any]) -> str:
        if row["tree"] != "resnet18":  # the targets are set on ResNet-18
            return ""
        target = targets.get(row["alias"]) or {}
        time_target, state_target = target.get("time"), target.get("state")
        parts = []
        if time_target is not None:
            ok = row["time_ratio"] <= time_target
            parts.append(f"time ≤ {time_target}: {'met' if ok else 'missed'}")
        if state_target is not None:
            ok = row["state_bytes_ratio"] <= state_target
            parts.append(f"state ≤ {state_target}: {'met' if ok else 'missed'}")
        return "; ".join(parts)

    out = []
    trees = data.get("trees", {})
    for tree in dict.fromkeys(r["tree"] for r in data["rows"]):
        info = trees.get(tree, {})
        title = f"**{tree}**"
        if info:
            title += f": {info.get('parameters', 0):,} parameters in {info.get('leaves')} leaves"
        rows = [
            [
                f"`{r['alias']}`",
                f"`{r['baseline']}`",
                f"{r['time_ratio']:.3f}",
                f"{r['alias_ms']:.3f} / {r['baseline_ms']:.3f}",
                "n/a" if r["state_bytes_ratio"] is None else f"{r['state_bytes_ratio']:.3f}",
                _pct(r.get("alias_bandwidth_fraction")),
                r.get("alias_compile_s"),
                verdict(r),
            ]
            for r in data["rows"]
            if r["tree"] == tree
        ]
        header = [
            "alias",
            "optax baseline",
            "time ratio",
            "ms per step (alias / baseline)",
            "state bytes ratio",
            "% of copy bandwidth",
            "compile s",
            "target",
        ]
        out += [title, markdown_table(header, rows)]
    machine, versions = data.get("machine", {}), data.get("versions", {})
    if machine or versions:
        out.append(
            "Measured "
            + (f"on {data['date_utc']} UTC " if "date_utc" in data else "")
            + "on "
            + ", ".join(f"{k} {fmt(v)}" for k, v in machine.items() if k != "devices")
            + "; "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + "."
        )
    copy = data.get("copy_bandwidth") or {}
    if "numpy_memcpy_GBps" in copy:
        out.append(
            f"Memory-copy bandwidth of the machine: {copy['numpy_memcpy_GBps']:.2f} GB/s "
            f"(numpy), {copy.get('xla_stream_GBps', float('nan')):.2f} GB/s (XLA); the "
            "bandwidth column is the alias's minimum bytes moved per step over its step time, "
            "as a fraction of it."
        )
    if data.get("skipped"):
        out.append("Not measured (not in this version of the library): " + fmt(data["skipped"]))
    if data.get("command"):
        out.append(f"The run that wrote this file: `{data['command']}`.")
    return "\n\n".join(out)


def render_peers(data: dict[str, Any]) -> str:
    """``benchmarks/peers.py``'s JSON: each authors' PyTorch optimizer against its alias."""
    rows = []
    for r in data["rows"]:
        if "ratio" in r:
            rows.append(
                [r["peer"], f"`{r['alias']}`", f"{r['ratio']:.2f}", f"{r['jax_ms']:.1f}",
                 f"{r['torch_ms']:.1f}"]
            )  # fmt: skip
        else:
            rows.append([r["peer"], f"`{r['alias']}`", r.get("skipped", "failed"), "", ""])
    header = ["PyTorch optimizer", "JAX side", "JAX / PyTorch", "JAX ms", "PyTorch ms"]
    env = data.get("environment", {})
    out = [markdown_table(header, rows)]
    if env:
        out.append(
            f"Measured with {data.get('threads')} threads on {env.get('processor')} "
            f"({env.get('cpu_count')} cores), jax {env.get('jax')}, torch "
            f"{next((r['torch'].get('torch') for r in data['rows'] if 'torch' in r), '?')}."
        )
    return "\n\n".join(out)


def specific_or_generic(render: Callable[[Any], str]) -> Callable[[Any], str]:
    """``render``, or :func:`generic` when the JSON does not have the layout it expects."""

    def fn(data: Any) -> str:
        try:
            return render(data)
        except (KeyError, TypeError, AttributeError, ValueError):
            return generic(data)

    return fn


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    path: str  # relative to the repository root
    command: str  # what writes it
    render: Callable[[Any], str]


SOURCES: dict[str, Source] = {
    "compare": Source(
        "docs/results/compare/results.json",
        "python -m optax_sphere.experiments.compare --out docs/results/compare",
        specific_or_generic(render_compare),
    ),
    "claims": Source(
        "docs/results/compare/results.json",
        "python -m optax_sphere.experiments.compare --out docs/results/compare",
        specific_or_generic(render_claims),
    ),
    "benchmarks": Source(
        "benchmarks/results/cpu.json",
        "python benchmarks/bench.py --out benchmarks/results/cpu.json",
        specific_or_generic(render_benchmarks),
    ),
    "peers": Source(
        "benchmarks/results/peers.json",
        "python benchmarks/peers.py --code CODE --out benchmarks/results/peers.json",
        specific_or_generic(render_peers),
    ),
    "reliability": Source(
        "docs/results/reliability.json",
        "python scripts/reliability_report.py --out docs/results/reliability.json",
        generic,
    ),
}


def render_source(name: str, root: str) -> tuple[str, str | None]:
    """Markdown for source ``name`` and the absolute path it was read from (None if absent)."""
    src = SOURCES[name]
    path = os.path.join(root, src.path)
    if not os.path.exists(path):
        return (
            f"```{{note}}\nThis table is generated from `{src.path}`, which this checkout "
            f"does not have yet. It is written by:\n\n    {src.command}\n```\n",
            None,
        )
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    body = src.render(data)
    return f"{body}\n\nGenerated from `{src.path}`, written by `{src.command}`.\n", path


class ResultsTable(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        if name not in SOURCES:
            raise self.error(f"unknown results source {name!r}; known: {sorted(SOURCES)}")
        root = os.path.dirname(self.env.srcdir)
        text, path = render_source(name, root)
        if path is not None:
            self.env.note_dependency(path)
        container = nodes.container(classes=["results-table"])
        source = f"<results-table {name}>"
        content = StringList(text.splitlines(), source=source)
        nested_parse_with_titles(self.state, content, container)
        return [container]


def _drop_missing_pages(app, docname: str, source: list[str]) -> None:
    if docname != app.config.root_doc:
        return
    lines = source[0].splitlines(keepends=True)
    kept = []
    for line in lines:
        page = line.strip()
        if page in OPTIONAL_PAGES and not any(
            os.path.exists(os.path.join(app.srcdir, page + ext)) for ext in (".md", ".rst")
        ):
            continue
        kept.append(line)
    source[0] = "".join(kept)


def setup(app):
    app.add_directive("results-table", ResultsTable)
    app.connect("source-read", _drop_missing_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
