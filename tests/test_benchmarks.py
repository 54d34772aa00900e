"""The benchmark scripts run: ``benchmarks/peers.py``'s JAX side and its table, and
``benchmarks/compile_time.py``.

Step times are not asserted (benchmarks are not timed tests); the PyTorch side needs torch and
the authors' clones, which the tests never install.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers.py"


@pytest.mark.parametrize("peer", ["SGDG (Cho & Lee)", "RotationalWrapper AdamW (REQ)"])
def test_peers_jax_worker_times_the_alias_on_the_resnet18_shapes(peer):
    out = subprocess.run(
        [sys.executable, str(PEERS), "--worker", "jax", "--peer", peer, "--steps", "2",
         "--warmup", "1"],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["finite"] is True
    assert record["ms"] > 0 and len(record["ms_quartiles"]) == 3


def test_peers_markdown_of_a_saved_run(tmp_path):
    saved = {
        "rows": [
            {"peer": "AdamP (clovaai)", "alias": "adamp", "ratio": 0.4, "jax_ms": 40.0,
             "torch_ms": 100.0},
            {"peer": "SGDMRT (adamsrt)", "alias": "sgdm_rt", "skipped": "no clone at CODE/adamsrt"},
        ]
    }  # fmt: skip
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(saved))
    out = subprocess.run(
        [sys.executable, str(PEERS), "--markdown", str(path)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert "| AdamP (clovaai) | `adamp` | 0.40 | 40.0 | 100.0 |" in out.stdout
    assert "no clone at CODE/adamsrt" in out.stdout


def test_compile_time_splits_lowering_from_xla_for_an_alias_and_its_base(tmp_path):
    out_path = tmp_path / "compile.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile_time.py"), "--aliases", "psi_sgd",
         "--repeats", "1", "--out", str(out_path)],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    (row,) = json.loads(out_path.read_text())["rows"]
    assert (row["tree"], row["alias"]) == ("many_small", "psi_sgd")
    for side in ("alias", "baseline"):
        assert row[f"{side}_lower_s"] > 0 and row[f"{side}_xla_s"] > 0
        assert row[f"{side}_total_s"] >= row[f"{side}_lower_s"] + row[f"{side}_xla_s"] - 1e-6
        assert row[f"{side}_kernels"] > 512  # one kernel or more per leaf of the 512
