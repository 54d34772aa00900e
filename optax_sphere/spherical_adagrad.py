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

from optax_sphere import _utils, geometry
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.groups import UNSET, GroupsLike, group_dot

__all__ = ["adagradg", "AdagradgState"]


#: ``optax.adagrad``'s default ``eps`` (inside the root), for the leaves off the sphere.
_ADAGRAD_EPS = 1e-7


class AdagradgState(NamedTuple):
    """State of :func:`adagradg`: step count and the second moment ``nu`` (one scalar per
    group on grouped leaves, element-wise elsewhere)."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    nu: optax.Updates  # per group (keepdims); like the leaf off the groups


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

    def v0_tree(params):
        single = jax.tree_util.treedef_is_leaf(jax.tree.structure(v0))
        tree = jax.tree.map(lambda _: v0, params) if single else v0
        try:
            jax.tree.structure(params).flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise _bad_v0(err) from None
        return (tree,)

    def init_leaf(group, p, v):
        shape = p.shape if group is None else group.scalar_shape(p.shape)
        # on zeros laid out like p (sharded parameters give a state sharded like them)
        zeros = _utils.zeros_acc(p, shape)
        try:
            return (zeros + jnp.broadcast_to(jnp.asarray(v, zeros.dtype), shape),)
        except (ValueError, TypeError) as err:
            raise _bad_v0(err) from None

    def prepare(count, params):
        return _utils.value_at(learning_rate, count)

    def update_leaf(context, group, g, v, x):
        lr = context
        acc = accumulation_dtype(jnp.result_type(g, x))
        g, x32 = g.astype(acc), x.astype(acc)
        if group is None:
            # optax.adagrad: the accumulator of this step, so that no step is longer than
            # the learning rate (the grouped recursion's previous-step accumulator is what
            # Theorem 4 needs, and the projection bounds it there)
            rss = optax.ScaleByRssState(sum_of_squares=decay * v)
            direction, rss = optax.scale_by_rss(eps=_ADAGRAD_EPS).update(g, rss)
            return (-lr * direction).astype(x.dtype), rss.sum_of_squares
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

    return _utils.stateful_per_group(
        "adagradg",
        groups,
        AdagradgState,
        init_leaf,
        update_leaf,
        prepare=prepare,
        init_trees=v0_tree,
    )
