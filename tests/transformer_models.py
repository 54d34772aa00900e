"""Small pre-LayerNorm transformer language models in Flax linen, flax.nnx (blocks stacked and
scanned) and Equinox (blocks stacked, ``lax.scan``), with their rotational groups derived by
hand, and a synthetic language to train them on."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optax_sphere.gains import NnxWithGain, WithGain

VOCAB, DIM, HEADS, BLOCKS, CONTEXT = 16, 16, 2, 2, 8
HEAD_DIM = DIM // HEADS


def markov_batches(seed: int, batch: int, count: int) -> np.ndarray:
    """``count`` batches of token windows from a fixed order-1 Markov chain in which every
    token has three likely successors (the same chain for every seed)."""
    chain = np.random.default_rng(1234)
    successors = np.stack([chain.choice(VOCAB, 3, replace=False) for _ in range(VOCAB)])
    rng = np.random.default_rng(seed)
    out = np.empty((count, batch, CONTEXT + 1), np.int32)
    out[..., 0] = rng.integers(0, VOCAB, (count, batch))
    for t in range(1, CONTEXT + 1):
        pick = rng.choice(3, (count, batch), p=[0.6, 0.3, 0.1])
        out[..., t] = successors[out[..., t - 1], pick]
    return out


def causal_mask() -> jax.Array:
    return jnp.tril(jnp.ones((CONTEXT, CONTEXT), bool))


# ---------------------------------------------------------------------------------------------
# Flax linen


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        attention = nn.MultiHeadDotProductAttention(num_heads=HEADS, use_bias=False)
        x = x + attention(nn.LayerNorm()(x), mask=causal_mask())
        h = nn.gelu(WithGain(nn.Dense(4 * DIM, use_bias=False))(nn.LayerNorm()(x)))
        return x + WithGain(nn.Dense(DIM, use_bias=False))(h)


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        position = self.param("position", nn.initializers.normal(0.02), (CONTEXT, DIM))
        x = nn.Embed(VOCAB, DIM)(tokens) + position
        for _ in range(BLOCKS):
            x = LinenBlock()(x)
        head = WithGain(nn.Dense(VOCAB, use_bias=False), use_bias=False, name="head")
        return head(nn.LayerNorm()(x))


#: path -> (axes of one group, number of groups, group size), derived by hand
LINEN_GROUPS = {
    "Embed_0/embedding": ((1,), VOCAB, DIM),
    "head/layer/kernel": ((0,), VOCAB, DIM),
    **{
        f"LinenBlock_{b}/{name}": spec
        for b in range(BLOCKS)
        for name, spec in {
            **{
                f"MultiHeadDotProductAttention_0/{p}/kernel": ((0,), HEADS * HEAD_DIM, DIM)
                for p in ("query", "key", "value")
            },
            "MultiHeadDotProductAttention_0/out/kernel": ((0, 1), DIM, DIM),
            "WithGain_0/layer/kernel": ((0,), 4 * DIM, DIM),
            "WithGain_1/layer/kernel": ((0,), DIM, 4 * DIM),
        }.items()
    },
}


def linen_lm(seed: int):
    model = LinenLM()
    tokens = jnp.zeros((2, CONTEXT), jnp.int32)
    variables = model.init(jax.random.key(seed), tokens)
    return model, variables, lambda p, x: model.apply({"params": p}, x)


# ---------------------------------------------------------------------------------------------
# flax.nnx, blocks stacked by nnx.vmap and applied by nnx.scan


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(DIM, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(HEADS, DIM, use_bias=False, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(DIM, rngs=rngs)
        self.up = NnxWithGain(nnx.Linear(DIM, 4 * DIM, use_bias=False, rngs=rngs))
        self.down = NnxWithGain(nnx.Linear(4 * DIM, DIM, use_bias=False, rngs=rngs))

    def __call__(self, x):
        x = x + self.attention(self.norm1(x), mask=causal_mask())
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class NnxLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (CONTEXT, DIM)))

        @nnx.split_rngs(splits=BLOCKS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return NnxBlock(rngs)

        self.blocks = blocks(rngs)
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.head = NnxWithGain(nnx.Linear(DIM, VOCAB, use_bias=False, rngs=rngs), use_bias=False)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.position[...]

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return self.head(self.norm(run(x, self.blocks)))


NNX_GROUPS = {
    "embed/embedding": ((1,), VOCAB, DIM),
    "head/layer/kernel": ((0,), VOCAB, DIM),
    **{
        f"blocks/attention/{p}/kernel": ((1,), BLOCKS * HEADS * HEAD_DIM, DIM)
        for p in ("query", "key", "value")
    },
    "blocks/attention/out/kernel": ((1, 2), BLOCKS * DIM, DIM),
    "blocks/up/layer/kernel": ((1,), BLOCKS * 4 * DIM, DIM),
    "blocks/down/layer/kernel": ((1,), BLOCKS * DIM, 4 * DIM),
}


def nnx_lm(seed: int):
    model = NnxLM(nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    return model, params, apply


# ---------------------------------------------------------------------------------------------
# Equinox, blocks stacked by eqx.filter_vmap and applied by lax.scan (layout (out, in))


class EqxBlock(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    up_gain: jax.Array
    down_gain: jax.Array

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(DIM)
        self.attention = eqx.nn.MultiheadAttention(HEADS, DIM, key=k1)
        self.norm2 = eqx.nn.LayerNorm(DIM)
        self.up = eqx.nn.Linear(DIM, 4 * DIM, use_bias=False, key=k2)
        self.down = eqx.nn.Linear(4 * DIM, DIM, use_bias=False, key=k3)
        self.up_gain, self.down_gain = jnp.ones(4 * DIM), jnp.ones(DIM)

    def __call__(self, x):  # one sequence (CONTEXT, DIM)
        h = jax.vmap(self.norm1)(x)
        x = x + self.attention(h, h, h, mask=causal_mask())
        h = jax.vmap(self.up)(jax.vmap(self.norm2)(x)) * self.up_gain
        return x + jax.vmap(self.down)(jax.nn.gelu(h)) * self.down_gain


class EqxLM(eqx.Module):
    embed: eqx.nn.Embedding
    position: jax.Array
    blocks: EqxBlock
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    head_gain: jax.Array

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(VOCAB, DIM, key=k1)
        self.position = 0.02 * jax.random.normal(k2, (CONTEXT, DIM))
        self.blocks = eqx.filter_vmap(EqxBlock)(jax.random.split(k3, BLOCKS))
        self.norm = eqx.nn.LayerNorm(DIM)
        self.head = eqx.nn.Linear(DIM, VOCAB, use_bias=False, key=k4)
        self.head_gain = jnp.ones(VOCAB)

    def __call__(self, tokens):  # a batch (B, CONTEXT)
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)

        def one(sequence):
            x = jax.vmap(self.embed)(sequence) + self.position

            def run(x, block):
                return eqx.combine(block, static)(x), None

            x, _ = jax.lax.scan(run, x, dynamic)
            return jax.vmap(self.head)(jax.vmap(self.norm)(x)) * self.head_gain

        return jax.vmap(one)(tokens)


EQX_GROUPS = {
    "embed/weight": ((1,), VOCAB, DIM),
    "head/weight": ((1,), VOCAB, DIM),
    **{
        f"blocks/attention/{p}_proj/weight": ((2,), BLOCKS * DIM, DIM)
        for p in ("query", "key", "value", "output")
    },
    "blocks/up/weight": ((2,), BLOCKS * 4 * DIM, DIM),
    "blocks/down/weight": ((2,), BLOCKS * DIM, 4 * DIM),
}


def eqx_lm(seed: int):
    model = EqxLM(jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return model, params, lambda p, x: eqx.combine(p, static)(x)
