"""Synthetic parameter trees shaped like real models, for benchmarks and tests.

Flax layouts: a convolution kernel is ``(kh, kw, in, out)``, a dense kernel ``(in, out)``.
A tree of shapes (tuples) becomes a tree of arrays with :func:`make_tree`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "kernels_per_tensor",
    "make_tree",
    "many_small_shapes",
    "resnet18_shapes",
    "transformer_shapes",
]

PyTree = Any


def resnet18_shapes(num_classes: int = 1000) -> dict:
    """ResNet-18 (ImageNet head), as ``flax`` would lay it out: 11,689,512 parameters.

    Args:
      num_classes: the width of the classifier head.

    Returns:
      A tree of shape tuples in Flax layout (``(kh, kw, in, out)`` kernels).

    Example:
      >>> import math, jax
      >>> from optax_sphere.experiments.trees import resnet18_shapes
      >>> shapes = jax.tree.leaves(resnet18_shapes(), is_leaf=lambda s: isinstance(s, tuple))
      >>> sum(math.prod(s) for s in shapes)
      11689512

    References:
      He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, table 1.
    """

    def conv_bn(kh, cin, cout):
        return {"kernel": (kh, kh, cin, cout)}, {"scale": (cout,), "bias": (cout,)}

    tree: dict = {}
    tree["conv_init"], tree["bn_init"] = conv_bn(7, 3, 64)
    cin = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            b: dict = {}
            b["Conv_0"], b["BatchNorm_0"] = conv_bn(3, cin, width)
            b["Conv_1"], b["BatchNorm_1"] = conv_bn(3, width, width)
            if cin != width:
                b["conv_proj"], b["norm_proj"] = conv_bn(1, cin, width)
            tree[f"ResNetBlock_{2 * stage + block}"] = b
            cin = width
    tree["Dense_0"] = {"kernel": (512, num_classes), "bias": (num_classes,)}
    return tree


def transformer_shapes(depth: int = 12, dim: int = 256, heads: int = 4, mlp: int = 1024) -> dict:
    """A ViT-like tree (Flax ``MultiHeadDotProductAttention`` layout): LayerNorms, attention
    kernels ``(dim, heads, head_dim)``, MLPs; about 10M parameters in ~200 leaves.

    Args:
      depth: the number of blocks.
      dim: the model width.
      heads: the attention heads.
      mlp: the MLP's hidden width.

    Returns:
      A tree of shape tuples in Flax layout.

    Example:
      >>> import jax
      >>> from optax_sphere.experiments.trees import transformer_shapes
      >>> shapes = transformer_shapes(depth=2)
      >>> len(jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))
      40

    References:
      Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (the ViT block).
    """
    hd = dim // heads
    ln = {"scale": (dim,), "bias": (dim,)}
    tree: dict = {
        "embedding": {"kernel": (16, 16, 3, dim), "bias": (dim,)},
        "cls": (1, 1, dim),
        "pos_embedding": (1, 197, dim),
    }
    for i in range(depth):
        attn = {n: {"kernel": (dim, heads, hd), "bias": (heads, hd)} for n in ("query", "key")}
        attn["value"] = {"kernel": (dim, heads, hd), "bias": (heads, hd)}
        attn["out"] = {"kernel": (heads, hd, dim), "bias": (dim,)}
        tree[f"encoderblock_{i}"] = {
            "LayerNorm_0": dict(ln),
            "MultiHeadDotProductAttention_0": attn,
            "LayerNorm_1": dict(ln),
            "MlpBlock_0": {
                "Dense_0": {"kernel": (dim, mlp), "bias": (mlp,)},
                "Dense_1": {"kernel": (mlp, dim), "bias": (dim,)},
            },
        }
    tree["encoder_norm"] = dict(ln)
    tree["head"] = {"kernel": (dim, 1000), "bias": (1000,)}
    return tree


def many_small_shapes(layers: int = 256, width: int = 16) -> dict:
    """Many small Dense layers: 512 leaves of at most 256 elements (per-leaf overheads).

    Args:
      layers: the number of Dense layers.
      width: their width.

    Returns:
      A tree of shape tuples (kernel and bias per layer).

    Example:
      >>> from optax_sphere.experiments.trees import many_small_shapes
      >>> import jax
      >>> len(jax.tree.leaves(many_small_shapes(), is_leaf=lambda s: isinstance(s, tuple)))
      512

    References:
      The ``many_small`` tree of ``benchmarks/bench.py``.
    """
    return {f"Dense_{i}": {"kernel": (width, width), "bias": (width,)} for i in range(layers)}


def kernels_per_tensor(params: PyTree) -> PyTree:
    """Groups for a LayerNorm model: every ``kernel`` is one group, nothing else is grouped.

    Args:
      params: the parameter tree.

    Returns:
      A tree like ``params`` of ``"tensor"`` or ``None``, for ``groups=``.

    Example:
      >>> from optax_sphere.experiments.trees import kernels_per_tensor
      >>> kernels_per_tensor({"Dense_0": {"kernel": 1, "bias": 2}})
      {'Dense_0': {'bias': None, 'kernel': 'tensor'}}

    References:
      Kosson et al., "Rotational Equilibrium", ICML 2024, sec. 2 (a layer before a LayerNorm
      is one group).
    """

    def spec(path, leaf):
        name = getattr(path[-1], "key", None)
        return "tensor" if name == "kernel" else None

    return jax.tree_util.tree_map_with_path(spec, params)


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def make_tree(shapes: dict, seed: int, scale: float, dtype=jnp.float32) -> PyTree:
    """Arrays of ``scale`` x standard normal entries (seeded) in the tree of ``shapes``.

    Args:
      shapes: a tree of shape tuples.
      seed: the NumPy seed.
      scale: the standard deviation.
      dtype: the arrays' dtype.

    Returns:
      A tree of arrays like ``shapes``.

    Example:
      >>> from optax_sphere.experiments.trees import make_tree
      >>> make_tree({"w": (3, 2)}, seed=0, scale=0.1)["w"].shape
      (3, 2)

    References:
      The parameter trees of ``benchmarks/bench.py`` (``benchmarks/README.md``).
    """
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    rng = np.random.default_rng(seed)
    arrays = [jnp.asarray(scale * rng.standard_normal(s, dtype=np.float32), dtype) for s in leaves]
    return jax.tree.unflatten(treedef, arrays)
