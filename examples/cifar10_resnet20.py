"""ResNet-20 with BatchNorm on CIFAR-10, the papers' main benchmark, with the papers' presets.

    python examples/cifar10_resnet20.py --data-dir ~/data --out results_cifar
    python examples/cifar10_resnet20.py --data-dir ~/data --epochs 405 --seeds 5   # the paper
    python examples/cifar10_resnet20.py --data-dir DIR --quick                    # smoke test

Reads the standard CIFAR-10 python archive (``data_batch_1`` ... ``data_batch_5``,
``test_batch``; https://www.cs.toronto.edu/~kriz/cifar.html) from ``--data-dir`` or its
``cifar-10-batches-py`` folder; nothing is downloaded. The last 5000 training images are the
validation split. Every optimizer starts from its published hyperparameters for this very
benchmark (``optax_sphere.presets``: Roburin et al. tables 3-4, Kosson et al. table 4 for the
rotational variants), trains with Roburin et al.'s step decay (x0.1 at 1/3, 5/9, 7/9 of training)
and standard augmentation (4-pixel padded random crops, horizontal flips). The papers train
405 epochs (Roburin et al.) or 200 (Kosson et al.) on a GPU; the default here is a 30-epoch budget.
The protocol and outputs are the main job's (:mod:`optax_sphere.experiments.harness`):
``results.json``, ``curves.png``, ``angular_updates.png``, each optimizer compared seed by seed
with its base.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import optax_sphere
from optax_sphere import presets
from optax_sphere.experiments import harness
from optax_sphere.experiments.compare import classification_task

PRESET_NAMES = {
    "sgdm": "roburin2022/cifar10_resnet20/sgdm",
    "adam": "roburin2022/cifar10_resnet20/adam",
    "adamw": "roburin2022/cifar10_resnet20/adamw",
    "adamg": "roburin2022/cifar10_resnet20/adamg",
    "adam_s": "roburin2022/cifar10_resnet20/adam_s",
    "adam_st": "roburin2022/cifar10_resnet20/adam_st",
    "adam_srt": "roburin2022/cifar10_resnet20/adam_srt",
    "sgdm_rt": "roburin2022/cifar10_resnet20/sgdm_rt",
    "rv_sgdm": "kosson2024/cifar10_resnet20/rv_sgdm",
    "rv_adamw": "kosson2024/cifar10_resnet20/rv_adamw",
}
BASES = {
    "adam_s": "adam",
    "adam_st": "adam",
    "adam_srt": "adam",
    "adamg": "adam",
    "sgdm_rt": "sgdm",
    "rv_sgdm": "sgdm",
    "rv_adamw": "adamw",
}
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], np.float32)


def load_cifar10(data_dir: str, validation: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The python archive: pickles of {b"data": (N, 3072) uint8 (channel-major), b"labels"}."""
    folder = data_dir
    if not os.path.exists(os.path.join(folder, "test_batch")):
        folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.exists(os.path.join(folder, "test_batch")):
        raise SystemExit(
            f"no CIFAR-10 python archive in {data_dir!r}: expected data_batch_1..5 and "
            "test_batch (extract cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html there)."
        )

    def read(name):
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        x = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        x = ((x.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)
        return x, np.asarray(batch[b"labels"], np.int32)

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return {
        "train": (x[:-validation], y[:-validation]),
        "val": (x[-validation:], y[-validation:]),
        "test": read("test_batch"),
    }


class Block(nn.Module):
    features: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
        s = (self.stride, self.stride)
        y = nn.relu(norm()(nn.Conv(self.features, (3, 3), s, use_bias=False)(x)))
        y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = norm()(nn.Conv(self.features, (1, 1), s, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet20(nn.Module):
    """He et al. 2016's CIFAR ResNet (3 stages of 3 blocks, 16/32/64 filters), every
    convolution followed by BatchNorm (1x1 projection shortcuts), so every filter is
    radially invariant; the final dense layer is not."""

    width: int = 16
    blocks: int = 3

    @nn.compact
    def __call__(self, x, train: bool):
        norm = nn.BatchNorm(use_running_average=not train, momentum=0.9)
        x = nn.relu(norm(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        for stage in range(3):
            for block in range(self.blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Block(self.width * 2**stage, stride)(x, train)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """4-pixel zero-padded random crops and horizontal flips, on device."""
    crop_key, flip_key = jax.random.split(key)
    n, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 9)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, x.shape[-1]))
    x = jax.vmap(crop)(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1], x)


def augmented(task: harness.Task) -> harness.Task:
    base_loss = task.loss

    def loss(params, stats, batch, key):
        x, y = batch
        return base_loss(params, stats, (augment(key, x), y), key)

    return harness.Task(task.init, loss, task.evaluate, task.groups)


def candidates(names: list[str], groups: Any) -> list[harness.Candidate]:
    chosen = []
    for name in names:
        preset = presets.get(PRESET_NAMES[name])
        extra = {} if name in ("sgdm", "adam", "adamw") else {"groups": groups}
        make = lambda preset=preset, extra=extra, **kw: preset.build(**kw, **extra)
        hp = dict(preset.hyperparams)
        base = BASES.get(name)
        family = {"adam": "Adam + L2", "sgdm": "SGD with momentum + L2"}.get(base or name, "AdamW")
        chosen.append(
            harness.Candidate(name, name, hp, f"preset {preset.name}", make, base, family)
        )
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder of the CIFAR-10 archive")
    parser.add_argument("--out", default="results_cifar10")
    parser.add_argument("--optimizers", default=",".join(PRESET_NAMES))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--lr-exponents", default="0", help="grid: preset x 10^(k/2) for these k, e.g. -1,0,1"
    )
    parser.add_argument("--limit", type=int, default=None, help="use the first N train images")
    parser.add_argument(
        "--quick", action="store_true", help="2 optimizers, 1 epoch, tiny data, ResNet-8"
    )
    args = parser.parse_args(argv)
    names = args.optimizers.split(",")
    validation = 5000
    if args.quick:
        names, args.epochs, args.batch_size, args.limit = ["sgdm", "adam_srt"], 1, 32, 128
        validation = 40
    unknown = sorted(set(names) - set(PRESET_NAMES))
    if unknown:
        raise SystemExit(f"unknown optimizers {unknown}; choose among {list(PRESET_NAMES)}")

    data = load_cifar10(args.data_dir, validation)
    if args.limit:
        data["train"] = tuple(a[: args.limit] for a in data["train"])
    model = ResNet20(blocks=1 if args.quick else 3)  # quick: ResNet-8, same code, fast compile
    task = augmented(classification_task(model, jnp.asarray(data["train"][0][:32])))
    print(task.groups, end="\n\n")
    chosen = candidates(names, task.groups)
    protocol = harness.Protocol(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seeds=args.seeds,
        selection_seeds=min(2, args.seeds),
        exponents=tuple(int(k) for k in args.lr_exponents.split(",")),
        extensions=0,
    )
    results: dict[str, Any] = {
        "benchmark": "CIFAR-10 (python archive)",
        "model": f"ResNet-{6 * model.blocks + 2}, BatchNorm after every convolution",
        "protocol": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seeds": protocol.seeds,
            "selection_seeds": protocol.selection_seeds,
            "learning_rate_exponents": list(protocol.exponents),
            "schedule": "x0.1 at 1/3, 5/9 and 7/9 of training (Roburin et al. app. E.1)",
            "augmentation": "4-pixel padded random crop, horizontal flip",
            "splits": {k: len(v[1]) for k, v in data.items()},
        },
        "environment": {"jax": jax.__version__, "backend": jax.default_backend()},
        "optax_sphere": optax_sphere.__version__,
        "optimizers": {},
    }
    from tqdm.auto import tqdm

    start = time.perf_counter()
    runs = (
        len(protocol.exponents) * protocol.selection_seeds + args.seeds - protocol.selection_seeds
    )
    with tqdm(total=len(chosen) * runs * args.epochs, unit="epoch") as progress:
        results["optimizers"] = harness.compare(task, chosen, data, protocol, progress)
    harness.write_outputs(args.out, results, f"CIFAR-10, {results['model'].split(',')[0]}")
    print(harness.format_table(results))
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
