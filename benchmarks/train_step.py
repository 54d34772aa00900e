"""What an optimizer costs a user: a whole train step (forward, backward, optimizer) per alias.

Two Flax models, each trained with an alias and with the optax optimizer it extends, timed
interleaved in one process (A, B, A, B, ...) so that both see the same machine load; the
ratio of the median step times is what the optimizer adds to a real step:

* ``resnet20``: ResNet-20 with BatchNorm on CIFAR-shaped batches (128 x 32 x 32 x 3), where
  the convolutions dominate;
* ``ln_mlp``: a 4-layer, 1024-wide MLP with LayerNorm (4.2M parameters, batch 64; each
  kernel, followed by a LayerNorm without a bias in between, is one per-tensor group), where
  the optimizer is a large part of the step, as in transformers.

    python benchmarks/train_step.py --out benchmarks/results/train_step.json
    python benchmarks/train_step.py --quick
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sphere
from optax_sphere import registry
from optax_sphere.experiments.environment import environment


class ResNet20(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        x = nn.relu(norm()(nn.Conv(16, (3, 3), use_bias=False)(x)))
        for stage, width in enumerate((16, 32, 64)):
            for block in range(3):
                stride = 2 if stage > 0 and block == 0 else 1
                y = nn.relu(norm()(nn.Conv(width, (3, 3), stride, use_bias=False)(x)))
                y = norm()(nn.Conv(width, (3, 3), use_bias=False)(y))
                if x.shape[-1] != width:
                    x = norm()(nn.Conv(width, (1, 1), stride, use_bias=False)(x))
                x = nn.relu(x + y)
        return nn.Dense(10)(x.mean((1, 2)))


class LayerNormMlp(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        for _ in range(4):
            # no bias before the LayerNorm: each kernel is one radially invariant group
            x = nn.relu(nn.LayerNorm()(nn.Dense(1024, use_bias=False)(x)))
        return nn.Dense(10)(x)


# name: (model, input shape, batch)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "resnet20": (ResNet20, (32, 32, 3), 128),
    "ln_mlp": (LayerNormMlp, (1024,), 64),
}

# alias: its keywords; the baseline is the optax optimizer it extends, at the same values
# (optax_sphere.registry)
KEYWORDS: dict[str, dict] = {
    "adam_s": {"learning_rate": 1e-3},
    "adam_srt": {"learning_rate": 1e-3},
    "adamp": {"learning_rate": 1e-3},
    "adamg": {"learning_rate": 1e-2},
    "rv_adamw": {"learning_rate": 1e-3, "weight_decay": 1e-2},
    "sgdm_rt": {"learning_rate": 0.1, "momentum": 0.9},
    "sgdp": {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
    "psi_sgdm": {"learning_rate": 0.1, "momentum": 0.9},
    "sgdg": {"learning_rate": 0.1, "momentum": 0.9},
}
# alias: (keywords, baseline name, baseline)
PAIRS: dict[str, tuple[dict, str, Callable[[], optax.GradientTransformation]]] = {
    name: (kw, registry.ALIASES[name].base, functools.partial(registry.build_base, name, **kw))
    for name, kw in KEYWORDS.items()
}


class TrainStep:
    """A compiled, donating train step of ``model`` with ``tx``."""

    def __init__(self, model: nn.Module, tx: optax.GradientTransformation, x, y):
        variables = model.init(jax.random.key(0), x, train=False)
        self.params = variables["params"]
        self.stats = variables.get("batch_stats", {})
        self.state = tx.init(self.params)
        self.x, self.y = x, y

        def step(params, stats, state, x, y):
            def loss_fn(p):
                logits, new = model.apply(
                    {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return loss, new.get("batch_stats", {})

            (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), stats, state

        self.compiled = (
            jax.jit(step, donate_argnums=(0, 1, 2))
            .lower(self.params, self.stats, self.state, x, y)
            .compile()
        )
        self.times: list[float] = []

    def run(self, record: bool = True) -> None:
        t0 = time.perf_counter()
        out = self.compiled(self.params, self.stats, self.state, self.x, self.y)
        self.params, self.stats, self.state = jax.block_until_ready(out)
        if record:
            self.times.append(time.perf_counter() - t0)


def compare(model_name: str, alias: str, steps: int, warmup: int, cache: dict) -> dict:
    make_model, shape, batch = MODELS[model_name]
    model = make_model()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    variables = model.init(jax.random.key(0), x, train=False)
    key = (model_name, "groups")
    if key not in cache:  # groups found on the model, once per model
        cache[key] = optax_sphere.find_groups(model, variables, x, train=True)
    kwargs, baseline_name, baseline = PAIRS[alias]
    a = TrainStep(model, getattr(optax_sphere, alias)(**kwargs, groups=cache[key]), x, y)
    if (model_name, baseline_name) not in cache:
        cache[model_name, baseline_name] = TrainStep(model, baseline(), x, y)
    b = cache[model_name, baseline_name]
    b.times = []
    for _ in range(warmup):
        a.run(False)
        b.run(False)
    for i in range(steps):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        first.run()
        second.run()
    ta, tb = statistics.median(a.times), statistics.median(b.times)
    pairs = sorted(x / y for x, y in zip(a.times, b.times))
    return {
        "model": model_name,
        "alias": alias,
        "baseline": baseline_name,
        "step_time_ratio": ta / tb,
        "pair_ratio_quartiles": statistics.quantiles(pairs, n=4, method="inclusive"),
        "alias_ms": 1e3 * ta,
        "baseline_ms": 1e3 * tb,
        "grouped_parameters": sum(r.grouping is not None for r in cache[key].reports),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--aliases", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--steps", type=int, default=30, help="timed A/B pairs")
    parser.add_argument("--quick", action="store_true", help="3 steps, a smoke run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    steps, warmup = (3, 1) if args.quick else (args.steps, 3)
    env = environment()
    rows, cache = [], {}
    for model_name in args.models:
        for alias in args.aliases:
            row = compare(model_name, alias, steps, warmup, cache)
            rows.append(row)
            q1, _, q3 = row["pair_ratio_quartiles"]
            print(
                f"{model_name:<9} {alias:<9} {row['step_time_ratio']:.3f}x {row['baseline']:<20}"
                f" ({row['alias_ms']:.1f} vs {row['baseline_ms']:.1f} ms; IQR {q1:.2f}-{q3:.2f})",
                flush=True,
            )
        cache.clear()
    result = {
        "command": "python benchmarks/train_step.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": {**env, "load_average_at_end": environment()["load_average_1_5_15_min"]},
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
