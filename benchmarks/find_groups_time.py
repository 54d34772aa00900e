"""Wall time of ``optax_sphere.find_groups`` on a ResNet-18 and on 12-block transformers.

    python benchmarks/find_groups_time.py [--out benchmarks/results/find_groups.json]

The models are Flax linen modules: the ResNet-18 of He et al. (BatchNorm after every
convolution, 11.2M parameters, CIFAR-sized inputs, batch 8) and a pre-LN transformer of 12
blocks (width 256, 4 heads, sequence 64, batch 4, QK-norm in the attention), written once as
12 separate blocks and once as one block scanned 12 times (``nn.scan``: every kernel a leaf
``(12, ...)``). The time includes reading the structure (one trace) and compiling the model
(the first call), as a user sees it; ``optax_sphere.rotational_groups`` (the structure alone)
is timed too. The groupings found are summarised in words.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import optax_sphere as osp


class BasicBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        norm = lambda: nn.BatchNorm(use_running_average=False, momentum=0.9)
        s = (self.strides, self.strides)
        y = nn.relu(norm()(nn.Conv(self.features, (3, 3), s, use_bias=False)(x)))
        y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
        if x.shape[-1] != self.features or self.strides != 1:
            x = norm()(nn.Conv(self.features, (1, 1), s, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet18(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(64, (3, 3))(x)))
        for i, features in enumerate((64, 128, 256, 512)):
            x = BasicBlock(features, 1 if i == 0 else 2)(x)
            x = BasicBlock(features)(x)
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class Block(nn.Module):
    width: int = 256
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        attention = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, normalize_qk=True, use_bias=False
        )
        x = x + attention(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.width)(h)


class Transformer(nn.Module):
    blocks: int = 12
    vocab: int = 256

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, 256)(tokens)
        for _ in range(self.blocks):
            x = Block()(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


class ScannedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return Block()(x), None


class ScannedTransformer(nn.Module):
    blocks: int = 12
    vocab: int = 256

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, 256)(tokens)
        stack = nn.scan(
            ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=12
        )
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def measure(name: str, model: nn.Module, example: jax.Array) -> dict:
    variables = model.init(jax.random.key(0), example)
    params = variables["params"]
    start = time.perf_counter()
    found = osp.find_groups(model, variables, example)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    rotational = osp.rotational_groups(model, variables, example)
    structure_seconds = time.perf_counter() - start
    counts: dict[str, int] = {}
    for r in found.reports:
        counts[r.description] = counts.get(r.description, 0) + 1
    sizes = sum(x.size for x in jax.tree.leaves(params))
    print(f"{name}: {sizes / 1e6:.1f}M parameters, {len(found.reports)} leaves, {seconds:.1f} s")
    print(f"  groupings: {counts}")
    print(
        f"  rotational_groups: {len(rotational.grouped)} kernels grouped, {structure_seconds:.2f} s"
    )
    return {"parameters": sizes, "leaves": len(found.reports), "seconds": seconds,
            "groupings": counts, "rotational_groups_seconds": structure_seconds,
            "rotational_groups_grouped": len(rotational.grouped)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(2), (4, 64), 0, 256)
    results = {
        "resnet18": measure("ResNet-18", ResNet18(), images),
        "transformer_12_blocks": measure("transformer, 12 blocks", Transformer(), tokens),
        "transformer_12_blocks_scanned": measure(
            "transformer, 12 blocks scanned", ScannedTransformer(), tokens
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },  # fmt: skip
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
