"""The papers' best hyperparameters, as named presets.

Each :class:`Preset` records one optimizer's best published setting for one benchmark, with
the table it comes from, and builds the optimizer with :meth:`Preset.build`::

    p = optax_sphere.presets.get("roburin2022/cifar10_resnet20/adam_srt")
    schedule = p.learning_rate_schedule(total_steps=405 * 391)   # the paper's step decay
    tx = p.build(learning_rate=schedule)

Sources:

* ``roburin2022/...``: Roburin et al., "Spherical perspective on learning with normalization
  layers" (Roburin et al.), app. E.1, table 3 (learning rate, momentum / ``b1`` fixed to 0.9) and
  table 4 (L2 coefficient ``lambda`` and ``b2``), grid-searched per method, batch size 128
  (256 on ImageNet), 405 epochs (135 on ImageNet) with the learning rate multiplied by 0.1
  at 1/3, 5/9 and 7/9 of training. Table 4 prints ``lambda`` rounded to 6 decimals; the
  searched grid is ``1e-3 * {0, 1/128, 1/64, 1/32, 1/16, 1/8, 1/4}``, whose exact values are
  used here (``0.000008`` is ``1e-3/128``). ``lambda`` is coupled L2 (added to the
  gradient, PyTorch's ``weight_decay``) for SGD-M, Adam, AdamG and the paper's methods, and
  decoupled decay for AdamW (``optax.adamw``: ``x <- x - lr * lambda * x``, as PyTorch).
  AdamG's ``lambda`` acts on the ungrouped parameters only (on a sphere the L2 gradient is
  radial and the tangent projection removes it). Adam-ST (``adam_st``, the ICLR version's
  "Adam w/o (ab)") has no row: its presets reuse Adam-S's values.
* ``kosson2024/...``: Kosson et al., "Rotational equilibrium" (Kosson et al.), app. N table 4
  (zero-shot settings; ``.../best_shot`` where the table gives one). The rotational variants
  ``rv_*`` use the baseline's hyperparameters unchanged (zero-shot, table 2/3); schedules are
  cosine with a 5-epoch linear warm-up from 1e-6 (IWSLT: 4000 iterations; Wikitext: one-cycle,
  not reproduced here). ``weight_decay`` is AdamW's decoupled decay, SGD's coupled L2, Lion's
  decoupled decay; for an RV it sets the equilibrium angular update (Kosson et al. table 1).

Optimizer names: ``"sgdm"`` (``optax.sgd`` with momentum after coupled L2), ``"adam"`` (Adam
+ L2), ``"adamw"``, ``"lion"`` (``optax.lion``) and this library's aliases (``"adam_srt"``,
``"rv_adamw"``, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import optax

__all__ = ["Preset", "PRESETS", "get", "build", "names", "roburin_step_schedule"]


def roburin_step_schedule(init_value: float, total_steps: int) -> optax.Schedule:
    """Roburin et al.' fixed-frequency schedule: ``* 0.1`` at 1/3, 5/9 and 7/9 of training.

    (135, 225 and 315 of 405 epochs; 45, 75 and 105 of 135 on ImageNet.)

    Args:
      init_value: the initial learning rate.
      total_steps: the length of training, in steps.

    Returns:
      An ``optax.Schedule`` (``optax.piecewise_constant_schedule``).

    Example:
      >>> from optax_sphere.presets import roburin_step_schedule
      >>> schedule = roburin_step_schedule(1.0, 405)
      >>> [round(float(schedule(k)), 6) for k in (0, 135, 225, 315)]
      [1.0, 0.1, 0.01, 0.001]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", app. E (training
      protocol).
    """
    if total_steps <= 0:
        raise ValueError(f"`total_steps` must be > 0, got {total_steps}.")
    bounds = {max(1, round(total_steps * f)): 0.1 for f in (1 / 3, 5 / 9, 7 / 9)}
    return optax.piecewise_constant_schedule(init_value, bounds)


def _warmup_cosine(init_value: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=min(1e-6, init_value),
        peak_value=init_value,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
    )


def _optimizer_factory(name: str) -> Callable[..., optax.GradientTransformation]:
    import optax_sphere
    from optax_sphere import registry

    if name in registry.BASES:
        return registry.BASES[name]
    return getattr(optax_sphere, name)


@dataclasses.dataclass(frozen=True)
class Preset:
    """One optimizer's best published hyperparameters for one benchmark.

    Fields:

    - ``name``: ``"<paper>/<benchmark>/<optimizer>"`` (a ``/best_shot`` suffix where it applies);
    - ``optimizer``: the optimizer name (see the module docstring);
    - ``hyperparams``: its keyword arguments (``learning_rate`` is the initial/peak value);
    - ``schedule``: ``"step"`` (Roburin et al.'s decay, :func:`roburin_step_schedule`) or
      ``"cosine"``;
    - ``source``: the paper and table the values come from;
    - ``batch_size``, ``epochs``: the paper's batch size and training length for this benchmark;
    - ``warmup_epochs``: linear warm-up before the cosine decay;
    - ``steps``: the training length in iterations where the paper gives it so (then
      ``epochs`` is ``None``).
    """

    name: str
    optimizer: str
    hyperparams: Mapping[str, Any]
    schedule: str
    source: str
    batch_size: int
    epochs: int | None
    warmup_epochs: int = 0
    steps: int | None = None

    def learning_rate_schedule(
        self, total_steps: int, warmup_steps: int | None = None, learning_rate: float | None = None
    ) -> optax.Schedule:
        """The paper's schedule of this preset's learning rate over ``total_steps``."""
        lr = self.hyperparams["learning_rate"] if learning_rate is None else learning_rate
        if self.schedule == "step":
            return roburin_step_schedule(lr, total_steps)
        if warmup_steps is None:
            warmup_steps = (
                round(total_steps * self.warmup_epochs / self.epochs) if self.epochs else 0
            )
        return _warmup_cosine(lr, total_steps, warmup_steps)

    def build(self, **overrides: Any) -> optax.GradientTransformation:
        """The optimizer with these hyperparameters; ``overrides`` replace or add keywords
        (``learning_rate=schedule``, ``groups=...``)."""
        factory = _optimizer_factory(self.optimizer)
        return factory(**{**self.hyperparams, **overrides})


def _roburin() -> dict[str, Preset]:
    source = "Roburin et al. 2022, app. E.1 tables 3-4"
    lrs = {
        "sgdm": 0.1,
        "sgdm_rt": 0.1,
        "adam": 1e-3,
        "adamw": 1e-3,
        "adamg": 1e-2,
        "adam_s": 1e-3,
        "adam_srt": 1e-3,
    }
    k = 1e-3  # lambda grid unit: 1e-3 * {0, 1/128, ..., 1/4}
    columns = ("sgdm", "adam", "adamw", "adamg", "sgdm_rt", "adam_s", "adam_srt")
    # (lambda row, b2 row) of table 4, in the order of `columns`; None = "X" (no b2).
    table4 = {
        "cifar10_resnet20": (
            (k / 4, k / 2, k / 8, k / 2, k / 32, k / 2, k / 128),
            (None, 0.99, 0.99, 0.99, None, 0.99, 0.99),
        ),
        "cifar10_resnet18": (
            (k / 4, k / 128, k / 16, k / 2, k / 4, k / 64, k / 128),
            (None, 0.999, 0.99, 0.99, None, 0.99, 0.99),
        ),
        "cifar10_vgg16": (
            (k / 4, k / 32, k / 4, k / 2, k / 16, k / 32, k / 64),
            (None, 0.999, 0.999, 0.999, None, 0.999, 0.999),
        ),
        "cifar100_resnet18": (
            (k / 2, k / 8, k / 8, k / 8, k / 2, k / 8, 0.0),
            (None, 0.999, 0.99, 0.99, None, 0.99, 0.999),
        ),
        "cifar100_vgg16": (
            (k / 2, k / 16, k / 64, k / 16, k / 8, k / 16, k / 128),
            (None, 0.99, 0.99, 0.99, None, 0.99, 0.99),
        ),
        "svhn_resnet18": (
            (k / 2, 0.0, k / 128, k / 2, k / 2, k / 32, k / 128),
            (None, 0.999, 0.999, 0.99, None, 0.99, 0.999),
        ),
        "svhn_vgg16": (
            (k / 2, 0.0, k / 32, k / 2, k / 32, k / 128, k / 4),
            (None, 0.99, 0.99, 0.99, None, 0.99, 0.999),
        ),
        "imagenet_resnet18": (
            (k / 16, k / 128, None, None, k / 16, k / 64, k / 128),
            (None, 0.99, None, None, None, 0.99, 0.999),
        ),
    }
    out = {}
    for bench, (lambdas, b2s) in table4.items():
        imagenet = bench.startswith("imagenet")
        for opt, lam, b2 in zip(columns, lambdas, b2s):
            if lam is None:  # "X": not run on this benchmark
                continue
            hp: dict[str, Any] = {"learning_rate": lrs[opt], "weight_decay": lam}
            if opt in ("sgdm", "sgdm_rt"):
                hp["momentum"] = 0.9
            else:
                hp["b1"], hp["b2"] = 0.9, b2
            if opt == "adamg":  # the weights off the sphere: Cho & Lee's SGD rate (sec. 5)
                hp["ungrouped_learning_rate"] = 0.01
            rows = [(opt, hp)]
            if opt == "adam_s":
                rows.append(("adam_st", dict(hp)))
            for name, values in rows:
                out[f"roburin2022/{bench}/{name}"] = Preset(
                    name=f"roburin2022/{bench}/{name}",
                    optimizer=name,
                    hyperparams=MappingProxyType(values),
                    schedule="step",
                    source=source + (" (Adam-S row)" if name == "adam_st" else ""),
                    batch_size=256 if imagenet else 128,
                    epochs=135 if imagenet else 405,
                )
    return out


def _kosson() -> dict[str, Preset]:
    source = "Kosson et al. 2024, app. N table 4"
    # (benchmark, baseline, batch, epochs, warmup epochs, zero-shot hp, best-shot hp or None)
    rows = [
        ("cifar10_resnet20", "sgdm", 128, 200, 5, dict(learning_rate=0.5, weight_decay=1e-4), None),
        (
            "cifar10_resnet20_b2048",
            "sgdm",
            2048,
            200,
            5,
            dict(learning_rate=4.8, weight_decay=1e-4),
            dict(learning_rate=16.0, weight_decay=1e-4),
        ),
        (
            "cifar10_resnet20",
            "adamw",
            128,
            200,
            5,
            dict(learning_rate=5e-2, weight_decay=1e-2),
            None,
        ),
        (
            "cifar10_resnet20_b2048",
            "adamw",
            2048,
            200,
            5,
            dict(learning_rate=1.6e-1, weight_decay=1e-2),
            dict(learning_rate=0.8, weight_decay=1e-2),
        ),
        ("cifar10_resnet20", "lion", 128, 200, 5, dict(learning_rate=5e-4, weight_decay=1.0), None),
        (
            "cifar10_resnet20_b2048",
            "lion",
            2048,
            200,
            5,
            dict(learning_rate=1.6e-2, weight_decay=1.0),
            dict(learning_rate=8e-2, weight_decay=1.0),
        ),
        ("imagenet_resnet50", "sgdm", 256, 90, 5, dict(learning_rate=0.1, weight_decay=1e-4), None),
        (
            "imagenet_deit_tiny",
            "adamw",
            1024,
            300,
            5,
            dict(learning_rate=5e-4, weight_decay=5e-2),
            dict(learning_rate=5e-4, weight_decay=1e-1),
        ),
        (
            "cifar10_deit_tiny",
            "adamw",
            64,
            600,
            5,
            dict(learning_rate=5e-4, weight_decay=5e-2),
            None,
        ),
        (
            "wikitext_gpt",
            "adamw",
            55,
            None,
            0,
            dict(learning_rate=5e-3, weight_decay=0.5, b2=0.95),
            None,
        ),
    ]
    out = {}
    for bench, base, batch, epochs, warmup, zero, best in rows:
        for opt in (base, "rv_" + base):
            for suffix, hp in (("", zero), ("/best_shot", best)):
                if hp is None:
                    continue
                if opt in ("sgdm", "rv_sgdm"):
                    hp = {**hp, "momentum": 0.9}
                name = f"kosson2024/{bench}/{opt}{suffix}"
                out[name] = Preset(
                    name=name,
                    optimizer=opt,
                    hyperparams=MappingProxyType(dict(hp)),
                    schedule="cosine",
                    source=source,
                    batch_size=batch,
                    epochs=epochs,
                    warmup_epochs=warmup,
                    steps=15000 if bench == "wikitext_gpt" else None,
                )
    return out


PRESETS: Mapping[str, Preset] = MappingProxyType({**_roburin(), **_kosson()})


def names(optimizer: str | None = None, benchmark: str | None = None) -> list[str]:
    """Preset names, optionally only those of one optimizer and/or benchmark.

    Args:
      optimizer: keep the presets of this alias only.
      benchmark: keep the presets of this benchmark only.

    Returns:
      The names, sorted.

    Example:
      >>> from optax_sphere import presets
      >>> all(presets.get(n).optimizer == "sgdm_rt" for n in presets.names("sgdm_rt"))
      True

    References:
      Each preset's ``source`` field.
    """
    return [
        n
        for n, p in PRESETS.items()
        if (optimizer is None or p.optimizer == optimizer)
        and (benchmark is None or n.split("/")[1] == benchmark)
    ]


def get(name: str) -> Preset:
    """The preset called ``name`` (``ValueError`` listing close names otherwise).

    Args:
      name: a preset's name (see :func:`names`).

    Returns:
      The :class:`Preset`.

    Raises:
      ValueError: no preset has that name.

    Example:
      >>> from optax_sphere import presets
      >>> preset = presets.get(presets.names("adam_srt")[0])
      >>> preset.optimizer
      'adam_srt'

    References:
      Each preset's ``source`` field names the paper, table and section it comes from.
    """
    try:
        return PRESETS[name]
    except KeyError:
        close = [n for n in PRESETS if name.split("/")[-1] in n][:8]
        raise ValueError(
            f"unknown preset {name!r}; for instance {close or list(PRESETS)[:8]}."
        ) from None


def build(name: str, **overrides: Any) -> optax.GradientTransformation:
    """``get(name).build(**overrides)``.

    Args:
      name: a preset's name.
      **overrides: keyword arguments of the alias that replace the preset's (``groups``
        above all).

    Returns:
      The alias's ``optax.GradientTransformation``.

    Example:
      >>> from optax_sphere import presets
      >>> tx = presets.build(presets.names("adam_srt")[0], groups="unit")

    References:
      The preset's ``source`` field.
    """
    return get(name).build(**overrides)
