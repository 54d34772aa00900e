"""Step time of the authors' PyTorch optimizers against optax_sphere's, on the same shapes.

Each paper's own optimizer (its authors' PyTorch code) and torch's fused Adam and SGD run on
the parameter shapes of ResNet-18 (PyTorch layout, ``(out, ...)``), and each optax_sphere
alias (or optax optimizer) on the same shapes in Flax layout, grouped per output unit as the
authors' code groups them. Every optimizer runs in its own process, with the same number of
threads, so that none sees another's caches or thread pools. The reported ratio is the median
step time of the JAX side over the PyTorch side (below 1: optax_sphere is faster).

Needs torch (``pip install ".[peers]"``; the test suite never needs it) and clones of the
authors' repositories in one directory::

    git clone https://github.com/clovaai/AdamP CODE/AdamP
    git clone https://github.com/ymontmarin/adamsrt CODE/adamsrt
    git clone https://github.com/epfml/REQ CODE/REQ
    git clone https://github.com/MinhyungCho/riemannian-batch-normalization-pytorch CODE/cho_lee

    python benchmarks/peers.py --code CODE --out benchmarks/results/peers.json
    python benchmarks/peers.py --markdown benchmarks/results/peers.json

A peer whose clone is missing is listed as skipped. A *step* is ``optimizer.step()`` on the
PyTorch side (the gradients stay in ``.grad``) and the jitted ``update`` plus
``optax.apply_updates``, parameters and state donated, on the JAX side. The gradients are
tangent to each unit's sphere and scale as ``1 / ||x||``, as behind a BatchNorm; the step
times do not depend on their values.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: name -> (repository directory, file, class, how its parameter groups are built, keyword
#: arguments of the class, the optax_sphere alias or optax optimizer, its keyword arguments).
#: Hyperparameters are equal on both sides (the groups' learning rates of Cho & Lee's code).
PEERS: dict[str, dict[str, Any]] = {
    "AdamSRT (adamsrt)": dict(
        repo="adamsrt", file="adamsrt/optimizers/adam_srt.py", cls="AdamSRT",
        groups="channel_wise", kwargs=dict(lr=1e-3, weight_decay=1e-4),
        alias="adam_srt", alias_kwargs=dict(learning_rate=1e-3, weight_decay=1e-4),
    ),
    "SGDMRT (adamsrt)": dict(
        repo="adamsrt", file="adamsrt/optimizers/sgd_mrt.py", cls="SGDMRT",
        groups="channel_wise", kwargs=dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
        alias="sgdm_rt", alias_kwargs=dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-4),
    ),
    "AdamP (clovaai)": dict(
        repo="AdamP", file="adamp/adamp.py", cls="AdamP",
        groups="all", kwargs=dict(lr=1e-3, weight_decay=1e-4),
        alias="adamp", alias_kwargs=dict(learning_rate=1e-3, weight_decay=1e-4),
    ),
    "SGDP (clovaai)": dict(
        repo="AdamP", file="adamp/sgdp.py", cls="SGDP",
        groups="all", kwargs=dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
        alias="sgdp",
        alias_kwargs=dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    ),
    "RotationalWrapper AdamW (REQ)": dict(
        repo="REQ", file="shared/optimizers/rotational_wrapper.py", cls="RotationalWrapper",
        groups="rotational", kwargs=dict(inner_type="adamw", lr=1e-3, weight_decay=0.05),
        alias="rv_adamw", alias_kwargs=dict(learning_rate=1e-3, weight_decay=0.05),
    ),
    "SGDG (Cho & Lee)": dict(
        repo="cho_lee", file="grassmann_optimizer.py", cls="SGDG",
        groups="grassmann", kwargs=dict(lr=0.01, momentum=0.9),
        alias="sgdg", alias_kwargs=dict(learning_rate=0.2, ungrouped_learning_rate=0.01),
    ),
    "AdamG (Cho & Lee)": dict(
        repo="cho_lee", file="grassmann_optimizer.py", cls="AdamG",
        groups="grassmann", kwargs=dict(lr=0.01, momentum=0.9),
        alias="adamg", alias_kwargs=dict(learning_rate=0.05, ungrouped_learning_rate=0.01),
    ),
    "torch Adam (fused)": dict(
        repo=None, cls="Adam", groups="all", kwargs=dict(lr=1e-3, fused=True),
        alias="optax.adam", alias_kwargs=dict(learning_rate=1e-3),
    ),
    "torch SGD momentum (fused)": dict(
        repo=None, cls="SGD", groups="all", kwargs=dict(lr=0.1, momentum=0.9, fused=True),
        alias="optax.sgd", alias_kwargs=dict(learning_rate=0.1, momentum=0.9),
    ),
}  # fmt: skip

#: Cho & Lee's learning rate on the sphere (their code's ``lrg``) and AdamG's second moment
SPHERE_LR = {"SGDG": 0.2, "AdamG": 0.05}


def _shapes() -> dict:
    from optax_sphere.experiments.trees import resnet18_shapes

    return resnet18_shapes()


def _flat_shapes() -> list[tuple[str, tuple[int, ...]]]:
    import jax

    from optax_sphere import path_str

    leaves = jax.tree_util.tree_flatten_with_path(_shapes(), is_leaf=lambda x: isinstance(x, tuple))
    return [(path_str(p), tuple(s)) for p, s in leaves[0]]


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A Flax kernel ``(..., in, out)`` in PyTorch's ``(out, in, ...)`` layout."""
    if len(shape) < 2:
        return shape
    return (shape[-1], shape[-2], *shape[:-2])


# --------------------------------------------------------------------------------------------
# Workers: one optimizer each, in its own process.
# --------------------------------------------------------------------------------------------


def _median_ms(step, steps: int, warmup: int, sync=lambda: None) -> dict:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4)
    return {"ms": 1e3 * statistics.median(times), "ms_quartiles": [1e3 * t for t in q]}


def _torch_worker(peer: str, code: Path, steps: int, warmup: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    spec = PEERS[peer]
    if spec["repo"] is None:
        cls = getattr(torch.optim, spec["cls"])
    else:
        path = code / spec["repo"] / spec["file"]
        module_spec = importlib.util.spec_from_file_location(f"peer_{spec['cls']}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        cls = getattr(module, spec["cls"])
    gen = torch.Generator().manual_seed(0)
    grouped, other = [], []
    for _, shape in _flat_shapes():
        shape = _torch_layout(shape)
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.05)
        a = torch.randn(shape, generator=gen)
        if len(shape) >= 2:  # tangent per unit, scaled as 1 / ||x||
            x = p.detach().reshape(shape[0], -1)
            n = x.norm(dim=1, keepdim=True)
            u = x / n
            a2 = a.reshape(shape[0], -1)
            a = ((a2 - (a2 * u).sum(1, keepdim=True) * u) / n).reshape(shape)
            if spec["groups"] == "grassmann":  # Cho & Lee keep the units at norm 1
                p.data = (x / n).reshape(shape).clone()
            grouped.append(p)
        else:
            other.append(p)
        p.grad = a.contiguous()
    kind = spec["groups"]
    if kind == "channel_wise":
        param_groups = [{"params": grouped, "channel_wise": True}, {"params": other}]
    elif kind == "rotational":
        param_groups = [
            {"params": grouped, "rotational": True},
            {"params": other, "rotational": False, "weight_decay": 0.0},
        ]
    elif kind == "grassmann":
        param_groups = [
            {"params": grouped, "grassmann": True, "lr": SPHERE_LR[spec["cls"]]},
            {"params": other, "grassmann": False, "nesterov": True},
        ]
    else:
        param_groups = [{"params": grouped + other}]
    optimizer = cls(param_groups, **spec["kwargs"])
    out = _median_ms(optimizer.step, steps, warmup)
    finite = all(bool(torch.isfinite(p).all()) for g in param_groups for p in g["params"])
    return {**out, "torch": torch.__version__, "threads": threads, "finite": finite}


def _jax_worker(peer: str, steps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import optax_sphere
    from optax_sphere.experiments.trees import make_tree

    spec = PEERS[peer]
    params = make_tree(_shapes(), seed=0, scale=0.05)
    raw = make_tree(_shapes(), seed=1, scale=1.0)
    groups = optax_sphere.per_unit(params)

    def tangent(a, x, group):
        if group is None:
            return a
        return optax_sphere.geometry.tangent_part(a, x, group) / jnp.sqrt(
            optax_sphere.groups.group_sq_norm(x, group)
        )

    grp = optax_sphere.resolve_groups(groups, params)
    grads = jax.tree.map(tangent, raw, params, grp, is_leaf=lambda v: v is None)
    if spec["groups"] == "grassmann":  # unit norm per unit, as Cho & Lee's
        params = jax.tree.map(
            lambda x, g: x if g is None else optax_sphere.geometry.project_to_sphere(x, g),
            params,
            grp,
            is_leaf=lambda v: v is None,
        )
    name = spec["alias"]
    if name.startswith("optax."):
        tx = getattr(optax, name.removeprefix("optax."))(**spec["alias_kwargs"])
    else:
        tx = getattr(optax_sphere, name)(**spec["alias_kwargs"], groups=groups)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    box = {"params": params, "state": tx.init(params)}

    def run():
        box["params"], box["state"] = jitted(box["params"], box["state"], grads)

    out = _median_ms(run, steps, warmup, sync=lambda: jax.block_until_ready(box["params"]))
    finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(box["params"]))
    return {**out, "jax": jax.__version__, "finite": finite}


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def _run_worker(args: list[str], threads: int, repo: Path | None = None) -> dict:
    """Runs one worker; ``repo`` (the authors' clone) goes on its ``PYTHONPATH`` so that
    their own imports (``gutils``, ``shared.optimizers``) resolve."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if repo is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| PyTorch optimizer | optax_sphere / optax | JAX / PyTorch | JAX ms | PyTorch ms |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "ratio" not in r:
            lines.append(f"| {r['peer']} | `{r['alias']}` | {r.get('skipped', 'failed')} | | |")
            continue
        lines.append(
            f"| {r['peer']} | `{r['alias']}` | {r['ratio']:.2f} | {r['jax_ms']:.1f} | "
            f"{r['torch_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, help="directory holding the authors' clones")
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path, help="print the table of a saved run")
    parser.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "torch":
        print(
            json.dumps(_torch_worker(args.peer, args.code, args.steps, args.warmup, args.threads))
        )
        return []
    if args.worker == "jax":
        print(json.dumps(_jax_worker(args.peer, args.steps, args.warmup)))
        return []
    if args.markdown:
        print(markdown_table(json.loads(args.markdown.read_text())["rows"]))
        return []
    if importlib.util.find_spec("torch") is None:
        parser.exit(1, 'torch is not installed: pip install ".[peers]"\n')

    from optax_sphere.experiments.environment import environment

    common = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    rows = []
    for peer in args.peers:
        spec = PEERS[peer]
        row = {"peer": peer, "alias": spec["alias"]}
        if spec["repo"] is not None and (
            args.code is None or not (args.code / spec["repo"] / spec["file"]).exists()
        ):
            row["skipped"] = f"no clone at CODE/{spec['repo']}"
            rows.append(row)
            print(f"{peer:32s} skipped ({row['skipped']})", flush=True)
            continue
        torch_args = ["--worker", "torch", "--peer", peer, "--threads", str(args.threads)]
        if args.code is not None:
            torch_args += ["--code", str(args.code)]
        repo = None if spec["repo"] is None else args.code / spec["repo"]
        torch_out = _run_worker(torch_args + common, args.threads, repo)
        jax_out = _run_worker(["--worker", "jax", "--peer", peer, *common], args.threads)
        row.update(torch=torch_out, jax=jax_out)
        if "ms" in torch_out and "ms" in jax_out:
            row.update(
                ratio=jax_out["ms"] / torch_out["ms"],
                jax_ms=jax_out["ms"],
                torch_ms=torch_out["ms"],
            )
            print(
                f"{peer:32s} {spec['alias']:11s} {row['ratio']:.2f}x "
                f"({jax_out['ms']:.1f} ms vs {torch_out['ms']:.1f} ms)",
                flush=True,
            )
        else:
            print(f"{peer:32s} failed: {torch_out.get('error') or jax_out.get('error')}")
        rows.append(row)
    print()
    print(markdown_table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"environment": environment(), "threads": args.threads, "rows": rows}
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
