"""A small LayerNorm transformer language model (bytes): AdamW, RV-AdamW, AdamH and Muon.

    python examples/char_transformer.py --out results_char            # a few minutes on CPU
    python examples/char_transformer.py --out results_char --quick    # smoke test

The text is the Python standard library's own source code (the ``.py`` files next to
``os.py``, in sorted order), so it is on every machine. Bytes are the vocabulary (256
symbols); the last 10% of the text is the test split and the 10% before it the validation
split. The model is a pre-LayerNorm decoder (GPT-like) with learned positions.

This is the case where the rotational variants help (Kosson et al. sec. 5 "Training poorly
normalized networks", table 2, GPT-like on Wikitext): LayerNorm makes at most a whole layer
scale-invariant, not each neuron, so the neurons of one matrix rotate at unequal speeds under
AdamW, and RV-AdamW balances them. Its groups are Kosson et al.'s, read from the model's
structure by ``optax_sphere.rotational_groups``: every linear kernel (attention, MLP, head)
and the embedding per output unit; the MLP kernels and the head carry a learnable gain
(``optax_sphere.gains.WithGain``), since in a transformer their norm matters. Both optimizers
start from Kosson et al.'s GPT-like preset (``kosson2024/wikitext_gpt``: lr 5e-3, weight decay
0.5, b2 0.95; the RV zero-shot) with a cosine schedule after a 5% warm-up, and the learning
rate is searched over a short grid on the validation loss. Both decay the matrices (optax's
``mask``: AdamW's embedding, kernels, head and positions; RV-AdamW's positions, its only
ungrouped matrix) and not the LayerNorm gains, the learnable gains and the biases.

Two optimizers take their per-leaf choices from the same structure: AdamH (Wen et al. 2025,
``optax_sphere.adamh``) keeps every hidden matrix at its initial norm
(``optax_sphere.matrix_groups``) at a rate of ``sqrt(lr * weight_decay)`` of the AdamW preset
(0.05, the angle AdamW turns per step at equilibrium), Adam at the preset's rate elsewhere;
``optax.contrib.muon`` (Jordan et al. 2024) orthogonalises the hidden matrices given by
``optax_sphere.structure.muon_dimension_numbers`` at 0.02 with the decoupled decay 0.1 on
``optax_sphere.structure.weight_decay_mask``, its Adam at the preset's rate elsewhere. Every
rate of an optimizer follows its learning rate's schedule and search (``--optimizers`` picks
among them; ``muonh`` too).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sphere
from optax_sphere import presets, structure
from optax_sphere.experiments import harness
from optax_sphere.gains import WithGain


def stdlib_text(max_bytes: int) -> bytes:
    """The first ``max_bytes`` bytes of the standard library's top-level sources."""
    folder = os.path.dirname(os.__file__)
    chunks, size = [], 0
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
        with open(path, "rb") as f:
            chunk = f.read()
        chunks.append(chunk)
        size += len(chunk)
        if size >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def windows(data: np.ndarray, context: int, limit: int | None = None):
    n = (len(data) - 1) // context
    if limit:
        n = min(n, limit)
    x = data[: n * context].reshape(n, context)
    y = data[1 : n * context + 1].reshape(n, context)
    return x.astype(np.int32), y.astype(np.int32)


def load_text(max_bytes: int, context: int, eval_windows: int) -> dict[str, Any]:
    data = np.frombuffer(stdlib_text(max_bytes), np.uint8)
    a, b = int(0.8 * len(data)), int(0.9 * len(data))
    return {
        "train": windows(data[:a], context),
        "val": windows(data[a:b], context, eval_windows),
        "test": windows(data[b:], context, eval_windows),
    }


class Block(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, use_bias=False)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        h = WithGain(nn.Dense(4 * self.dim, use_bias=False))(h)
        return x + WithGain(nn.Dense(self.dim, use_bias=False))(nn.gelu(h))


class CharTransformer(nn.Module):
    dim: int = 64
    heads: int = 4
    layers: int = 2
    context: int = 64

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(256, self.dim)(tokens)
        x = x + self.param("positions", nn.initializers.normal(0.02), (self.context, self.dim))
        for _ in range(self.layers):
            x = Block(self.dim, self.heads)(x)
        return WithGain(nn.Dense(256, use_bias=False), name="head")(nn.LayerNorm()(x))


def rotational_groups(model: CharTransformer) -> optax_sphere.FoundGroups:
    """Kosson et al.'s groups, read from the model's structure: every linear kernel and the
    embedding per output unit (``optax_sphere.rotational_groups``). In a pre-LN block no
    kernel is exactly radially invariant (the residual stream carries its scale), which is
    what ``find_groups`` reports; Kosson et al. apply rotational control to these layers all
    the same, with gains where the norm matters (sec. 4, app. M, O)."""
    tokens = jnp.zeros((1, model.context), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    return optax_sphere.rotational_groups(model, variables, tokens)


def lm_task(model: CharTransformer, groups: optax_sphere.FoundGroups) -> harness.Task:
    def init(key):
        return model.init(key, jnp.zeros((1, model.context), jnp.int32))["params"], {}

    def token_losses(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y), logits

    def loss(params, state, batch, key):
        return token_losses(params, *batch)[0].mean(), state

    def evaluate(params, state, batch):
        losses, logits = token_losses(params, *batch)
        correct = (jnp.argmax(logits, -1) == batch[1]).astype(jnp.float32)
        return {"loss": losses.mean(-1).sum(), "accuracy": correct.mean(-1).sum()}

    return harness.Task(init, loss, evaluate, groups=groups)


def warmup_cosine(lr: Any, total_steps: int):
    """Linear warm-up over 5% of the steps, then cosine decay to 0 (``lr`` may be traced)."""
    warmup = max(1, total_steps // 20)

    def schedule(count):
        t = jnp.clip((count - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
        return lr * jnp.minimum((count + 1) / warmup, 0.5 * (1 + jnp.cos(jnp.pi * t)))

    return schedule


def scaled(schedule: Any, factor: float):
    """``factor`` times ``schedule`` (a number or a function of the step count)."""
    return (lambda count: factor * schedule(count)) if callable(schedule) else factor * schedule


def versus_adamw(*fields: Any) -> harness.Candidate:
    """A candidate compared with AdamW seed by seed, in its panel."""
    return harness.Candidate(*fields, base="adamw", family="AdamW")


def candidates(
    groups: optax_sphere.FoundGroups, read: dict[str, Any], names: list[str]
) -> list[harness.Candidate]:
    """The optimizers compared; ``read``: the matrix groups, Muon's dimension numbers
    and the weight-decay mask read from the model."""
    matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = presets.get("kosson2024/wikitext_gpt/adamw")
    rv = presets.get("kosson2024/wikitext_gpt/rv_adamw")
    lr, wd = adamw.hyperparams["learning_rate"], adamw.hyperparams["weight_decay"]
    angle = (lr * wd) ** 0.5  # AdamW's angular update per step at equilibrium
    muon_lr = 0.02
    every = {
        "adamw": harness.Candidate(
            "adamw",
            "optax.adamw",
            dict(adamw.hyperparams),
            f"preset {adamw.name}",
            lambda **kw: adamw.build(mask=matrices, **kw),
            family="AdamW",
        ),
        "rv_adamw": harness.Candidate(
            "rv_adamw",
            "rv_adamw (Kosson et al.'s groups)",
            dict(rv.hyperparams),
            f"preset {rv.name}",
            lambda **kw: rv.build(groups=groups, mask=matrices, **kw),
            base="adamw",
            family="AdamW",
        ),
        "adamh": versus_adamw(
            "adamh",
            "adamh (a sphere per matrix)",
            {"learning_rate": angle, "b2": 0.95},
            f"sqrt(lr * weight_decay) of {adamw.name}; Adam at its lr off the matrices",
            lambda learning_rate, **kw: optax_sphere.adamh(
                learning_rate,
                ungrouped_learning_rate=scaled(learning_rate, lr / angle),
                groups=read["matrices"],
                **kw,
            ),
        ),
        "muon": versus_adamw(
            "muon",
            "optax.contrib.muon (numbers from the structure)",
            {"learning_rate": muon_lr, "weight_decay": 0.1},
            f"Jordan et al.'s 0.02; Adam at the lr of {adamw.name} off the matrices",
            lambda learning_rate, **kw: optax.contrib.muon(
                learning_rate,
                adam_learning_rate=scaled(learning_rate, lr / muon_lr),
                adam_b2=0.95,
                weight_decay_mask=read["mask"],
                muon_weight_dimension_numbers=read["numbers"],
                **kw,
            ),
        ),
        "muonh": versus_adamw(
            "muonh",
            "muonh (Muon on a sphere per matrix)",
            {"learning_rate": angle},
            f"sqrt(lr * weight_decay) of {adamw.name}; Muon's Adam at its lr off the matrices",
            lambda learning_rate, **kw: optax_sphere.muonh(
                learning_rate,
                ungrouped_learning_rate=scaled(learning_rate, lr / angle),
                muon_weight_dimension_numbers=read["numbers"],
                groups=read["matrices"],
                **kw,
            ),
        ),
    }
    unknown = sorted(set(names) - set(every))
    if unknown:
        raise SystemExit(f"unknown optimizers {unknown}; choose among {sorted(every)}")
    if "adamw" not in names:
        names = ["adamw", *names]  # every other one is compared with it
    return [every[name] for name in names]


def read_structure(model: CharTransformer) -> dict[str, Any]:
    """One group per hidden matrix, Muon's dimension numbers and the weight-decay mask, read
    from the model's structure."""
    tokens = jnp.zeros((1, model.context), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    return {
        "matrices": optax_sphere.matrix_groups(model, variables, tokens),
        "numbers": structure.muon_dimension_numbers(model, variables, tokens),
        "mask": structure.weight_decay_mask(model, variables, tokens),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results_char")
    parser.add_argument("--bytes", type=int, default=1_000_000, help="text size")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--lr-exponents", default="-1,0", help="grid: preset x 10^(k/2) for these k"
    )
    parser.add_argument(
        "--optimizers",
        default="adamw,rv_adamw,adamh,muon",
        help="comma-separated, among adamw, rv_adamw, adamh, muon, muonh",
    )
    parser.add_argument("--quick", action="store_true", help="tiny text, 1 epoch, 1 seed")
    args = parser.parse_args(argv)
    eval_windows = 512
    if args.quick:
        args.bytes, args.epochs, args.seeds, args.lr_exponents = 40_000, 1, 1, "0"
        eval_windows = 32
    model = CharTransformer()
    data = load_text(args.bytes, model.context, eval_windows)
    groups = rotational_groups(model)
    print(groups)
    task = lm_task(model, groups)
    chosen = candidates(groups, read_structure(model), args.optimizers.split(","))
    protocol = harness.Protocol(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seeds=args.seeds,
        selection_seeds=args.seeds,
        exponents=tuple(int(k) for k in args.lr_exponents.split(",")),
        extensions=0,
        metric="loss",
        higher_is_better=False,
        eval_batch=64,
        schedule=warmup_cosine,
    )
    results: dict[str, Any] = {
        "benchmark": f"bytes of the Python {sys.version_info.major}.{sys.version_info.minor} "
        "standard library sources",
        "model": "pre-LayerNorm transformer, 2 blocks, width 64, 4 heads, context 64",
        "protocol": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seeds": protocol.seeds,
            "selection_seeds": protocol.selection_seeds,
            "learning_rate_exponents": list(protocol.exponents),
            "schedule": "linear warm-up (5%) then cosine decay",
            "selection": "learning rate with the best mean final validation loss",
            "splits": {k: len(v[1]) for k, v in data.items()},
            "metric": "loss",
            "metrics": "loss = cross-entropy per byte (nats); accuracy = next-byte accuracy",
        },
        "environment": {"jax": jax.__version__, "backend": jax.default_backend()},
        "optax_sphere": optax_sphere.__version__,
        "optimizers": {},
    }
    from tqdm.auto import tqdm

    start = time.perf_counter()
    runs = len(protocol.exponents) * args.seeds
    with tqdm(total=len(chosen) * runs * args.epochs, unit="epoch") as progress:
        results["optimizers"] = harness.compare(task, chosen, data, protocol, progress)
    harness.write_outputs(args.out, results, "byte-level transformer")
    print(harness.format_table(results, metric="loss"))
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
