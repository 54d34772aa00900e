"""Equilibrium predictions of rotational dynamics (Kosson et al., Table 1 and app. E-I).

With weight decay, the norm of a scale-invariant weight vector ``w`` in ``R^C`` converges to
an equilibrium where the gradient and weight-decay parts of the updates balance on average
(the geometric model of app. E, eq. 28). Then the expected angular update per step
``eta_r = E[angle(w_t, w_{t+1})]`` and the RMS update size ``eta_g`` (eq. 4, the gradient
part only) are constants of the hyperparameters.

Assumptions shared by every formula (app. E, F): a random walk (gradients zero-mean,
independent between steps, with a distribution constant over time), a scale-invariant
``w`` (gradient orthogonal to ``w``, norm inversely proportional to ``||w||``), constant
hyperparameters, bias corrections and ``eps`` negligible (``b^t`` ~ 0), and
``angle ~ ||Delta_g w|| / ||w||`` (small relative updates). Per optimizer:

* AdamW (app. F): ``E[||g_t / sqrt(v_k)||^2] = C`` (each normalised coordinate has unit
  variance);
* SGDM (app. G): no dampening (``m = alpha m + g + wd x``); successive gradients orthogonal;
* Lion (app. H): the coordinates of the sign's argument i.i.d. normal (the sign scales its
  argument by ``sqrt(2/pi) ||sign(n)|| / ||n||``);
* Adam+L2 (app. I.2): a second moment constant over time and coordinates,
  ``v = sqrt((E||g||^2 + wd^2 ||w||^2) / C)`` (eq. 76), a rough approximation.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_sphere._utils import is_traced

__all__ = ["Equilibrium", "equilibrium", "angular_update"]

Optimizer = Literal["adamw", "sgdm", "lion", "adam_l2"]


class Equilibrium(NamedTuple):
    """Predicted equilibrium of one scale-invariant weight vector (``None``: not computable).

    ``angular_update``: expected angle between successive weights, radians per step.
    ``weight_norm``: equilibrium norm ``||w||``.
    ``rms_update``: root-mean-square size of the gradient part of one update (eq. 4).
    """

    angular_update: Any
    weight_norm: Any
    rms_update: Any


def _xp(*values: Any):
    traced = any(isinstance(v, jax.Array) for v in values)
    return jnp if traced else np


def _out(v: Any) -> Any:
    return float(v) if isinstance(v, (np.ndarray, np.generic)) and np.ndim(v) == 0 else v


def angular_update(
    optimizer: Literal["adamw", "sgdm", "lion"],
    learning_rate: Any,
    weight_decay: Any,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    momentum: float = 0.9,
) -> Any:
    r"""Table 1's expected equilibrium angular update, radians per step (Kosson et al.).

    :math:`\sqrt{2\eta\lambda(1-b_1)/(1+b_1)}` (AdamW, eq. 37-40),
    :math:`\sqrt{2\eta\lambda/(1+\alpha)}` (SGDM, eq. 47-51),
    :math:`\sqrt{\pi\eta\lambda K}` with :math:`K = (1-b_1)^2 + b_1^2(1-b_2)/(1+b_2)`
    (Lion, eq. 72). Unlike :func:`equilibrium` it does not check its inputs, so traced values
    and a weight decay of 0 (no rotation) pass; the rotational variants use it for their
    ``eta_r``. Python floats for number inputs, arrays for array inputs.

    Args:
      optimizer: ``"adamw"``, ``"sgdm"`` or ``"lion"``.
      learning_rate, weight_decay: :math:`\eta, \lambda` (numbers, arrays or traced values).
      b1, b2: Adam's or Lion's coefficients; momentum: SGDM's :math:`\alpha`.

    Returns:
      The angular update, in radians per step.

    Example:
      >>> round(angular_update("adamw", 1e-3, 0.1, b1=0.9), 6)
      0.003244

    References:
      Kosson et al., "Rotational Equilibrium", ICML 2024, Table 1, eqs. 37-40, 47-51 and 72.
    """
    xp = _xp(learning_rate, weight_decay)
    lr, wd = learning_rate, weight_decay
    if optimizer == "adamw":
        return _out(xp.sqrt(2 * lr * wd * (1 - b1) / (1 + b1)))
    if optimizer == "sgdm":
        return _out(xp.sqrt(2 * lr * wd / (1 + momentum)))
    if optimizer == "lion":
        k = (1 - b1) ** 2 + b1**2 * (1 - b2) / (1 + b2)
        return _out(xp.sqrt(math.pi * lr * wd * k))
    raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adamw', 'sgdm' or 'lion'.")


def _adam_l2_sq_norm(lr, wd, dim, g2, xp):
    """Positive real root ``w = ||w||^2`` of eq. 84: ``4 wd^2 w^3 - C lr^2 wd^2 w^2 - C lr^2
    g2 = 0`` (``g2 = E||g~||^2``). The cubic has exactly one positive root (it is negative
    at 0, where it has a local maximum, and for every negative ``w``). Cardano's formula,
    then two Newton steps to polish."""
    a = 4 * wd**2
    b = -dim * lr**2 * wd**2
    d = -dim * lr**2 * g2
    # depressed cubic in y = w + b / (3a): y^3 + p y + q = 0
    p = -(b**2) / (3 * a**2)
    q = 2 * b**3 / (27 * a**3) + d / a
    disc = xp.sqrt((q / 2) ** 2 + (p / 3) ** 3)  # > 0: one real root
    w = xp.cbrt(-q / 2 + disc) + xp.cbrt(-q / 2 - disc) - b / (3 * a)
    for _ in range(2):
        f = a * w**3 + b * w**2 + d
        w = w - f / (3 * a * w**2 + 2 * b * w)
    return w


def equilibrium(
    optimizer: Optimizer,
    *,
    learning_rate: Any,
    weight_decay: Any,
    dim: int,
    b1: float = 0.9,
    b2: float = 0.999,
    momentum: float = 0.9,
    grad_norm: Any = None,
) -> Equilibrium:
    r"""Equilibrium angular update, weight norm and RMS update of a scale-invariant vector.

    Kosson et al., Table 1 and app. F-I, for a vector of dimension ``C = dim`` (one group)
    trained with learning rate :math:`\eta` and weight decay :math:`\lambda`:

    * ``"adamw"``: angular update :math:`\sqrt{2\eta\lambda(1-b_1)/(1+b_1)}`, weight norm
      :math:`\sqrt{\eta C/(2\lambda-\eta\lambda^2)}` (eq. 37), RMS update
      :math:`\eta\sqrt{C(1-b_1)/(1+b_1)}` (eq. 40);
    * ``"sgdm"``: :math:`\sqrt{2\eta\lambda/(1+\alpha)}`,
      :math:`(\eta\tilde g^2/(2\lambda(1-\alpha)-\eta\lambda^2))^{1/4}` (eq. 47),
      :math:`\eta\tilde g/(\|w\|\sqrt{1-\alpha^2})` (eq. 51);
    * ``"lion"``: :math:`\sqrt{\pi\eta\lambda K}` (eq. 72),
      :math:`\sqrt{2\eta C/(\pi(2\lambda-\eta\lambda^2)K)}` (eq. 70), :math:`\eta\sqrt C`
      (eq. 71);
    * ``"adam_l2"``: weight norm :math:`\sqrt{w}` with ``w`` the real root of eq. 84
      :math:`4\lambda^2w^3 - C\eta^2\lambda^2w^2 - C\eta^2\tilde g^2 = 0`, RMS update of
      eq. 87, angular update ``rms_update / weight_norm``;

    with :math:`K = (1-b_1)^2 + b_1^2(1-b_2)/(1+b_2)`, :math:`\alpha` = ``momentum`` and
    :math:`\tilde g` = ``grad_norm``. The angular updates are Table 1's (the values the
    rotational variants enforce); they equal ``rms_update / weight_norm`` up to the factor
    :math:`\sqrt{1-\eta\lambda/2}` (:math:`\sqrt{1-\eta\lambda/(2(1-\alpha))}` for SGDM)
    that Table 1 drops (:math:`\eta\lambda \ll 1`); the weight norms keep it.

    Args:
      optimizer: ``"adamw"``, ``"sgdm"`` (SGD with momentum and L2, no dampening),
        ``"lion"`` or ``"adam_l2"`` (Adam with L2 regularisation).
      learning_rate, weight_decay: :math:`\eta, \lambda` (numbers or arrays; traced jax
        values are accepted).
      dim: dimension ``C`` of the vector.
      b1, b2: Adam's / Lion's moment coefficients; momentum: SGDM's :math:`\alpha`.
      grad_norm: :math:`\sqrt{E\|\tilde g\|^2}`, the RMS gradient norm of the vector at unit
        weight norm (the gradient norm scales as ``1/||w||``). Needed for ``"adam_l2"`` and
        for the weight norm and RMS update of ``"sgdm"``; those fields are ``None`` without it.

    Returns:
      :class:`Equilibrium` (Python floats for number inputs).

    Example:
      >>> from optax_sphere.theory import equilibrium
      >>> eq = equilibrium("adamw", learning_rate=1e-3, weight_decay=0.1, dim=256)
      >>> round(eq.angular_update, 6)  # sqrt(2 * 1e-3 * 0.1 * 0.1 / 1.9)
      0.003244

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, Table 1 and app. F-I.
    """
    if optimizer not in ("adamw", "sgdm", "lion", "adam_l2"):
        raise ValueError(
            f"unknown optimizer {optimizer!r}; expected 'adamw', 'sgdm', 'lion' or 'adam_l2'."
        )
    for name, v in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
        if not is_traced(v) and np.any(np.asarray(v) <= 0):
            raise ValueError(f"`{name}` must be > 0 for an equilibrium to exist, got {v!r}.")
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"`dim` must be a positive int, got {dim!r}.")
    xp = _xp(learning_rate, weight_decay, grad_norm)
    lr, wd, c = learning_rate, weight_decay, dim

    if optimizer == "adamw":
        ratio = (1 - b1) / (1 + b1)
        angular = angular_update("adamw", lr, wd, b1=b1)
        norm = xp.sqrt(lr * c / (2 * wd - lr * wd**2))
        rms = lr * xp.sqrt(c * ratio) * xp.ones_like(angular)
        return Equilibrium(_out(angular), _out(norm), _out(rms))

    if optimizer == "lion":
        k = (1 - b1) ** 2 + b1**2 * (1 - b2) / (1 + b2)
        angular = angular_update("lion", lr, wd, b1=b1, b2=b2)
        norm = xp.sqrt(2 * lr * c / (math.pi * (2 * wd - lr * wd**2) * k))
        rms = lr * math.sqrt(c) * xp.ones_like(angular)
        return Equilibrium(_out(angular), _out(norm), _out(rms))

    if optimizer == "sgdm":
        angular = angular_update("sgdm", lr, wd, momentum=momentum)
        if grad_norm is None:
            return Equilibrium(_out(angular), None, None)
        norm = (lr * grad_norm**2 / (2 * wd * (1 - momentum) - lr * wd**2)) ** 0.25
        rms = lr * grad_norm / norm / math.sqrt(1 - momentum**2)
        return Equilibrium(_out(angular), _out(norm), _out(rms))

    # adam_l2
    if grad_norm is None:
        return Equilibrium(None, None, None)
    g2 = grad_norm**2
    w = _adam_l2_sq_norm(lr, wd, c, g2, xp)
    rms = lr * xp.sqrt(c * (1 - b1) / (1 + b1) * g2 / (g2 + wd**2 * w**2))
    norm = xp.sqrt(w)
    return Equilibrium(_out(rms / norm), _out(norm), _out(rms))
