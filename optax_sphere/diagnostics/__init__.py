"""Seeing the geometry: per-group diagnostics of any optimizer step.

For every radially invariant group (Roburin et al. sec. 2; ``x = r u``, ``r = ||x||``) and one step
``x_k -> x_{k+1} = x_k + Delta``, the quantities of the papers, as one scalar per group:

* ``radius``: ``r_k``;
* ``angular_update``: ``angle(x_k, x_{k+1})`` (Kosson et al. eq. 5), in radians;
* ``update_norm``: ``||Delta||``; its root mean square over steps is the RMS update size
  ``eta_g`` of Kosson et al. eq. 4 (there ``Delta`` is the gradient part only; here it is the
  whole step, weight decay included);
* ``radius_ratio``: ``r_{k+1} / r_k`` (Roburin et al. eq. 13);
* ``radial_term``: ``A_k <c_k, u_k> = -<Delta, x_k> / r_k^2``, which app. C.1.2 of Roburin et al.
  tracks to check ``1 - A_k <c_k, u_k> > 0``;
* ``taylor_term``: ``eta_e ||c_perp||`` (Roburin et al. app. C.1.2, the argument of the Taylor
  expansion of theorem 2; ``= tan(angular_update)`` by eq. 37);
* ``effective_lr`` and ``direction_norm``: the effective learning rate ``eta_e`` and the norm
  of the effective direction ``||c_perp||`` of theorem 2 (eq. 11, table 1);
* ``radial_gradient``: ``|<g_k, x_k>| / (||g_k|| ||x_k||)``, the radial part of the gradient,
  which is 0 for a radially invariant group (Roburin et al. eq. 2: the gradient of a
  scale-invariant loss is orthogonal to the weights) and clearly not for a group that is
  wrongly declared invariant (a normalisation removed from the model, a wrong layout).
  :func:`metrics` adds ``<path>/radial_gradient/flagged``, the fraction of groups of a
  parameter above :data:`RADIAL_GRADIENT_THRESHOLD`, :meth:`History.flagged` lists them and
  :mod:`optax_sphere.plots` marks them.

The first six are geometric: they need only the parameters before and after the step, so they
work with any optimizer. The last two split ``eta_e ||c_perp||`` between the optimizer and the
direction, and need the optimizer to be of the generic form of Roburin et al. eqs. 3-4,
``x_{k+1} = x_k - eta_k a_k / b_k``, and its per-group *step scale*
``s_k = eta_k / (d^{-1/2} ||b_k||)``. Then ``A_k = s_k / r_k^2``,
``eta_e = s_k / <x_k, x_{k+1}>`` and ``||c_perp|| = r_k ||Delta_perp|| / s_k``. For SGD and
SGD with momentum (``b = 1``) the step scale is the learning rate; for optax's Adam,
:func:`adam_step_scale` reads it from the optimizer state.

Three ways to get them:

* :func:`geometry_stats`: a pure function of two parameter trees (any optimizer);
* :func:`monitor`: a transformation for the end of any ``optax.chain`` that records the stats
  of each step into its state (no host transfer inside ``update``);
* :func:`monitored`: a wrapper around a whole optimizer whose step scale is read from the
  optimizer state (Adam-like optimizers).

Outside ``jit``, :func:`metrics` turns a state into a flat ``{"path/stat/reduction": value}``
dict for loggers and :class:`History` records a run for :mod:`optax_sphere.plots`.
"""

from optax_sphere.diagnostics.history import History, metrics
from optax_sphere.diagnostics.monitoring import (
    MonitoredState,
    MonitorState,
    find_monitor_state,
    monitor,
    monitored,
)
from optax_sphere.diagnostics.statistics import (
    RADIAL_GRADIENT_THRESHOLD,
    GeometryStats,
    adam_step_scale,
    geometry_stats,
)

__all__ = [
    "GeometryStats",
    "MonitorState",
    "MonitoredState",
    "History",
    "geometry_stats",
    "monitor",
    "monitored",
    "RADIAL_GRADIENT_THRESHOLD",
    "adam_step_scale",
    "find_monitor_state",
    "metrics",
]
