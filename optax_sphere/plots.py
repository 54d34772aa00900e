"""Plots of recorded geometry (matplotlib, an optional extra: ``optax_sphere[examples]``).

Every function takes a :class:`~optax_sphere.diagnostics.History` and draws on a given
matplotlib ``Axes`` (or a new figure); predictions are plain numbers so any source can
provide them, e.g. ``optax_sphere.theory.equilibrium(...).angular_update``:

* :func:`plot_angular_updates`: the mean angular update per step of each layer over training,
  with equilibrium predictions as dashed lines (Kosson et al. fig. 3 right, fig. 4 right);
* :func:`plot_weight_norms`: the mean weight norm of the groups of each layer (Kosson
  et al. fig. 3);
* :func:`plot_unit_angular_updates`: the angular updates of the individual units of one layer,
  to see balanced (all alike, AdamW) or imbalanced (spread, Adam + L2) rotation
  (Kosson et al. fig. 8);
* :func:`geometry_figure`: the three side by side for several runs, saved to PNG / SVG.

matplotlib is imported inside the functions, so importing this module does not need it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from optax_sphere.diagnostics import History

__all__ = [
    "plot_angular_updates",
    "plot_weight_norms",
    "plot_unit_angular_updates",
    "geometry_figure",
    "smooth",
]

Prediction = Any  # None, a number, an array over the recorded steps, or {layer: one of those}


def _new_axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    from matplotlib.figure import Figure

    return Figure(figsize=(5, 3.5), layout="constrained").subplots()


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` records (NaN for the first ``window - 1``);
    along axis 0, so it smooths ``(steps,)`` and ``(steps, units)`` arrays alike.

    Args:
      values: the records, steps along axis 0.
      window: the number of records averaged.

    Returns:
      An array like ``values``.

    Example:
      >>> import numpy as np
      >>> from optax_sphere.plots import smooth
      >>> smooth(np.array([1.0, 2.0, 3.0, 4.0]), 2).tolist()
      [nan, 1.5, 2.5, 3.5]

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, fig. 8 (curves smoothed over steps).
    """
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    csum = np.cumsum(np.nan_to_num(values), axis=0)
    out = np.full_like(values, np.nan)
    if len(values) >= window:
        head = csum[window - 1 : window]
        tail = csum[window:] - csum[:-window]
        out[window - 1 :] = np.concatenate([head, tail], axis=0) / window
    return out


def _label(path: str) -> str:
    return path[len("params/") :] if path.startswith("params/") else path


def _prediction_for(prediction: Prediction, layer: str) -> Any:
    if isinstance(prediction, Mapping):
        return prediction.get(layer)
    return prediction


def _draw_prediction(ax: Any, steps: np.ndarray, value: Any, **kwargs: Any) -> None:
    if value is None:
        return
    value = np.asarray(value, dtype=float)
    if value.ndim == 0:
        ax.axhline(float(value), linestyle="--", **kwargs)
    else:
        if value.shape != steps.shape:
            raise ValueError(
                f"a prediction over time needs one value per recorded step ({steps.shape}), "
                f"got shape {value.shape}."
            )
        ax.plot(steps, value, linestyle="--", **kwargs)


def _layer_lines(
    history: History,
    stat: str,
    ax: Any,
    layers: Sequence[str] | None,
    prediction: Prediction,
    window: int,
) -> Any:
    steps = np.asarray(history.steps)
    layers = history.layers() if layers is None else list(layers)
    colors = _colors(len(layers))
    if isinstance(prediction, Mapping):
        values = [prediction.get(layer) for layer in layers]
        if all(v is not None and np.ndim(v) == 0 for v in values) and len(set(values)) == 1:
            prediction = values[0]  # the same for every layer: one red line
    shared = prediction is not None and not isinstance(prediction, Mapping)
    flagged = set(history.flagged()) if history.radial_gradient_measured else set()
    for color, layer in zip(colors, layers):
        # a group that is not radially invariant: its angles and norms mean nothing
        mark = layer in flagged
        label = _label(layer) + (" (NOT radially invariant)" if mark else "")
        ax.plot(steps, smooth(history.series(layer, stat), window), color=color, lw=1.2,
                label=label, linestyle=":" if mark else "-")  # fmt: skip
        if not shared:
            _draw_prediction(ax, steps, _prediction_for(prediction, layer), color=color, lw=1)
    if shared:
        _draw_prediction(ax, steps, prediction, color="red", lw=1.2, label="prediction")
    ax.set_xlabel("step")
    return ax


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(n - 1, 1)) for i in range(n)]


def plot_angular_updates(
    history: History,
    *,
    prediction: Prediction = None,
    layers: Sequence[str] | None = None,
    window: int = 1,
    log: bool = True,
    ax: Any = None,
) -> Any:
    """Mean angular update per step of each layer (radians) over the recorded steps.

    Args:
      history: a recorded run.
      prediction: dashed line(s): a number or an array over the recorded steps (one red line
        for all layers), or ``{layer: number or array}`` (a line per layer in its colour).
      layers: which grouped parameters (paths as in :meth:`History.layers`); all by default.
      window: trailing moving average over this many records.
      log: logarithmic y axis.
      ax: a matplotlib ``Axes`` to draw on; a new figure otherwise.

    Returns:
      The ``Axes``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> from optax_sphere import plots
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> tx = optax.chain(optax.sgd(0.1), optax_sphere.monitor(groups={"w": "unit"}))
      >>> state, history = tx.init(params), optax_sphere.History()
      >>> for step in range(3):
      ...     updates, state = tx.update({"w": 0.1 * params["w"][::-1]}, state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     _ = history.record(step, state)
      >>> ax = plots.plot_angular_updates(history)

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, fig. 8 (angular updates per layer against the equilibrium).
    """
    ax = _layer_lines(history, "angular_update", _new_axes(ax), layers, prediction, window)
    ax.set_ylabel("angular update (rad / step)")
    if log:
        ax.set_yscale("log")
    return ax


def plot_weight_norms(
    history: History,
    *,
    prediction: Prediction = None,
    layers: Sequence[str] | None = None,
    log: bool = False,
    ax: Any = None,
) -> Any:
    """Mean norm of the groups of each layer over the recorded steps (predictions dashed,
    as in :func:`plot_angular_updates`).

    Args:
      history: a recorded run.
      prediction: dashed line(s), as in :func:`plot_angular_updates`.
      layers: which grouped parameters; all by default.
      log: logarithmic y axis.
      ax: a matplotlib ``Axes`` to draw on; a new figure otherwise.

    Returns:
      The ``Axes``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> from optax_sphere import plots
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> tx = optax.chain(optax.sgd(0.1), optax_sphere.monitor(groups={"w": "unit"}))
      >>> state, history = tx.init(params), optax_sphere.History()
      >>> for step in range(3):
      ...     updates, state = tx.update({"w": 0.1 * params["w"][::-1]}, state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     _ = history.record(step, state)
      >>> ax = plots.plot_weight_norms(history)

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, eq. 37 (the equilibrium norm).
    """
    ax = _layer_lines(history, "radius", _new_axes(ax), layers, prediction, 1)
    ax.set_ylabel("weight norm (mean over units)")
    if log:
        ax.set_yscale("log")
    return ax


def plot_unit_angular_updates(
    history: History,
    layer: str,
    *,
    prediction: Any = None,
    window: int = 1,
    max_units: int = 6,
    log: bool = True,
    ax: Any = None,
) -> Any:
    """Angular updates of the individual units of one layer (Kosson et al. fig. 8 right).

    Draws the band between the smallest and the largest unit at each step, the units whose
    time-averaged angular update is the smallest, the median and the largest (up to
    ``max_units`` of them, thin coloured lines), the layer mean (black) and ``prediction``
    (red dashed; a number or an array over the recorded steps). Balanced rotation shows as a
    thin band around the mean; imbalanced rotation as a wide one.

    Args:
      history: a recorded run.
      layer: the grouped parameter whose units are drawn.
      prediction: a number or an array over the recorded steps (red dashed).
      window: trailing moving average over this many records.
      max_units: how many individual units to draw.
      log: logarithmic y axis.
      ax: a matplotlib ``Axes`` to draw on; a new figure otherwise.

    Returns:
      The ``Axes``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> from optax_sphere import plots
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> tx = optax.chain(optax.sgd(0.1), optax_sphere.monitor(groups={"w": "unit"}))
      >>> state, history = tx.init(params), optax_sphere.History()
      >>> for step in range(3):
      ...     updates, state = tx.update({"w": 0.1 * params["w"][::-1]}, state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     _ = history.record(step, state)
      >>> ax = plots.plot_unit_angular_updates(history, "w")

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, fig. 8 (right).
    """
    ax = _new_axes(ax)
    steps = np.asarray(history.steps)
    per_unit = smooth(history.per_group(layer, "angular_update"), window)
    finite = np.isfinite(per_unit).all(axis=1)
    ax.fill_between(
        steps[finite],
        per_unit[finite].min(axis=1),
        per_unit[finite].max(axis=1),
        color="0.85",
        label="all units (min-max)",
    )
    order = np.argsort(np.nanmean(per_unit, axis=0))
    picks = order[np.unique(np.linspace(0, len(order) - 1, max_units).round().astype(int))]
    for color, unit in zip(_colors(len(picks)), picks):
        ax.plot(steps, per_unit[:, unit], color=color, lw=0.8, alpha=0.9)
    ax.plot(steps, np.mean(per_unit, axis=1), color="black", lw=1.5, label="layer mean")
    _draw_prediction(ax, steps, prediction, color="red", lw=1.2, label="prediction")
    ax.set_xlabel("step")
    ax.set_ylabel("angular update (rad / step)")
    if log:
        ax.set_yscale("log")
    return ax


def geometry_figure(
    histories: Mapping[str, History],
    *,
    predictions: Mapping[str, Prediction] | None = None,
    norm_predictions: Mapping[str, Prediction] | None = None,
    unit_layer: str | None = None,
    window: int = 1,
    path: str | None = None,
) -> Any:
    """One row per run: angular updates per layer with predictions, weight norms per layer,
    and the angular updates of the units of ``unit_layer`` (default: the first layer).

    Args:
      histories: ``{run name: History}``.
      predictions: ``{run name: prediction}`` for the angular updates (see
        :func:`plot_angular_updates`; a per-layer dict is drawn per layer, and its value for
        ``unit_layer`` on the unit panel).
      norm_predictions: the same for the weight norms.
      unit_layer: the layer of the unit panel.
      window: moving average of the angular updates over this many records.
      path: where to save the figure (the suffix picks the format: ``.png``, ``.svg``, ...).

    Returns:
      The matplotlib ``Figure``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> from optax_sphere import plots
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> tx = optax.chain(optax.sgd(0.1), optax_sphere.monitor(groups={"w": "unit"}))
      >>> state, history = tx.init(params), optax_sphere.History()
      >>> for step in range(3):
      ...     updates, state = tx.update({"w": 0.1 * params["w"][::-1]}, state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     _ = history.record(step, state)
      >>> fig = plots.geometry_figure({"sgd": history})

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, fig. 8.
    """
    from matplotlib.figure import Figure

    predictions = predictions or {}
    norm_predictions = norm_predictions or {}
    fig = Figure(figsize=(15, 3.6 * len(histories)), layout="constrained")
    axes = np.asarray(fig.subplots(len(histories), 3, squeeze=False))
    for row, (name, history) in zip(axes, histories.items()):
        layer = unit_layer or history.layers()[0]
        pred = predictions.get(name)
        plot_angular_updates(history, prediction=pred, window=window, ax=row[0])
        row[0].set_title(f"{name}: angular update per layer")
        plot_weight_norms(history, prediction=norm_predictions.get(name), ax=row[1])
        row[1].set_title(f"{name}: weight norm per layer")
        plot_unit_angular_updates(
            history, layer, prediction=_prediction_for(pred, layer), window=window, ax=row[2]
        )
        row[2].set_title(f"{name}: units of {_label(layer)}")
    axes[0, 0].legend(fontsize=7, loc="best")
    axes[0, 2].legend(fontsize=7, loc="best")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
