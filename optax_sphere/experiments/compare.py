"""The main job: every optimizer of optax_sphere against its optax base on MNIST-1D, in Flax.

    python -m optax_sphere.experiments.compare --out results          # ~13 min, 2 cores
    python -m optax_sphere.experiments.compare --out results --quick  # smoke run, ~1 min
    python -m optax_sphere.experiments.compare --out results --full   # more seeds (hours)

(``optax-sphere-compare`` is the same command.) MNIST-1D (Greydanus & Kalai 2024; the
``mnist1d`` package generates it locally, no download): signals of length 40, 4000 for training
as in the standard set (the last 400 are the validation split) and 10000 for testing (the
standard set has 1000: ten times more narrows each run's test accuracy to about +-0.14
points). The model is a 1-D CNN of three (convolution, BatchNorm, ReLU, max-pool) blocks, width
32, global average pooling and a dense classifier: every convolution filter is radially
invariant (the groups are found on the model by :func:`optax_sphere.find_groups`), the
classifier is not and gets each method's treatment of ungrouped parameters.

Protocol (:mod:`optax_sphere.experiments.harness`): each optimizer starts from its published
hyperparameters for ResNet-20 on CIFAR-10 (:mod:`optax_sphere.presets`: Roburin et al.'s rows,
Kosson et al.'s for the AdamW family; an optimizer that modifies a base without its own row
uses its base's, as Kosson et al. do; SGD-M's weight decay is 5e-4). Its learning rate is
searched by half-decades upwards from there (1, 3.16 and 10 times the start, extended past a
winning end up to 3 times) on 2 seeds by validation accuracy, then 8 seeds run at the selected
rate: 30 epochs of 31 steps of 128 with Roburin et al.'s step decay. Each optimizer is
compared seed by seed with its base (:mod:`optax_sphere.experiments.stats`): the Adam family
with ``optax.adam`` + L2, the SGD family with ``optax.sgd`` with momentum + L2, the AdamW
family with ``optax.adamw``.

Writes into ``--out``: ``results.json`` (the protocol, the environment, every run with its
curves, each optimizer's paired comparison), ``curves.png`` (test accuracy and training loss per
family) and ``angular_updates.png`` (angular update per step of each convolution, with Kosson et
al.'s equilibrium prediction where it applies).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sphere
from optax_sphere import presets, registry
from optax_sphere.experiments import harness, stats
from optax_sphere.experiments.environment import environment
from optax_sphere.theory import equilibrium

ADAM, SGD, ADAMW = "Adam + L2", "SGD with momentum + L2", "AdamW"
ROBURIN = "roburin2022/cifar10_resnet20/"
# AdamW's family starts from Kosson et al.'s AdamW row: the approach to the rotational
# equilibrium takes about 1 / (eta * lambda) steps, which its weight decay (1e-2) brings within
# this budget of 930 steps (the premise of the rotational variants); with Roburin et al.'s
# 1.25e-4 it would take about 100 times longer.
KOSSON = "kosson2024/cifar10_resnet20/"

# SGD-M's weight decay: 5e-4, the CIFAR ResNets' usual value (He et al. 2016), rather than
# Roburin et al.'s 2.5e-4.
SGDM_L2 = {"weight_decay": 5e-4}

# The rotational variants' weights off the rotational groups (BatchNorm scales and offsets,
# the head) run without weight decay, as REQ's 1-D parameters in the authors' runs.
RV_UNGROUPED = {"ungrouped_weight_decay": 0.0}

# name: (hyperparameters' source: a preset name or (values, where they are from), overrides of
# the preset's values). Each alias is compared with its base, the plain optimizer of its
# family (optax_sphere.registry: AdamP's decoupled decay puts it with AdamW).
OPTIMIZERS: dict[str, tuple[Any, ...]] = {
    "adam": (ROBURIN + "adam",),
    "adam_s": (ROBURIN + "adam_s",),
    "adam_st": (ROBURIN + "adam_st",),
    "adam_srt": (ROBURIN + "adam_srt",),
    "adamg": (ROBURIN + "adamg",),
    "sgdm": (ROBURIN + "sgdm", SGDM_L2),
    "sgdm_rt": (ROBURIN + "sgdm_rt",),
    "psi_sgdm": (({"learning_rate": 0.1, "momentum": 0.9}, "Yi et al. sec. 6"),),
    "rv_sgdm": (ROBURIN + "sgdm", SGDM_L2, RV_UNGROUPED),
    "adamw": (KOSSON + "adamw",),
    "rv_adamw": (KOSSON + "adamw", RV_UNGROUPED),
    "adamp": (KOSSON + "adamw",),
}
FAMILIES = {"adam": ADAM, "sgdm": SGD, "adamw": ADAMW}
LABELS = {
    "sgdm": "optax.sgd(momentum) + L2",
    "adam": "optax.adam + L2",
    "adamw": "optax.adamw",
}

# The papers' headline claims that this comparison can check: (claim, source, optimizer,
# compared with, what the paper reports: "better" or "matches").
CLAIMS = [
    ("Adam-SRT beats Adam", "Roburin et al. 2022, table 2", "adam_srt", "adam", "better"),
    (
        "Adam-SRT almost matches SGD-M",
        "Roburin et al. 2022, table 2",
        "adam_srt",
        "sgdm",
        "matches",
    ),
    ("Adam-S beats Adam", "Roburin et al. 2022, table 2", "adam_s", "adam", "better"),
    ("AdamG beats Adam", "Cho & Lee 2017; Roburin et al. 2022, table 2", "adamg", "adam", "better"),
    (
        "SGD-MRT is not a systematic gain over SGD-M",
        "Roburin et al. 2022, table 5",
        "sgdm_rt",
        "sgdm",
        "matches",
    ),
    (
        "RV-AdamW matches AdamW (zero-shot)",
        "Kosson et al. 2024, table 2",
        "rv_adamw",
        "adamw",
        "matches",
    ),
    (
        "RV-SGDM matches SGDM (zero-shot)",
        "Kosson et al. 2024, app. N",
        "rv_sgdm",
        "sgdm",
        "matches",
    ),
    ("PSI-SGDM beats SGD-M", "Yi, PSI manifold, table 1", "psi_sgdm", "sgdm", "better"),
    ("AdamP beats AdamW", "Heo et al. 2021", "adamp", "adamw", "better"),
]

SETTINGS = {
    "quick": harness.Protocol(
        epochs=2, batch_size=128, seeds=2, selection_seeds=1, exponents=(0,), extensions=0
    ),
    "default": harness.Protocol(
        epochs=30,
        batch_size=128,
        seeds=8,
        selection_seeds=2,
        exponents=(0, 1, 2),
        extensions=3,
    ),
    "full": harness.Protocol(
        epochs=60, batch_size=128, seeds=20, selection_seeds=3, exponents=(-2, -1, 0, 1, 2, 3)
    ),
}


def candidates(names: Sequence[str], groups: Any) -> list[harness.Candidate]:
    """The optimizers to compare; this library's get ``groups``."""
    out = []
    for name in names:
        source, *overrides = OPTIMIZERS[name]
        base = registry.ALIASES[name].family if name in registry.ALIASES else None
        family = FAMILIES[base or name]
        if isinstance(source, str):
            preset = presets.get(source)
            hp, where = dict(preset.hyperparams), f"preset {preset.name} ({preset.source})"
        else:
            (hp, where), preset = source, None
        for changes in overrides:
            hp.update(changes)
            where += ", with " + ", ".join(f"{k}={v}" for k, v in changes.items())
        if name in LABELS:  # an optax baseline: no groups
            make = preset.build
        elif preset is not None and preset.optimizer == name:
            make = lambda preset=preset, **kw: preset.build(groups=groups, **kw)
        else:  # the base's hyperparameters (zero-shot), or values from the paper's text
            if preset is not None:
                where = f"its base's {where}"
            alias = getattr(optax_sphere, name)
            make = lambda alias=alias, **kw: alias(groups=groups, **kw)
        out.append(harness.Candidate(name, LABELS.get(name, name), hp, where, make, base, family))
    return out


# ------------------------------------------------------------------------------ data, model
def load_mnist1d(
    train: int = 4000, validation: int = 1000, test: int = 10_000
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST-1D from the ``mnist1d`` package's generator with its default arguments (seed 42)
    except the number of samples: ``train`` signals for training (4000, the standard set's
    size), then ``validation`` and ``test`` more (the standard set has 1000 test signals:
    10000 narrow one run's test accuracy to a binomial standard error of about 0.14 points at
    98%)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = train + validation + test
    args.train_split = 1.0
    state = np.random.get_state()  # noqa: NPY002 (make_dataset seeds the global generator)
    data = make_dataset(args)
    np.random.set_state(state)  # noqa: NPY002
    x = data["x"].astype(np.float32)[..., None]
    y = data["y"].astype(np.int32)
    cuts = np.cumsum([train, validation])
    return {
        "train": (x[: cuts[0]], y[: cuts[0]]),
        "val": (x[cuts[0] : cuts[1]], y[cuts[0] : cuts[1]]),
        "test": (x[cuts[1] :], y[cuts[1] :]),
    }


class CNN1D(nn.Module):
    """Three (convolution, BatchNorm, ReLU, max-pool) blocks, global average pooling, dense."""

    width: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for kernel in (5, 3, 3):
            x = nn.Conv(self.width, (kernel,), padding="SAME", use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.max_pool(nn.relu(x), (2,), (2,))
        return nn.Dense(10)(x.mean(axis=1))


def classification_task(model: nn.Module, example: jax.Array) -> harness.Task:
    """Training ``model`` on labelled batches; its groups are found on the model with
    :func:`optax_sphere.find_groups` on the ``example`` batch (BatchNorm in training mode)."""

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
    return harness.Task(init, loss, evaluate, groups=groups)


def equilibrium_predictions(
    results: dict[str, Any], protocol: harness.Protocol, steps_per_epoch: int
) -> dict[str, list[float]]:
    """Kosson et al.'s equilibrium angular update per epoch (Table 1) at each epoch's
    learning rate, for the optimizers it describes: AdamW and SGD with momentum + L2, and
    their rotational variants (which enforce it)."""
    out = {}
    total = steps_per_epoch * protocol.epochs
    for name, r in results["optimizers"].items():
        kind = {"adamw": "adamw", "rv_adamw": "adamw", "sgdm": "sgdm", "rv_sgdm": "sgdm"}.get(name)
        hp = r["hyperparameters"]
        if kind is None or r["selected_learning_rate"] is None or not hp.get("weight_decay"):
            continue
        schedule = protocol.schedule(hp["learning_rate"], total)
        lrs = [
            float(schedule(e * steps_per_epoch + steps_per_epoch // 2))
            for e in range(protocol.epochs)
        ]
        kw = {"b1": hp.get("b1", 0.9)} if kind == "adamw" else {"momentum": hp.get("momentum", 0.9)}
        out[name] = [
            equilibrium(
                kind, learning_rate=lr, weight_decay=hp["weight_decay"], dim=1, **kw
            ).angular_update
            for lr in lrs
        ]
    return out


def transient(
    results: dict[str, Any], predictions: dict[str, list[float]], protocol: harness.Protocol
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Measured angular update over Kosson et al.'s equilibrium prediction, per layer, in the
    second epoch (the first one includes the rotational variants' recentring of the filters)
    and in the last epoch before the first learning-rate decay: 1 is equilibrium (Kosson et
    al. sec. 4: the rotational variants start there, the others converge to it)."""
    last = max(1, round(protocol.epochs / 3)) - 1
    out = {}
    for name, pred in predictions.items():
        ratios: dict[str, dict[str, float | None]] = {"epoch_2": {}, "before_first_decay": {}}
        for layer, values in results["optimizers"][name]["angular_updates"].items():
            for key, e in (("epoch_2", 1), ("before_first_decay", last)):
                ok = values[e] is not None and pred[e] > 0
                ratios[key][layer] = values[e] / pred[e] if ok else None
        out[name] = ratios
    return out


def check_claims(results: dict[str, Any], protocol: harness.Protocol) -> list[dict[str, Any]]:
    """Each of ``CLAIMS`` whose two optimizers ran: the paired comparison of their test
    accuracies, and whether it reproduces the claim ("better": the interval is above 0;
    "matches": it is not below 0)."""
    out = []
    rows = results["optimizers"]
    for claim, source, mine, theirs, kind in CLAIMS:
        if mine not in rows or theirs not in rows:
            continue
        key = f"test_{protocol.metric}"
        comparison = stats.paired_comparison(
            harness.selected_values(rows[mine], key), harness.selected_values(rows[theirs], key)
        )
        if kind == "better":
            reproduced = comparison.verdict == stats.BETTER
        else:
            reproduced = comparison.verdict in (stats.BETTER, stats.NO_DIFFERENCE)
        out.append(
            {
                "claim": claim,
                "source": source,
                "optimizer": mine,
                "compared_with": theirs,
                "paper": kind,
                **comparison.as_dict(),
                "reproduced": reproduced,
            }
        )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    setting = "quick" if args.quick else "full" if args.full else "default"
    protocol = SETTINGS[setting]
    if args.epochs or args.seeds:
        import dataclasses

        protocol = dataclasses.replace(
            protocol,
            epochs=args.epochs or protocol.epochs,
            seeds=args.seeds or protocol.seeds,
            selection_seeds=min(protocol.selection_seeds, args.seeds or protocol.seeds),
        )
    data = load_mnist1d()
    task = classification_task(CNN1D(), jnp.asarray(data["train"][0][:64]))
    print("radially invariant groups, found on the model (optax_sphere.find_groups):")
    print(task.groups, end="\n\n")
    names = [n for n in OPTIMIZERS if not args.only or n in args.only.split(",")]
    chosen = candidates(names, task.groups)
    steps_per_epoch = len(data["train"][1]) // protocol.batch_size
    results: dict[str, Any] = {
        "benchmark": "MNIST-1D (mnist1d package's generator, default arguments, 14000 samples)",
        "model": "1-D CNN, 3 x (conv, BatchNorm, ReLU, max-pool), width 32, mean pool, dense",
        "command": "python -m optax_sphere.experiments.compare"
        + {"quick": " --quick", "full": " --full", "default": ""}[setting],
        "protocol": {
            "setting": setting,
            "epochs": protocol.epochs,
            "batch_size": protocol.batch_size,
            "steps_per_epoch": steps_per_epoch,
            "seeds": protocol.seeds,
            "selection_seeds": protocol.selection_seeds,
            "learning_rate_grid": "start x 10^(k/2), k in "
            f"{list(protocol.exponents)}, extended by one past a winning end at most "
            f"{protocol.extensions} times",
            "schedule": "x0.1 at 1/3, 5/9 and 7/9 of training (Roburin et al. app. E.1)",
            "selection": "learning rate with the best mean final validation accuracy; "
            "a diverged run disqualifies its learning rate",
            "comparison": "paired by seed with the base optimizer, Student's t 95% interval "
            "(scipy.stats.ttest_rel)",
            "splits": {k: len(v[1]) for k, v in data.items()},
            "groups": {r.path: r.grouping for r in task.groups.reports},
        },
        "environment": environment(),
        "optimizers": {},
    }
    per_run = protocol.epochs
    total = (
        len(chosen)
        * per_run
        * (
            len(protocol.exponents) * protocol.selection_seeds
            + protocol.seeds
            - protocol.selection_seeds
        )
    )
    start = time.perf_counter()
    with tqdm(total=total, desc="training", unit="epoch", disable=args.no_progress) as progress:
        results["optimizers"] = harness.compare(task, chosen, data, protocol, progress)
    results["claims"] = check_claims(results, protocol)
    predictions = equilibrium_predictions(results, protocol, steps_per_epoch)
    results["equilibrium_ratio"] = transient(results, predictions, protocol)
    results["seconds"] = time.perf_counter() - start
    harness.write_outputs(
        args.out,
        results,
        f"MNIST-1D, BatchNorm CNN, {protocol.seeds} seeds, selected learning rates",
        predictions,
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="output directory")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 seeds, 1 learning rate, 2 epochs")
    mode.add_argument("--full", action="store_true", help="20 seeds, 6 learning rates, 60 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--only", default=None, help="comma-separated optimizer names")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    results = run(args)
    print(harness.format_table(results))
    print(f"\nwrote {args.out}/results.json and plots in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
