"""The reliability table's script builds a row for every condition and every optimizer, each
naming a test of the suite that exists (the test run itself is the suite's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import alias_cases

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "reliability_report", ROOT / "scripts" / "reliability_report.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_condition_has_a_row_per_optimizer_naming_a_test_of_the_suite():
    script = _script()
    report = script.build_report({})  # no results: every row "not run"
    rows = report["rows"]
    names = {case.name for case in alias_cases.CASES}
    for cond in script.CONDITIONS:
        covered = {r["alias"] for r in rows if r["condition_id"] == cond.id}
        assert covered == names, cond.id
    for row in rows:
        assert row["status"] == "not run" and row["outcome"], row
        for node in [row["test"]] if isinstance(row["test"], str) else row["test"]:
            path, name = node.split("::", 1)
            source = (ROOT / path).read_text(encoding="utf-8")
            assert f"def {name.split('[')[0]}(" in source, node
    # a result marks its row
    node = rows[0]["test"] if isinstance(rows[0]["test"], str) else rows[0]["test"][0]
    marked = script.build_report({node: "failed"})["rows"][0]
    assert marked["status"] == "failed"
