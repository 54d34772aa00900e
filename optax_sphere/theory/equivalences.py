"""Optimizers that follow the same directions: the SGD equivalences of Roburin et al.

For radially invariant groups only the direction ``u = x / ||x||`` matters, and two schemes
whose effective learning rates and directions agree at every step visit the same directions
(Roburin's thesis, Lemma 3, eq. 3.43). Two consequences, returned here as ready-to-use
hyperparameters:

* :func:`l2_equivalent_schedule` (Roburin's thesis eq. 3.44, Roburin et al. eq. 44): SGD with L2
  ``wd`` and learning rate ``lr`` equals SGD without L2 under the schedule
  ``lr (1 - lr wd)^(-2k-1)``, exactly.
* :func:`sgd_to_adagradg` (Roburin et al. Theorem 4, Roburin's thesis Theorem 4): SGD with L2
  equals AdaGradG on the unit sphere, to second order in the step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["l2_equivalent_schedule", "sgd_to_adagradg"]


def _check(learning_rate: float, weight_decay: float) -> None:
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"`learning_rate` must be finite and > 0, got {learning_rate!r}.")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"`weight_decay` must be finite and >= 0, got {weight_decay!r}.")
    if not learning_rate * weight_decay < 1:
        raise ValueError(
            f"`learning_rate * weight_decay` must be < 1 (got {learning_rate * weight_decay!r}): "
            "SGD with L2 then shrinks the weights through zero."
        )


def l2_equivalent_schedule(learning_rate: float, weight_decay: float) -> optax.Schedule:
    r"""Schedule under which SGD *without* L2 follows SGD with L2 on invariant groups.

    Roburin's thesis eq. 3.44 (Roburin et al. eq. 44): SGD with constant ``learning_rate`` ``eta``
    and L2 ``weight_decay`` ``lambda``, ``x <- x - eta (grad + lambda x)``, started at ``x_0``, and
    SGD without L2 under

    .. math:: \eta_k = \eta (1 - \eta\lambda)^{-2k-1}

    started at the same ``x_0`` visit the same directions ``u_k`` at every step (exactly, for
    gradients that are -1 homogeneous and tangent, as behind a normalisation). The radii differ:
    ``r_k / r_k^{L2} = (1 - eta lambda)^{-k}``. Returns an ``optax.Schedule`` (step count ->
    learning rate), computed as ``exp(-(2k+1) log(1 - eta lambda))``.

    Args:
      learning_rate: the constant learning rate :math:`\eta` of SGD with L2.
      weight_decay: its L2 coefficient :math:`\lambda`.

    Returns:
      An ``optax.Schedule`` for SGD without L2.

    Example:
      >>> from optax_sphere.theory import l2_equivalent_schedule
      >>> schedule = l2_equivalent_schedule(0.1, 0.01)
      >>> round(float(schedule(0)), 6), round(float(schedule(10)), 6)  # 0.1 / 0.999^(2k+1)
      (0.1001, 0.102123)

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eq. 44; Roburin, PhD
      thesis, eq. 3.44.
    """
    _check(learning_rate, weight_decay)
    log_factor = -math.log1p(-learning_rate * weight_decay)

    def schedule(count: Any) -> jax.Array:
        k = jnp.asarray(count)
        dtype = jnp.result_type(float)
        return learning_rate * jnp.exp((2 * k.astype(dtype) + 1) * log_factor)

    return schedule


def sgd_to_adagradg(learning_rate: float, weight_decay: float, radius: Any) -> dict[str, Any]:
    r"""AdaGradG hyperparameters equivalent to SGD with L2 (Roburin et al. Theorem 4, Roburin's
    thesis Theorem 4).

    SGD with constant ``learning_rate`` ``eta`` and L2 ``weight_decay`` ``lambda`` started from
    ``x_0 = r_0 u_0`` is scheme-equivalent, to second order in the step, to
    :func:`optax_sphere.adagradg` started from ``u_0`` with

    .. math::
        \beta = (1 - \eta\lambda)^4,\quad \eta_k = (2\beta)^{-1/2},\quad
        v_0 = \frac{r_0^4}{2 \eta^2 \beta^{1/2}}.

    ``radius`` is ``r_0``: a number, or a pytree (for example the per-group norms of the
    initial params, ``keepdims``) which gives a pytree ``v0`` of the same structure. Returns the
    keyword arguments of ``adagradg``: ``{"learning_rate", "decay", "v0"}`` (``decay`` is
    :math:`\beta`). With ``weight_decay = 0`` (``decay = 1``) the equivalence holds too
    (Roburin's thesis states it for ``lambda >= 0``).

    Args:
      learning_rate: the constant learning rate :math:`\eta` of SGD.
      weight_decay: its L2 coefficient :math:`\lambda`.
      radius: the initial radius :math:`r_0` (a number or a pytree).

    Returns:
      The keyword arguments of :func:`optax_sphere.adagradg`.

    Example:
      >>> import optax_sphere
      >>> from optax_sphere.theory import sgd_to_adagradg
      >>> hyper = sgd_to_adagradg(0.1, 1e-4, radius=1.0)
      >>> sorted(hyper)
      ['decay', 'learning_rate', 'v0']
      >>> tx = optax_sphere.adagradg(**hyper, groups="unit")

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", Theorem 4; Roburin, PhD
      thesis, Theorem 4.
    """
    _check(learning_rate, weight_decay)
    beta = (1.0 - learning_rate * weight_decay) ** 4
    scale = 1.0 / (2.0 * learning_rate**2 * math.sqrt(beta))
    v0 = jax.tree.map(lambda r: jnp.asarray(r) ** 4 * scale, radius)
    if isinstance(radius, (int, float)):
        if not radius > 0:
            raise ValueError(f"`radius` must be > 0, got {radius!r}.")
        v0 = float(radius) ** 4 * scale
    return {"learning_rate": (2.0 * beta) ** -0.5, "decay": beta, "v0": v0}
