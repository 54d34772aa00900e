"""Every example runs in ``--quick`` mode and writes its outputs (run as a user would)."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _run(script: str, *args: str, timeout: int = 600) -> str:
    """``script``: a file of ``examples/``, or ``-m module``."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user has
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    command = script.split() if script.startswith("-m ") else [os.path.join(EXAMPLES, script)]
    proc = subprocess.run(
        [sys.executable, *command, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _check_results(path: str, splits=("val", "test"), metric="accuracy") -> dict:
    with open(path) as f:
        results = json.load(f)
    assert results["optimizers"]
    protocol = results["protocol"]
    for name, entry in results["optimizers"].items():
        assert entry["selected_learning_rate"] in entry["learning_rate_grid"], name
        selected = [r for r in entry["runs"] if r["selected"]]
        # every seed ran at the selected learning rate, once
        assert sorted(r["seed"] for r in selected) == list(range(protocol["seeds"])), name
        searched = {r["learning_rate"] for r in entry["runs"]}
        assert searched == set(entry["learning_rate_grid"]), name
        for run in entry["runs"]:
            assert run["seconds"] > 0 and run["diverged_epoch"] is None
            assert isinstance(run["final_train_loss"], float) and run["final_train_loss"] > 0
            for split in splits:
                value = run[f"{split}_{metric}"]
                if metric == "accuracy":
                    assert 0.0 <= value <= 1.0
            assert len(run["curves"]["train_loss"]) == protocol["epochs"]
        summary = entry["summary"]
        values = [r[f"test_{metric}"] for r in sorted(selected, key=lambda r: r["seed"])]
        assert summary[f"test_{metric}_mean"] == pytest.approx(np.mean(values))
        if entry["base"] is not None and entry["base"] in results["optimizers"]:
            # the paired difference to the base, seed by seed
            base = results["optimizers"][entry["base"]]
            theirs = [
                r[f"test_{metric}"]
                for r in sorted(base["runs"], key=lambda r: r["seed"])
                if r["selected"]
            ]
            vs = entry["versus_base"]
            assert vs["n"] == len(values)
            assert vs["mean_difference"] == pytest.approx(np.mean(np.subtract(values, theirs)))
    return results


def test_compare_quick(tmp_path):
    out = tmp_path / "results"
    stdout = _run(
        "-m optax_sphere.experiments.compare", "--quick", "--out", str(out), "--no-progress"
    )
    results = _check_results(out / "results.json")
    assert set(results["optimizers"]) == {
        "sgdm", "adam", "adamw", "adam_s", "adam_st", "adam_srt", "adamg",
        "sgdm_rt", "psi_sgdm", "rv_sgdm", "rv_adamw", "adamp",
    }  # fmt: skip
    assert results["protocol"]["splits"] == {"train": 4000, "val": 1000, "test": 10000}
    # the main job prints the groups it found on the model, and records them
    assert "3 of 11 parameters grouped" in stdout
    assert results["protocol"]["groups"]["Dense_0/kernel"] is None
    assert results["protocol"]["groups"]["Conv_2/kernel"] == "unit"
    srt = results["optimizers"]["adam_srt"]
    assert srt["hyperparameters"]["weight_decay"] == pytest.approx(1e-3 / 128)
    assert srt["versus_base"]["base"] == "adam"
    assert srt["versus_base"]["verdict"] in ("better", "worse", "no detectable difference")
    # the three convolutions' angular updates were recorded and are positive
    assert len(srt["angular_updates"]) == 3
    assert all(v > 0 for curve in srt["angular_updates"].values() for v in curve)
    for png in ("curves.png", "angular_updates.png"):
        assert (out / png).stat().st_size > 10_000
    for entry in results["optimizers"].values():
        assert entry["label"] in stdout
    # each checked claim names its two optimizers and its verdict, also in the table
    claims = {(c["optimizer"], c["compared_with"]): c for c in results["claims"]}
    assert {("adam_srt", "adam"), ("adam_srt", "sgdm"), ("rv_adamw", "adamw")} <= set(claims)
    assert all(isinstance(c["reproduced"], bool) for c in claims.values())
    assert set(results["equilibrium_ratio"]) == {"adamw", "rv_adamw", "sgdm", "rv_sgdm"}
    assert "verdict" in stdout and "(base)" in stdout


def _tiny_cifar(path, n_per_batch=48, n_test=40):
    """The CIFAR-10 python archive format: pickled dicts with b"data" (N, 3072) uint8 in
    channel-major order and b"labels"."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
        images[:, 0] = (labels * 25)[:, None, None]  # learnable: the red channel is the class
        with open(os.path.join(path, name), "wb") as f:
            pickle.dump({b"data": images.reshape(n, -1), b"labels": labels.tolist()}, f)


def test_cifar10_resnet20_quick(tmp_path):
    data = tmp_path / "cifar-10-batches-py"
    _tiny_cifar(data)
    out = tmp_path / "results"
    _run("cifar10_resnet20.py", "--quick", "--data-dir", str(tmp_path), "--out", str(out))
    results = _check_results(out / "results.json")
    assert results["protocol"]["splits"]["test"] == 40
    assert (out / "curves.png").exists()


def test_char_transformer_quick(tmp_path):
    out = tmp_path / "results"
    _run("char_transformer.py", "--quick", "--out", str(out))
    results = _check_results(out / "results.json", metric="loss")
    assert "adamw" in results["optimizers"]
    for name in ("rv_adamw", "adamh", "muon"):  # each compared with AdamW seed by seed
        assert results["optimizers"][name]["versus_base"]["base"] == "adamw"
    assert (out / "curves.png").exists()


def test_nnx_example_quick(tmp_path):
    stdout = _run("nnx_example.py", "--quick")
    # the groups found on the nnx module: the three conv kernels per filter, not the head
    rows = {line.split()[0]: line for line in stdout.splitlines() if "/kernel" in line}
    assert all("per unit (out last)" in rows[f"convs/{i}/kernel"] for i in range(3))
    assert "not grouped" in rows["head/kernel"]
    accuracies = [
        float(line.split("test accuracy ")[1].split("%")[0])
        for line in stdout.splitlines()
        if "test accuracy" in line
    ]
    assert len(accuracies) == 2 and all(a > 20 for a in accuracies)  # chance: 10%
