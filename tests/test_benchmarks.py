"""The benchmark scripts run: ``benchmarks/peers.py``'s JAX side and its table.

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
