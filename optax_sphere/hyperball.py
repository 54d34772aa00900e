r"""Hyperball optimisation: every group kept at its initial norm, stepped by a fixed angle.

Wen, Dang, Lyu, Ma and Liang, "Fantastic Pretraining Optimizers and Where to Find Them 2.1:
Hyperball Optimization" (2025). Weight decay only sets the norm of a weight matrix, and the
norm sets the effective step (the update's size relative to the weight: Kosson et al.'s
rotational equilibrium). The hyperball update fixes both: with ``W_0`` the group at
initialisation, ``R = ||W_0||`` and ``u`` the update of any optimizer (Adam, Lion, Muon),

.. math::
    W_{t+1} = R\,\mathrm{Norm}\big(W_t - \eta R\,\mathrm{Norm}(u_t)\big),
    \qquad \mathrm{Norm}(x) = x / \|x\|,

so every group stays on its sphere of radius ``R`` and turns by ``arctan(eta)`` per step
when ``u`` is orthogonal to ``W`` (by at most ``arcsin(eta)`` for ``eta < 1`` otherwise),
whatever its size, its norm, or the scale of ``u``. Wen et al. take the groups to be whole
matrices; here they are any groups of the library: a matrix of each layer of a stack or of
each expert (:func:`optax_sphere.matrix_groups`), a head, a unit. Leaves outside the groups
(embeddings, biases, norm scales in Wen et al.) get the inner optimizer's update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _utils, geometry
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.grouped import on_groups, resolution_of
from optax_sphere.groups import UNSET, GroupsLike, group_sq_norm, map_groups

__all__ = ["HyperballState", "adamh", "hyperball", "muonh"]


class HyperballState(NamedTuple):
    """The state of the grouped leaves: step count (for a ``learning_rate`` schedule), each
    group's radius (``keepdims``, at least float32) and the inner state. The other leaves
    hold the inner optimizer's state in the ``"ungrouped"`` part of the
    ``optax.PartitionState`` of :func:`~optax_sphere.on_groups`."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    radius: optax.Updates
    inner_state: optax.OptState


def hyperball(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    ungrouped_learning_rate: optax.ScalarOrSchedule | None = None,
    radius: float | None = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""The hyperball update (Wen et al. 2025) around any optax optimizer.

    ``inner`` is a complete optimizer (``optax.adam(lr)``, ``optax.lion(lr)``,
    ``optax.contrib.muon(lr)``) whose update ``Delta`` is what it would add to the
    parameters. Per group, with ``R`` the group's norm at ``init`` (or ``radius``):

    .. math::
        x_{t+1} = R\,\frac{y}{\|y\|}, \qquad y = x_t + \eta_t R\,\frac{\Delta_t}{\|\Delta_t\|}

    and the update returned is ``x_{t+1} - x_t``. Only the direction of ``Delta`` is used on
    the groups. The ungrouped leaves get ``Delta``, times ``ungrouped_learning_rate`` when it
    is given: build ``inner`` at a rate of 1 and give the rate here (as :func:`adamh` does),
    so that a rate of the ungrouped leaves that reaches 0 does not stop the groups, whose
    direction ``Delta`` then would not have. A group whose ``Delta`` is zero is only
    projected back onto its sphere; a group of norm zero at ``init`` (``R = 0``) stays at the
    origin, and a step that lands on the origin (``y = 0``: ``Delta`` straight back at
    ``eta = 1``) is not taken.

    ``inner`` runs on the gradients and parameters cast to their accumulation dtype (at least
    float32), as the radii are kept; the update comes back in the gradients' dtype.

    Args:
      inner: the optimizer whose update direction is followed.
      learning_rate: :math:`\eta`, the step relative to the radius (a number or a schedule):
        a group turns by :math:`\arctan\eta` when ``Delta`` is tangent to its sphere, by at
        most :math:`\arcsin\eta` when ``eta < 1``.
      ungrouped_learning_rate: a factor of ``Delta`` on the ungrouped leaves (a number or a
        schedule); ``None``: ``Delta`` as it is.
      radius: the radius of every group's sphere; ``None``: each group's norm at ``init``.
      groups: the groups kept on their spheres (a matrix of each layer:
        :func:`optax_sphere.matrix_groups`).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((2, 3, 4)), "b": jnp.zeros(4)}  # a stack of 2 matrices
      >>> tx = optax_sphere.hyperball(
      ...     optax.adam(1e-3), 0.05, groups={"w": (1, 2), "b": None}
      ... )
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.arange(24.0).reshape(2, 3, 4), "b": jnp.ones(4)}
      >>> updates, state = tx.update(grads, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> [round(float(n), 4) for n in jnp.linalg.norm(new["w"], axis=(1, 2))]  # norms kept
      [3.4641, 3.4641]

    References:
      Wen, Dang, Lyu, Ma and Liang, "Fantastic Pretraining Optimizers and Where to Find Them
      2.1: Hyperball Optimization" (2025), the update rule; Kosson et al., "Rotational
      Equilibrium", sec. 3 (the step relative to the norm is what matters).
    """
    _utils.check_rate("learning_rate", learning_rate)
    if ungrouped_learning_rate is not None:
        _utils.check_rate("ungrouped_learning_rate", ungrouped_learning_rate)
    if radius is not None and not (isinstance(radius, (int, float)) and radius > 0):
        raise ValueError(f"`radius` must be a number > 0 or None, got {radius!r}.")
    inner = optax.with_extra_args_support(inner)
    resolution = resolution_of(groups)

    def init_radius(group, x):
        x32 = x.astype(accumulation_dtype(x.dtype))
        if radius is None:
            return jnp.sqrt(group_sq_norm(x32, group))
        return jnp.full(group.scalar_shape(x.shape), radius, x32.dtype)

    def init_fn(params: optax.Params) -> optax.OptState:
        radii = map_groups(init_radius, resolution(params), params)
        return HyperballState(
            jnp.zeros([], jnp.int32), radii, inner.init(_utils.to_accumulation(params))
        )

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        params = _utils.require_params(params, "hyperball")
        grp = resolution(params)
        deltas, inner_state = _utils.inner_update(
            inner, updates, state.inner_state, params, extra_args
        )
        eta = _utils.value_at(learning_rate, state.count)

        def leaf(group, delta, x, r, g):
            acc = accumulation_dtype(jnp.result_type(delta, x))
            d, x32 = delta.astype(acc), x.astype(acc)
            direction = geometry.safe_div(d, jnp.sqrt(group_sq_norm(d, group)))
            y = x32 + eta * r * direction
            norm = jnp.sqrt(group_sq_norm(y, group))
            # y = 0 (a step of eta = 1 straight back to the origin) has no direction, nor has
            # a y at rounding's distance from it: no step
            landed = ~(norm <= jnp.finfo(acc).eps * r)  # a NaN goes on to the update
            new = jnp.where(landed, r * geometry.safe_div(y, norm), x32)
            return (new - x32).astype(g.dtype)

        new_updates = map_groups(leaf, grp, deltas, params, state.radius, updates, trace_once=True)
        return new_updates, HyperballState(
            optax.safe_increment(state.count), state.radius, inner_state
        )

    sphere = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    # off the groups: the inner optimizer's update, scaled by ungrouped_learning_rate if given
    off = inner
    if ungrouped_learning_rate is not None:
        off = optax.chain(
            inner, optax.scale_by_learning_rate(ungrouped_learning_rate, flip_sign=False)
        )
    return on_groups(sphere, off, resolution)


def adamh(
    learning_rate: optax.ScalarOrSchedule = 0.02,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    *,
    ungrouped_learning_rate: optax.ScalarOrSchedule | None = None,
    nesterov: bool = False,
    radius: float | None = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamH (Wen et al. 2025): Adam's direction on the hyperball of every group.

    .. math::
        u_t = \frac{m_t / (1 - b_1^t)}{\sqrt{v_t / (1 - b_2^t)} + \epsilon},\qquad
        x_{t+1} = R\,\mathrm{Norm}\big(x_t - \eta_t R\,\mathrm{Norm}(u_t)\big)

    on the groups (:func:`hyperball` around ``optax.adam``), and
    ``optax.adam(ungrouped_learning_rate)`` on the ungrouped leaves (the embeddings, biases
    and norm scales in Wen et al.). With nothing grouped it is
    ``optax.adam(ungrouped_learning_rate, b1, b2, eps)``. Wen et al.'s defaults (``b2 = 0.95``);
    their rule for the rate: ``learning_rate ~ sqrt(lr * weight_decay)`` of a tuned AdamW,
    the angle AdamW turns per step at equilibrium (Kosson et al. eq. 8).

    Args:
      learning_rate: :math:`\eta`, the step of the groups relative to their norm (a number or
        a schedule).
      b1, b2, eps: Adam's moment decays and denominator term, as ``optax.adam``'s.
      ungrouped_learning_rate: Adam's rate on the ungrouped leaves (a number or a
        schedule); ``None``: ``learning_rate``.
      nesterov: Adam's Nesterov variant (``optax.adam(nesterov=True)``).
      radius: the radius of every group; ``None``: each group's norm at ``init``.
      groups: the groups (one per matrix of each layer:
        :func:`optax_sphere.matrix_groups`).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax_sphere
      >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
      >>> groups = {"w": "tensor", "b": None}
      >>> tx = optax_sphere.adamh(0.02, ungrouped_learning_rate=1e-3, groups=groups)
      >>> state = tx.init(params)

    References:
      Wen et al., "Fantastic Pretraining Optimizers and Where to Find Them 2.1: Hyperball
      Optimization" (2025), AdamH.
    """
    _utils.check_adam(learning_rate, b1, b2, eps, 0.0)
    off = learning_rate if ungrouped_learning_rate is None else ungrouped_learning_rate
    _utils.check_rate("ungrouped_learning_rate", off)
    # Adam at a rate of 1: its direction on the groups, times the rate off them (exactly
    # optax.adam(off), whose last step multiplies by -off)
    inner = optax.adam(1.0, b1=b1, b2=b2, eps=eps, nesterov=nesterov)
    return hyperball(
        inner, learning_rate, ungrouped_learning_rate=off, radius=radius, groups=groups
    )


def muonh(
    learning_rate: optax.ScalarOrSchedule = 0.02,
    ns_coeffs: Sequence[float] | str = (3.4445, -4.775, 2.0315),
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    *,
    nesterov: bool = True,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    ungrouped_learning_rate: optax.ScalarOrSchedule | None = None,
    muon_weight_dimension_numbers: Any = None,
    radius: float | None = None,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformationExtraArgs:
    r"""MuonH (Wen et al. 2025): Muon's orthogonalised momentum on the hyperball of every group.

    :func:`hyperball` around ``optax.contrib.muon``: on the groups, Muon's update ``u`` (the
    Newton-Schulz orthogonalisation of the Nesterov momentum, per matrix as
    ``muon_weight_dimension_numbers`` says) moves the group by
    :math:`x_{t+1} = R\,\mathrm{Norm}(x_t - \eta_t R\,\mathrm{Norm}(u_t))`; off the groups,
    Muon's own update at ``ungrouped_learning_rate`` (its Adam for the leaves it does not
    orthogonalise, the embeddings and gains). With nothing grouped it is
    ``optax.contrib.muon(ungrouped_learning_rate, ...)`` at these hyperparameters.

    The groups and the dimension numbers are read from the same structure:
    ``matrix_groups(model, ...)`` and ``muon_dimension_numbers(model, ...)`` of
    :mod:`optax_sphere.structure` give one group per matrix Muon orthogonalises.

    Args:
      learning_rate: :math:`\eta`, the step of the groups relative to their norm (a number
        or a schedule).
      ns_coeffs, ns_steps, beta, eps, nesterov: Muon's, as ``optax.contrib.muon``'s.
      adam_b1, adam_b2: the decays of Muon's Adam.
      ungrouped_learning_rate: the rate of Muon (and its Adam) off the groups; ``None``:
        ``learning_rate``.
      muon_weight_dimension_numbers: as ``optax.contrib.muon``'s (a tree of
        ``MuonDimensionNumbers`` and ``None``, or a function of the params returning it).
      radius: the radius of every group; ``None``: each group's norm at ``init``.
      groups: the groups.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    References:
      Wen et al. (2025), MuonH; Jordan et al., "Muon: an optimizer for hidden layers in
      neural networks" (2024).
    """
    from optax.contrib import muon

    _utils.check_rate("learning_rate", learning_rate)
    _utils.check_beta("beta", beta)
    _utils.check_rate("eps", eps)
    off = learning_rate if ungrouped_learning_rate is None else ungrouped_learning_rate
    _utils.check_rate("ungrouped_learning_rate", off)
    # Muon at a rate of 1, as adamh's Adam
    inner = muon(
        1.0,
        ns_coeffs=ns_coeffs,
        ns_steps=ns_steps,
        beta=beta,
        eps=eps,
        nesterov=nesterov,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        adam_learning_rate=1.0,
        muon_weight_dimension_numbers=_empty_leaves_to_adam(muon_weight_dimension_numbers),
    )
    return hyperball(
        inner, learning_rate, ungrouped_learning_rate=off, radius=radius, groups=groups
    )


def _empty_leaves_to_adam(numbers: Any) -> Any:
    """Muon's dimension numbers (a tree, a prefix of one, a function of the params, or
    ``None`` for optax's rule: every matrix) with the leaves that have no elements given to
    its Adam: optax's Muon divides by their fan-in, zero."""
    from optax.contrib import MuonDimensionNumbers

    is_numbers = lambda n: n is None or isinstance(n, MuonDimensionNumbers)

    def numbers_for(params: optax.Params) -> Any:
        given = numbers(params) if callable(numbers) else numbers
        if given is None:
            return jax.tree.map(
                lambda x: MuonDimensionNumbers() if x.ndim == 2 and x.size else None, params
            )

        def subtree(n, sub):
            if n is None or all(x.size for x in jax.tree.leaves(sub)):
                return n
            return jax.tree.map(lambda x: n if x.size else None, sub)

        return jax.tree.map(subtree, given, params, is_leaf=is_numbers)

    return numbers_for
