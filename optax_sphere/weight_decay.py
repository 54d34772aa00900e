"""Coupled and decoupled L2 on chosen leaves (Roburin et al. sec. 4.2, point 3).

Coupled L2 adds ``wd x`` to the gradient *before* the moments, so L2 terms accumulate in the
momentum and, for a radially invariant group, contribute to its effective direction
(``c^{L2}`` of Roburin et al. eq. 17). Decoupled weight decay (AdamW) adds it *after* the
preconditioner, so nothing of it is accumulated. Both are ``optax.add_decayed_weights``; what
differs is where the chain puts it, which these two names make explicit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _utils
from optax_sphere._paths import check_trees_match

__all__ = ["coupled_weight_decay", "decoupled_weight_decay", "DecoupledWeightDecayState"]


def coupled_weight_decay(
    weight_decay: optax.ScalarOrSchedule, mask: Any = None
) -> optax.GradientTransformation:
    r"""``g <- g + wd x`` on the leaves selected by ``mask``: put it first in a chain.

    Args:
      weight_decay: the L2 coefficient :math:`\lambda` (a number or a schedule).
      mask: the leaves that get it, as ``optax.add_decayed_weights``'s.

    Returns:
      ``optax.add_decayed_weights(weight_decay, mask)``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax.chain(
      ...     optax_sphere.coupled_weight_decay(1e-4),
      ...     optax_sphere.scale_by_standardized_adam(groups={"w": "unit", "b": None}),
      ...     optax.scale_by_learning_rate(1e-3),
      ... )
      >>> updates, _ = tx.update(params, tx.init(params), params)

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 4.2 and eq. 17.
    """
    _utils.check_rate("weight_decay", weight_decay)
    return optax.add_decayed_weights(weight_decay, mask)


class DecoupledWeightDecayState(NamedTuple):
    count: jax.Array


def decoupled_weight_decay(
    weight_decay: optax.ScalarOrSchedule, learning_rate: optax.ScalarOrSchedule, mask: Any = None
) -> optax.GradientTransformation:
    r"""``Delta <- Delta - lr_k wd_k x`` on the leaves selected by ``mask``: put it last in a
    chain, after the learning rate (AdamW's ``x <- x - lr (step + wd x)``). Both
    hyperparameters may be schedules.

    Args:
      weight_decay: the decay :math:`\lambda` (a number or a schedule).
      learning_rate: the learning rate it is multiplied by (a number or a schedule).
      mask: the leaves that get it, as ``optax.adamw``'s.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2))}
      >>> tx = optax.chain(
      ...     optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3),
      ...     optax_sphere.decoupled_weight_decay(1e-2, 1e-3),
      ... )
      >>> updates, _ = tx.update(params, tx.init(params), params)

    References:
      Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019; Roburin et
      al., sec. 4.2.
    """
    _utils.check_rate("weight_decay", weight_decay)
    _utils.check_rate("learning_rate", learning_rate)

    def init_fn(params: optax.Params) -> optax.OptState:
        del params
        return DecoupledWeightDecayState(jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = _utils.require_params(params, "decoupled_weight_decay")
        check_trees_match(updates, params)
        scale = _utils.value_at(learning_rate, state.count) * _utils.value_at(
            weight_decay, state.count
        )
        updates = jax.tree.map(lambda u, p: (u - scale * p).astype(u.dtype), updates, params)
        return updates, DecoupledWeightDecayState(optax.safe_increment(state.count))

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)
