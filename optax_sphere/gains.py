"""Learnable per-output gains for kernels trained as rotational weights (Kosson et al. app. M, O).

The rotational variants keep the norm of every rotational group fixed. For a kernel that
is not scale-invariant (a transformer's linear layers, an unnormalised network) the norm
matters, so the authors add a learnable gain per output unit that carries the magnitude
while the kernel rotates at fixed norm, and absorb it into the kernel for inference:

    y = (x @ W) * gain + bias  ==  x @ (W * gain) + bias.

:class:`WithGain` (Flax linen) and :class:`NnxWithGain` (Flax nnx) wrap any layer whose
output features are its last axis and whose kernel's last axis is the output
(``nn.Dense``, ``nn.Conv``, ``nnx.Linear``, ``nnx.Conv``, ...), built with
``use_bias=False``; the wrapper owns the gain and the bias. The gain and bias are 1-D, so
the default ``groups`` leave them ungrouped (plain inner optimizer, no weight decay) while
the kernel is rotational. :func:`fold_gain` / :func:`fold_gains` / :meth:`NnxWithGain.fold`
give the parameters of the plain layer with the gain absorbed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

__all__ = ["WithGain", "NnxWithGain", "fold_gain", "fold_gains"]


class WithGain(nn.Module):
    """Flax linen: ``layer(x) * gain + bias`` with a learnable per-output ``gain``.

    ``layer`` must be built with ``use_bias=False`` (the wrapper owns the bias). Parameters:
    ``{"layer": {"kernel": ...}, "gain": (features,), "bias": (features,)}``.
    """

    layer: nn.Module
    use_bias: bool = True
    gain_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if getattr(self.layer, "use_bias", False):
            raise ValueError("WithGain: build the wrapped layer with use_bias=False.")
        # re-parent the layer under this module (a layer built in the caller's compact
        # method would otherwise keep its parameters in the caller's scope)
        layer = self.layer
        if layer.parent is not self:
            layer = layer.clone(parent=self, name="layer")
        y = layer(x)
        features = y.shape[-1]
        y = y * self.param("gain", self.gain_init, (features,), jnp.float32).astype(y.dtype)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (features,), jnp.float32).astype(y.dtype)
        return y


def fold_gain(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters of one :class:`WithGain` -> those of the plain layer (gain absorbed).

    ``{"layer": {"kernel": W, ...}, "gain": g, "bias": b}`` becomes
    ``{"kernel": W * g, "bias": b, ...}``: load it into the same layer built with
    ``use_bias=True`` (or ``False`` if there was no bias).

    Args:
      params: the parameters of one :class:`WithGain`.

    Returns:
      The parameters of the plain layer.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.gains import fold_gain
      >>> layer = {"kernel": jnp.ones((2, 3))}
      >>> params = {"layer": layer, "gain": 2 * jnp.ones(3), "bias": jnp.zeros(3)}
      >>> folded = fold_gain(params)
      >>> sorted(folded), folded["kernel"][0].tolist()
      (['bias', 'kernel'], [2.0, 2.0, 2.0])

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, app. M (learnable gains in front of rotational weights).
    """
    layer = dict(params["layer"])
    kernel = layer.pop("kernel")
    out = {"kernel": (kernel * params["gain"]).astype(kernel.dtype), **layer}
    if "bias" in params:
        out["bias"] = params["bias"]
    return out


def _is_gained(tree: Any) -> bool:
    return (
        isinstance(tree, Mapping)
        and set(tree) in ({"layer", "gain"}, {"layer", "gain", "bias"})
        and isinstance(tree["layer"], Mapping)
        and "kernel" in tree["layer"]
    )


def fold_gains(params: Any) -> Any:
    """Folds every :class:`WithGain` sub-tree of a linen parameter tree (see :func:`fold_gain`).

    Args:
      params: a linen parameter tree.

    Returns:
      The tree with every :class:`WithGain` sub-tree folded.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.gains import fold_gains
      >>> gained = {"layer": {"kernel": jnp.ones((2, 3))}, "gain": 2 * jnp.ones(3)}
      >>> sorted(fold_gains({"Dense_0": gained, "head": {"kernel": jnp.ones((3, 1))}})["Dense_0"])
      ['kernel']

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, app. M.
    """
    if _is_gained(params):
        return fold_gain(params)
    if isinstance(params, Mapping):
        return {k: fold_gains(v) for k, v in params.items()}
    return params


class NnxWithGain(nnx.Module):
    """Flax nnx: ``layer(x) * gain + bias`` with a learnable per-output ``gain``.

    ``layer`` (e.g. ``nnx.Linear(din, dout, use_bias=False, rngs=rngs)``) must have a
    ``kernel`` whose last axis is the output and no bias. :meth:`fold` returns the layer
    with the gain absorbed into its kernel and the bias attached.
    """

    def __init__(self, layer: nnx.Module, *, use_bias: bool = True):
        if getattr(layer, "bias", None) is not None:
            raise ValueError("NnxWithGain: build the wrapped layer with use_bias=False.")
        features = layer.kernel.shape[-1]
        self.layer = layer
        self.gain = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32)) if use_bias else None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = self.layer(x)
        y = y * self.gain[...].astype(y.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

    def fold(self) -> nnx.Module:
        """The wrapped layer with kernel ``W * gain`` and the bias: same outputs."""
        layer = nnx.clone(self.layer)
        kernel = layer.kernel[...]
        layer.kernel = nnx.Param((kernel * self.gain[...]).astype(kernel.dtype))
        if self.bias is not None:
            layer.bias = nnx.Param(self.bias[...])
            layer.use_bias = True
        return layer
