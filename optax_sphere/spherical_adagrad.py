"""AdaGradG: AdaGrad on the sphere (Roburin's thesis sec. 3.4.2; AdamG* of Roburin et al.).

Adam without momentum and without bias correction, with the second moment of the previous step,
constrained to the unit sphere by projection, per group. Roburin et al.'s Theorem 4 makes it
the spherical twin of SGD with L2 (:func:`optax_sphere.theory.sgd_to_adagradg`).

Zero-norm groups have no direction: they (and their accumulator) stay unchanged.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _utils, geometry, registry
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.grouped import on_groups, resolution_of
from optax_sphere.groups import UNSET, GroupsLike, group_dot

__all__ = ["adagradg", "AdagradgState"]


#: ``optax.adagrad``'s default ``eps`` (inside the root), for the leaves off the sphere.
_ADAGRAD_EPS = 1e-7


class AdagradgState(NamedTuple):
    """State of :func:`adagradg` on the grouped leaves: step count and the second moment
    ``nu``, one scalar per group. The leaves off the sphere hold AdaGrad's accumulator
    (``optax.adagrad``'s state) in the ``"ungrouped"`` part of the ``optax.PartitionState`` of
    :func:`~optax_sphere.on_groups`."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    nu: optax.Updates  # per group (keepdims)


def _bad_v0(err: Exception) -> ValueError:
    return ValueError(f"adagradg: `v0` must be a number or a pytree like the params ({err}).")


def adagradg(
    learning_rate: optax.ScalarOrSchedule = 0.7,
    decay: float = 1.0,
    v0: Any = 1.0,
    *,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformation:
    r"""AdaGradG (Roburin's thesis sec. 3.4.2; AdamG* of Roburin et al. sec. 3.2), per group:

    .. math::
        \hat x_{k+1} = x_k - \eta_k \frac{\nabla L(x_k)}{\sqrt{v_k}},\quad
        x_{k+1} = \frac{\hat x_{k+1}}{\|\hat x_{k+1}\|},\quad
        v_{k+1} = \beta v_k + \|\nabla L(x_k)\|^2

    Adam without momentum (``b1 = 0``), without bias correction, with the second moment of the
    *previous* step and an initial ``v_0 > 0``, constrained to the unit sphere by projection.
    Theorem 4 (Roburin et al.; Roburin's thesis): SGD with L2 started from ``r_0 u_0`` follows, to
    second order in the step, AdaGradG started from ``u_0`` with the hyperparameters of
    :func:`optax_sphere.theory.sgd_to_adagradg`. ``decay`` (:math:`\beta`) is in ``(0, 1]`` (1: no
    decay, as AdaGrad). ``v0`` is a number or a pytree like the params whose leaves broadcast to the
    per-group scalar shape (a per-group ``v_0``, as Theorem 4 gives for groups of different radii).
    Ungrouped leaves get ``optax.adagrad``'s step (the accumulator of the current step, ``eps =
    1e-7`` inside the root; started at ``v_0``, decayed by ``decay``), so that no step there exceeds
    the learning rate.

    Args:
      learning_rate: the step (a number or an ``optax`` schedule).
      decay: decay of the per-group accumulator of squared tangent-gradient norms (1: AdaGrad).
      v0: the accumulator's initial value (a number, or per group).
      groups: the groups kept on the sphere; ungrouped leaves follow ``optax.adagrad``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.adagradg(0.7, groups={"w": "unit", "b": None})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(optax.apply_updates(params, updates))
      ['b', 'w']

    References:
      Roburin, de Mont-Marin, Bursuc, Marlet, Pérez and Aubry, "Spherical Perspective on
      Learning with Batch Norm", Theorem 4; Roburin, PhD thesis, sec. 3.4.2.
    """
    _utils.check_rate("learning_rate", learning_rate)
    if not _utils.is_traced(decay) and not 0 < decay <= 1:
        raise ValueError(f"`decay` must be in (0, 1], got {decay!r}.")
    if not callable(v0) and not jax.tree.leaves(v0):
        raise ValueError("`v0` must be a number or a pytree of numbers/arrays.")
    if isinstance(v0, (int, float)) and not 0 < v0 < math.inf:
        raise ValueError(
            f"`v0` must be finite and > 0 (the first step divides by sqrt(v0)), got {v0!r}."
        )

    resolution = resolution_of(groups)

    def v0_tree(params):
        single = jax.tree_util.treedef_is_leaf(jax.tree.structure(v0))
        tree = jax.tree.map(lambda _: v0, params) if single else v0
        try:
            return (_utils.values_at_view(tree, params),)
        except (ValueError, TypeError) as err:
            raise _bad_v0(err) from None

    def init_leaf(group, p, v):
        shape = group.scalar_shape(p.shape)
        # on zeros laid out like p (sharded parameters give a state sharded like them)
        zeros = _utils.zeros_acc(p, shape)
        try:
            return (zeros + jnp.broadcast_to(jnp.asarray(v, zeros.dtype), shape),)
        except (ValueError, TypeError) as err:
            raise _bad_v0(err) from None

    def update_leaf(lr, group, g, v, x):
        acc = accumulation_dtype(jnp.result_type(g, x))
        g, x32 = g.astype(acc), x.astype(acc)
        gg, gx, xx = (
            group_dot(g, g, group),
            group_dot(g, x32, group),
            group_dot(x32, x32, group),
        )
        c = lr / jnp.sqrt(v)
        new_sq = jnp.maximum(xx - 2 * c * gx + c * c * gg, 0)  # ||x_hat||^2
        x_hat = x32 - c * g
        step = geometry.safe_div(x_hat, jnp.sqrt(new_sq)) - x32
        # a zero group, or x_hat = 0, stays; a NaN (from a non-finite gradient) passes
        # on to the update and the state of its group, as documented
        ok = (xx > 0) & (new_sq != 0)
        return jnp.where(ok, step, 0).astype(x.dtype), jnp.where(ok, decay * v + gg, v)

    sphere = _utils.stateful_per_group(
        "adagradg",
        resolution,
        AdagradgState,
        init_leaf,
        update_leaf,
        prepare=lambda count, params: _utils.value_at(learning_rate, count),
        init_trees=v0_tree,
    )
    return on_groups(sphere, _off_sphere(learning_rate, decay, v0, v0_tree), resolution)


def _off_sphere(
    learning_rate: Any, decay: Any, v0: Any, v0_tree: Any
) -> optax.GradientTransformation:
    """The leaves off the sphere: ``optax.adagrad`` (the accumulator of this step, so that no
    step is longer than the learning rate; the grouped recursion's previous-step accumulator
    is what Theorem 4 needs, and the projection bounds it there), started at ``v0``; with
    ``decay < 1`` (or ``v0`` a tree), its accumulator decayed before each step."""
    if isinstance(decay, (int, float)) and decay == 1 and isinstance(v0, (int, float)):
        return registry.BASES["adagrad"](learning_rate, v0=v0)

    def init_fn(params: optax.Params) -> optax.OptState:
        (starts,) = v0_tree(params)
        return optax.ScaleByRssState(
            jax.tree.map(
                lambda p, v: jnp.full_like(p, v, dtype=accumulation_dtype(p.dtype)),
                params,
                starts,
            )
        )

    def update_fn(updates, state, params=None):
        del params
        decayed = optax.ScaleByRssState(jax.tree.map(lambda v: decay * v, state.sum_of_squares))
        return optax.scale_by_rss(0.0, eps=_ADAGRAD_EPS).update(updates, decayed)

    decayed_rss = optax.GradientTransformation(init_fn, update_fn)
    return optax.chain(decayed_rss, optax.scale_by_learning_rate(learning_rate))
