"""Two JAX processes with 4 CPU devices each, one mesh: every alias equals the single-process
run, and an orbax checkpoint written and restored by both processes resumes bit for bit
(``multihost_worker.py`` says how). The processes talk over localhost with gloo collectives,
as the hosts of a cluster would over the network."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(command: list[str], processes: int, timeout: int) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, *[c.format(i=i) for c in command]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(processes)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    return outputs


def test_two_processes_equal_one_and_resume_from_orbax(tmp_path):
    from test_sharding import ALIASES

    coordinator = f"localhost:{_free_port()}"
    command = [os.path.join(HERE, "multihost_worker.py"), coordinator, "2", "{i}", str(tmp_path)]
    outputs = _launch(command, 2, timeout=900)
    for out in outputs:
        assert [line for line in out.splitlines() if line.startswith("ok ")] == [
            f"ok {name}" for name in sorted(ALIASES)
        ], out[-4000:]


def test_the_example_launcher_runs_two_processes(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "multihost_training.py"),
            "--local-processes",
            "2",
            "--steps",
            "4",
            "--checkpoint-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # both processes trained the same model: the same loss, reported by each
    finals = dict(re.findall(r"process (\d+): final loss ([-\d.]+)", out.stdout))
    assert sorted(finals) == ["0", "1"] and finals["0"] == finals["1"], out.stdout[-3000:]
    resumed = re.findall(r"process (\d+): resumed from step 2: identical", out.stdout)
    assert sorted(resumed) == ["0", "1"], out.stdout[-3000:]
