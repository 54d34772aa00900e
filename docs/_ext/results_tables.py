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


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    path: str  # relative to the repository root
    command: str  # what writes it
    render: Callable[[Any], str]


SOURCES: dict[str, Source] = {
    "compare": Source(
        "docs/results/compare.json",
        "python examples/compare.py --out runs/compare && "
        "cp runs/compare/results.json docs/results/compare.json",
        generic,
    ),
    "benchmarks": Source(
        "benchmarks/results/cpu.json",
        "python benchmarks/run.py --json benchmarks/results/cpu.json",
        generic,
    ),
    "reliability": Source(
        "docs/results/reliability.json",
        "python -m pytest -q tests --reliability-json docs/results/reliability.json",
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
