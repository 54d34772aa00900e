"""The host side of the diagnostics: :func:`metrics`, the flat ``{"path/stat/reduction":
value}`` dict for loggers, and :class:`History`, the record of a run that
:mod:`optax_sphere.plots` draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_sphere._paths import path_str
from optax_sphere.diagnostics.monitoring import find_monitor_state
from optax_sphere.diagnostics.statistics import RADIAL_GRADIENT_THRESHOLD, GeometryStats

__all__ = ["History", "metrics"]

PyTree = Any


REDUCTIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "mean": jnp.mean,
    "min": jnp.min,
    "max": jnp.max,
}


def _as_stats(source: Any) -> GeometryStats:
    if isinstance(source, GeometryStats):
        return source
    return find_monitor_state(source).stats


def _named_leaves(tree: PyTree) -> list[tuple[str, jax.Array]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), v) for p, v in leaves]


def metrics(
    source: Any,
    *,
    fields: Sequence[str] | None = None,
    reductions: Iterable[str] = ("mean", "min", "max"),
    prefix: str = "",
    flag_threshold: float = RADIAL_GRADIENT_THRESHOLD,
) -> dict[str, jax.Array]:
    """Flat ``{"<prefix><param/path>/<stat>/<reduction>": scalar}`` dict for loggers.

    Each grouped parameter gets the ``mean``, ``min`` and ``max`` over its groups of every
    stat (``fields`` picks a subset); with ``radial_gradient`` recorded, also
    ``<path>/radial_gradient/flagged``: the fraction of the parameter's groups whose radial
    gradient exceeds ``flag_threshold`` (0 when every group is radially invariant).
    ``source`` is a :class:`GeometryStats` or any optimizer
    state holding one :class:`MonitorState`. The values are jax scalars (the function also
    runs under ``jit``); ``jax.device_get(metrics(state))`` gives numpy scalars for
    TensorBoard, CLU or W&B style loggers.

    Args:
      source: a :class:`GeometryStats`, or an optimizer state holding one
        :class:`MonitorState`.
      fields: the stats to report (``None``: every recorded one).
      reductions: over the groups of each parameter: ``"mean"``, ``"min"``, ``"max"``.
      prefix: prepended to every key.
      flag_threshold: the radial gradient above which a group is flagged.

    Returns:
      A flat dict of jax scalars.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> grads = {"w": jnp.array([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
      >>> tx = optax.chain(optax.sgd(0.1), optax_sphere.monitor(groups={"w": "unit"}))
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> "w/angular_update/mean" in optax_sphere.metrics(state)
      True

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 3.
    """
    stats = _as_stats(source)
    names = GeometryStats._fields if fields is None else tuple(fields)
    for name in names:
        if name not in GeometryStats._fields:
            raise ValueError(f"unknown stat {name!r}; expected one of {GeometryStats._fields}.")
    reductions = tuple(reductions)
    for red in reductions:
        if red not in REDUCTIONS:
            raise ValueError(f"unknown reduction {red!r}; expected one of {sorted(REDUCTIONS)}.")
    out = {}
    for name in names:
        for path, value in _named_leaves(getattr(stats, name)):
            if value.size == 0:
                continue
            for red in reductions:
                out[f"{prefix}{path}/{name}/{red}"] = REDUCTIONS[red](value)
            if name == "radial_gradient":
                flagged = jnp.mean((value > flag_threshold).astype(jnp.float32))
                out[f"{prefix}{path}/radial_gradient/flagged"] = flagged
    return out


class History:
    """Records the per-group stats of a run, on the host, for plots and summaries.

    ``history.record(step, opt_state)`` after an optimizer step (outside ``jit``) stores the
    stats of the :class:`MonitorState` found in ``opt_state`` (or a :class:`GeometryStats`)
    as numpy arrays. ``keep_groups=False`` keeps only the per-layer reductions.
    """

    def __init__(self, keep_groups: bool = True):
        self.keep_groups = keep_groups
        self.steps: list[int] = []
        self.scalars: dict[str, list[float]] = {}
        self.groups: dict[str, dict[str, list[np.ndarray]]] = {}

    def record(self, step: int, source: Any) -> dict[str, float]:
        """Stores the stats of ``source`` at ``step``; returns the flat metrics (floats)."""
        stats = jax.device_get(_as_stats(source))
        flat = {k: float(v) for k, v in metrics(stats).items()}
        new_flags = [
            k[: -len("/radial_gradient/flagged")]
            for k, v in flat.items()
            if k.endswith("/radial_gradient/flagged")
            and v > 0
            and k not in self.scalars
            or k.endswith("/radial_gradient/flagged")
            and v > 0
            and np.nanmax(self.scalars[k]) == 0
        ]
        if new_flags:
            warnings.warn(
                f"step {step}: groups of {new_flags} are not radially invariant (radial part of "
                f"the gradient above {RADIAL_GRADIENT_THRESHOLD:g}): the model does not "
                "normalise them; check the groups (optax_sphere.find_groups).",
                stacklevel=2,
            )
        self.steps.append(int(step))
        for key, value in flat.items():
            self.scalars.setdefault(key, [np.nan] * (len(self.steps) - 1)).append(value)
        for values in self.scalars.values():
            if len(values) < len(self.steps):
                values.append(np.nan)
        if self.keep_groups:
            for name in GeometryStats._fields:
                for path, value in _named_leaves(getattr(stats, name)):
                    self.groups.setdefault(name, {}).setdefault(path, []).append(
                        np.asarray(value).reshape(-1)
                    )
        return flat

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def radial_gradient_measured(self) -> bool:
        """Whether a recorded step measured ``radial_gradient`` (:func:`monitored` does;
        :func:`monitor` at the end of a chain sees no gradient and does not)."""
        return any(key.endswith("/radial_gradient/flagged") for key in self.scalars)

    def flagged(self) -> list[str]:
        """Paths of the grouped parameters with a group flagged as not radially invariant
        (``radial_gradient`` above :data:`RADIAL_GRADIENT_THRESHOLD`) at some recorded step.

        Raises:
          ValueError: no recorded step measured the radial gradient (nothing was checked,
            which is not the same as nothing flagged; see :attr:`radial_gradient_measured`).
        """
        if not self.radial_gradient_measured:
            raise ValueError(
                "History.flagged(): the radial gradient was not measured at any recorded step "
                f"({len(self.steps)} recorded), so no group was checked. `monitor()` at the end "
                "of a chain sees the updates, not the gradients: wrap the optimizer in "
                "`optax_sphere.monitored(tx, groups=...)` to measure it."
            )
        out = []
        for key, values in self.scalars.items():
            if key.endswith("/radial_gradient/flagged") and np.nanmax(values) > 0:
                out.append(key[: -len("/radial_gradient/flagged")])
        return out

    def layers(self) -> list[str]:
        """Paths of the grouped parameters, in tree order."""
        seen = []
        for key in self.scalars:
            path = key.rsplit("/", 2)[0]
            if path not in seen:
                seen.append(path)
        return seen

    def series(self, path: str, stat: str, reduction: str = "mean") -> np.ndarray:
        """``(steps,)`` values of one per-layer reduction of a stat."""
        key = f"{path}/{stat}/{reduction}"
        if key not in self.scalars:
            raise KeyError(f"no recorded metric {key!r}.")
        return np.asarray(self.scalars[key])

    def per_group(self, path: str, stat: str) -> np.ndarray:
        """``(steps, groups)`` values of a stat for every group of one parameter."""
        if not self.keep_groups:
            raise ValueError("this History was created with keep_groups=False.")
        try:
            return np.stack(self.groups[stat][path])
        except KeyError:
            raise KeyError(f"no per-group record of {stat!r} for {path!r}.") from None

    def unit_spread(
        self, path: str, stat: str = "angular_update", tail: float = 0.5
    ) -> tuple[float, float, float]:
        """``(min, mean, max)`` over the groups of ``path`` of each group's average of
        ``stat`` over the last ``tail`` fraction of the records: how balanced the groups are
        (Kosson et al. fig. 8: equal for AdamW, spread for Adam + L2)."""
        values = self.per_group(path, stat)
        start = min(int(len(values) * (1 - tail)), len(values) - 1)
        means = values[start:].mean(axis=0)
        return float(means.min()), float(means.mean()), float(means.max())
