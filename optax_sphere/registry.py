"""Every alias of the library and the optax optimizer it extends, in one table.

Every alias is built with :func:`~optax_sphere.on_groups`: its other leaves follow an optax
optimizer, which is the whole alias when nothing is grouped. That is its base here: Adam
(after coupled L2) for Adam-S/ST/SRT, AdamW for RV-AdamW and AdamP, SGD with momentum for
SGD-MRT, PSI-SGDM and RV-SGDM, Lion, SGD, AdaGrad, Muon; for Cho & Lee's SGD-G and Adam-G,
SGD with Nesterov momentum (``ungrouped_learning_rate``, ``ungrouped_momentum``), as their code
does. :data:`ALIASES` gives each alias its ``family`` (the optimizer whose hyperparameter grid
the comparisons search: Adam-G's is Adam's) and its base in words, and :func:`build_base`
builds the base from the alias's own hyperparameters, so that an alias and its base run at the
same values. :data:`BASES` builds the plain optax optimizer of each family (Adam and SGD with
momentum after coupled L2, AdamW, Lion, SGD, AdaGrad, Muon). The benchmarks time each alias
against its base, the main comparison pairs each alias with its family, and the presets build
the plain optimizers from :data:`BASES`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import optax

__all__ = ["AliasBase", "ALIASES", "BASES", "build_base"]


class AliasBase(NamedTuple):
    """One alias's base: its ``family`` (``"adam"``, ``"adamw"``, ``"sgdm"``, ``"lion"``,
    ``"sgd"``, ``"adagrad"``, ``"muon"``) and the optax optimizer in words."""

    family: str
    base: str


def _adam(
    learning_rate: Any,
    weight_decay: Any = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    nesterov: bool = False,
    mask: Any = None,
) -> optax.GradientTransformation:
    """``optax.adam`` after coupled L2 (PyTorch's ``Adam(weight_decay=...)``) on the leaves
    ``mask`` selects. The decay is in the chain at any value (adding 0 is exact), so that the
    state has one structure whatever the value, also under ``optax.inject_hyperparams``."""
    adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, nesterov=nesterov)
    return optax.chain(optax.add_decayed_weights(weight_decay, mask), adam)


def _adamw(
    learning_rate: Any,
    weight_decay: Any = 1e-4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    nesterov: bool = False,
    mask: Any = None,
) -> optax.GradientTransformation:
    """``optax.adamw`` (at a weight decay of 0, ``optax.adam``'s arithmetic)."""
    adam = dict(b1=b1, b2=b2, eps=eps, nesterov=nesterov)
    return optax.adamw(learning_rate, weight_decay=weight_decay, mask=mask, **adam)


def _sgdm(
    learning_rate: Any,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: Any = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
    """``optax.sgd`` with momentum after coupled L2 (PyTorch's ``SGD(weight_decay=...)``) on
    the leaves ``mask`` selects; the decay in the chain at any value, as in :func:`_adam`."""
    sgd = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
    return optax.chain(optax.add_decayed_weights(weight_decay, mask), sgd)


def _lion(
    learning_rate: Any,
    weight_decay: Any = 1e-3,
    b1: float = 0.9,
    b2: float = 0.99,
    mask: Any = None,
) -> optax.GradientTransformation:
    """``optax.lion`` with its decoupled decay."""
    return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)


def _adagrad(learning_rate: Any, v0: float = 0.1) -> optax.GradientTransformation:
    """``optax.adagrad`` with its accumulator started at ``v0`` (AdaGradG's ``v0``, 1 by
    default, where optax starts at 0.1)."""
    try:
        start = float(v0)
    except TypeError:
        raise TypeError(
            f"the AdaGrad base takes one number for v0 (its initial accumulator), got {v0!r}"
        ) from None
    return optax.adagrad(learning_rate, initial_accumulator_value=start)


def _muon(
    learning_rate: Any, beta: float = 0.95, eps: float = 1e-8, nesterov: bool = True
) -> optax.GradientTransformation:
    """``optax.contrib.muon`` (its Adam on the leaves it does not orthogonalise)."""
    from optax.contrib import muon

    return muon(learning_rate, beta=beta, eps=eps, nesterov=nesterov)


#: family -> the plain optax optimizer of that family, built from keyword hyperparameters
BASES: Mapping[str, Callable[..., optax.GradientTransformation]] = MappingProxyType(
    {
        "adam": _adam,
        "adamw": _adamw,
        "sgdm": _sgdm,
        "lion": _lion,
        "sgd": optax.sgd,
        "adagrad": _adagrad,
        "muon": _muon,
    }
)

_ADAM = AliasBase("adam", "optax.adam")
_SGDM = AliasBase("sgdm", "optax.sgd(momentum)")

#: alias name -> its base
ALIASES: Mapping[str, AliasBase] = MappingProxyType(
    {
        "adam_s": _ADAM,
        "adam_st": _ADAM,
        "adam_srt": _ADAM,
        "adamg": AliasBase("adam", "optax.sgd(momentum, nesterov)"),
        "adamp": AliasBase("adamw", "optax.adamw"),
        "wrapped_adam_l2": AliasBase("adam", "optax.adam + L2"),
        "rv_adamw": AliasBase("adamw", "optax.adamw"),
        "sgdm_rt": _SGDM,
        "psi_sgdm": _SGDM,
        "sgdg": AliasBase("sgdm", "optax.sgd(momentum, nesterov)"),
        "sgdp": AliasBase("sgdm", "optax.sgd(momentum) + decoupled decay"),
        "rv_sgdm": AliasBase("sgdm", "optax.sgd(momentum)+L2"),
        "rv_lion": AliasBase("lion", "optax.lion"),
        "psi_sgd": AliasBase("sgd", "optax.sgd"),
        "adagradg": AliasBase("adagrad", "optax.adagrad"),
        "adamh": _ADAM,
        "muonh": AliasBase("muon", "optax.contrib.muon"),
    }
)


def build_base(alias: str, **hyperparameters: Any) -> optax.GradientTransformation:
    """The optax optimizer ``alias`` extends, at the alias's hyperparameters: the alias with
    nothing grouped (``groups=None``), which :func:`~optax_sphere.on_groups` makes the
    optimizer its other leaves follow, and nothing else.

    Args:
      alias: an alias name (a key of :data:`ALIASES`).
      **hyperparameters: the alias's keywords (its defaults fill the others).

    Returns:
      The base ``optax.GradientTransformation``.

    Raises:
      KeyError: an unknown alias, naming the known ones.

    Example:
      >>> from optax_sphere.registry import ALIASES, build_base
      >>> ALIASES["rv_sgdm"].base
      'optax.sgd(momentum)+L2'
      >>> tx = build_base("rv_sgdm", learning_rate=0.1, momentum=0.9, weight_decay=5e-4)

    References:
      Roburin et al., Kosson et al., Heo et al., Cho & Lee, Yi: the optimizers each alias
      extends (see each alias's docstring).
    """
    if alias not in ALIASES:
        raise KeyError(f"unknown alias {alias!r}; known: {sorted(ALIASES)}")
    import optax_sphere

    return getattr(optax_sphere, alias)(**{**hyperparameters, "groups": None})
