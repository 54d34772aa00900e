"""Every optimizer of optax_sphere against the optax baselines, on MNIST-1D, in Flax.

    python examples/compare.py --out results            # about 10 min on 2 CPU cores
    python examples/compare.py --out results --quick    # smoke test, about a minute
    python examples/compare.py --out results --full     # wider grid, more seeds (hours)

MNIST-1D (Greydanus & Kalai 2024; the ``mnist1d`` package generates it locally with its
default arguments, no download) is 4000 training and 1000 test signals of length 40; the last
400 training signals are held out as the validation split. The model is a 1-D CNN whose three
convolutions are each followed by BatchNorm, so every convolution filter is radially
invariant; the classifier head is not (it gets each method's base optimizer, as in Roburin et al.).

The papers' protocol, in small (Roburin et al. app. E.1): for each optimizer, start from its best
published hyperparameters for ResNet-20 on CIFAR-10 (``optax_sphere.presets``), search the
learning rate over a short grid around it (default: x 1/3, 1, 3, 10, 30) with the other
hyperparameters fixed, train (default: 30 epochs of 28 steps, batch 128) with the
fixed-frequency step decay (x0.1 at 1/3, 5/9, 7/9 of training), pick the learning rate with
the best mean final validation accuracy over the seeds (default: 3), and report the test
accuracy at that learning rate as mean +- standard deviation over seeds. Seed ``s`` gives the
same initialisation and data order to every optimizer and learning rate.

Writes into ``--out``: ``results.json`` (every run: hyperparameters, final train loss,
validation and test accuracy, seconds, curves), ``curves.png`` (test accuracy and train loss
over epochs at the selected learning rates) and ``angular_updates.png`` (mean angular update
per step of each convolution, Kosson et al. fig. 4).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import optax_sphere  # noqa: E402
from optax_sphere import presets  # noqa: E402

BASELINES = ("sgdm", "adam", "adamw")
OURS = (
    "adam_s",
    "adam_st",
    "adam_srt",
    "sgdm_rt",
    "adamg",
    "psi_sgdm",
    "rv_adamw",
    "rv_sgdm",
    "adamp",
)
LABELS = {
    "sgdm": "optax.sgd(momentum) + L2",
    "adam": "optax.adam + L2",
    "adamw": "optax.adamw",
}
# Starting points without a preset: (hyperparameters, where they come from).
OTHER_STARTS: dict[str, tuple[dict[str, Any], str]] = {
    "psi_sgdm": ({"learning_rate": 0.1, "momentum": 0.9}, "Yi et al. sec. 6: lr 0.1"),
    "adamp": (
        dict(presets.get("roburin2022/cifar10_resnet20/adamw").hyperparams),
        "AdamW's row of Roburin et al. table 4 (AdamP is not in the papers)",
    ),
}
PRESET_OF = {
    "rv_adamw": "kosson2024/cifar10_resnet20/rv_adamw",
    "rv_sgdm": "kosson2024/cifar10_resnet20/rv_sgdm",
}


def candidates(
    only: list[str] | None, groups: Any
) -> tuple[list[_common.Candidate], dict[str, str]]:
    """The optimizers to compare (this library's with ``groups``), and why any was skipped."""
    out, skipped = [], {}
    for name in BASELINES + OURS:
        if only and name not in only:
            continue
        if name in OTHER_STARTS:
            hp, source = OTHER_STARTS[name]
            alias = _common.lookup(name)
            if alias is None:
                skipped[name] = f"optax_sphere has no `{name}` yet"
                continue
            make = lambda alias=alias, **kw: alias(groups=groups, **kw)
        else:
            preset = presets.get(PRESET_OF.get(name, f"roburin2022/cifar10_resnet20/{name}"))
            if not preset.available:
                _common.lookup(name)  # prints the message
                skipped[name] = f"optax_sphere has no `{name}` yet"
                continue
            hp, source = dict(preset.hyperparams), f"preset {preset.name} ({preset.source})"
            extra = {} if name in BASELINES else {"groups": groups}
            make = lambda preset=preset, extra=extra, **kw: preset.build(**kw, **extra)
        out.append(_common.Candidate(name, LABELS.get(name, name), hp, source, make))
    return out, skipped


# ------------------------------------------------------------------------------ data, model
def load_mnist1d(validation: int = 400) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST-1D generated locally with the package's default arguments (seed 42)."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()  # noqa: NPY002 (make_dataset seeds the global generator)
    data = make_dataset(get_dataset_args())
    np.random.set_state(state)  # noqa: NPY002
    x = data["x"].astype(np.float32)[..., None]
    y = data["y"].astype(np.int32)
    x_test = data["x_test"].astype(np.float32)[..., None]
    y_test = data["y_test"].astype(np.int32)
    return {
        "train": (x[:-validation], y[:-validation]),
        "val": (x[-validation:], y[-validation:]),
        "test": (x_test, y_test),
    }


class CNN1D(nn.Module):
    """MNIST-1D's CNN baseline with BatchNorm after every convolution."""

    width: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for kernel in (5, 3, 3):
            x = nn.Conv(self.width, (kernel,), strides=(2,), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def classification_task(model: nn.Module, example: jax.Array) -> _common.Task:
    """The task of training ``model`` on labelled batches; its groups are found on the model
    with :func:`optax_sphere.find_groups` on the ``example`` batch (BatchNorm in training
    mode), at a fixed initialisation."""

    def init(key):
        variables = model.init(key, example, train=False)
        return variables["params"], variables.get("batch_stats", {})

    def loss(params, stats, batch, key):
        x, y = batch
        logits, new = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        value = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return value, new["batch_stats"]

    def evaluate(params, stats, batch):
        x, y = batch
        logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
        return {"accuracy": jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32)}

    variables = model.init(jax.random.key(0), example, train=False)
    groups = optax_sphere.find_groups(model, variables, example, train=True)
    return _common.Task(init, loss, evaluate, groups=groups)


# ---------------------------------------------------------------------------------- protocol
SETTINGS = {
    # name: (epochs, seeds, learning-rate factors around the published value)
    "quick": (2, 1, (1.0, 3.0)),
    "default": (30, 3, (1 / 3, 1.0, 3.0, 10.0, 30.0)),
    "full": (60, 5, (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)),
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    setting = "quick" if args.quick else "full" if args.full else "default"
    epochs, n_seeds, factors = SETTINGS[setting]
    epochs = args.epochs or epochs
    n_seeds = args.seeds or n_seeds
    seeds = list(range(n_seeds))
    data = load_mnist1d()
    task = classification_task(CNN1D(), jnp.asarray(data["train"][0][:64]))
    print("radially invariant groups, found on the model (optax_sphere.find_groups):")
    print(task.groups, end="\n\n")
    chosen, skipped = candidates(args.only.split(",") if args.only else None, task.groups)
    batch_size = 128

    results: dict[str, Any] = {
        "benchmark": "MNIST-1D (mnist1d package, generated locally with default arguments)",
        "model": "1-D CNN, 3 x (conv, BatchNorm, ReLU), width 32, dense head",
        "protocol": {
            "setting": setting,
            "epochs": epochs,
            "batch_size": batch_size,
            "seeds": seeds,
            "learning_rate_factors": list(factors),
            "schedule": "x0.1 at 1/3, 5/9 and 7/9 of training (Roburin et al. app. E.1)",
            "selection": "learning rate with the best mean final validation accuracy",
            "splits": {k: len(v[1]) for k, v in data.items()},
            "groups": {r.path: r.grouping for r in task.groups.reports},
            "seconds": "per run: wall time of the optimizer's vmapped batch / number of runs",
        },
        "environment": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": len(jax.devices()),
            "optax": optax.__version__,
            "optax_sphere": optax_sphere.__version__,
        },
        "skipped": skipped,
        "optimizers": {},
    }
    with tqdm(
        total=len(chosen) * epochs, desc="training", unit="epoch", disable=args.no_progress
    ) as progress:
        results["optimizers"], curves, angles = _common.run_all(
            task,
            chosen,
            data,
            factors=factors,
            seeds=seeds,
            progress=progress,
            epochs=epochs,
            batch_size=batch_size,
        )
    title = f"MNIST-1D, BatchNorm CNN, {len(seeds)} seed(s), selected learning rates"
    _common.write_outputs(args.out, results, curves, angles, title)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="output directory")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 seed, 2 learning rates, 2 epochs")
    mode.add_argument("--full", action="store_true", help="5 seeds, 7 learning rates, 60 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--only", default=None, help="comma-separated optimizer names")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(args)
    print(_common.format_table(results))
    print(f"\nwrote {args.out}/results.json and plots in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
