"""The statistics recorded inside an optimizer: :func:`monitor`, a transformation for the end of
any ``optax.chain``, and :func:`monitored`, a wrapper around a whole optimizer (no host
transfer inside ``update``); :func:`find_monitor_state` finds the record in any state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sphere import _utils
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.diagnostics.statistics import GeometryStats, stats_from_step
from optax_sphere.grouped import resolution_of
from optax_sphere.groups import (
    UNSET,
    GroupsLike,
    map_groups,
)

__all__ = ["MonitorState", "MonitoredState", "monitor", "monitored", "find_monitor_state"]

PyTree = Any


class MonitorState(NamedTuple):
    """State of :func:`monitor`: steps seen and the stats of the last one."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    stats: GeometryStats


class MonitoredState(NamedTuple):
    """State of :func:`monitored`: the inner optimizer's state and the monitor's."""

    inner: optax.OptState
    monitor: MonitorState


def _init_stats(
    grp: PyTree, params: PyTree, with_scale: bool, with_gradient: bool = False
) -> GeometryStats:
    def zeros(group, p):
        if group is None:
            return None
        shape = tuple(n for i, n in enumerate(p.shape) if i not in group.axes)
        return jnp.zeros(shape, accumulation_dtype(p.dtype))

    n = 8 if with_scale else 6
    # distinct buffers per field, so that the state can be donated
    fields = [map_groups(zeros, grp, params) for _ in range(n)] + [None] * (8 - n)
    radial = map_groups(zeros, grp, params) if with_gradient else None
    return GeometryStats(*fields, radial)


def _check_every(every: Any) -> None:
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"`every` must be an int >= 1, got {every!r}.")


def _maybe_record(every: int, state: MonitorState, compute: Callable[[], GeometryStats]):
    """The stats of this step when ``count % every == 0``, else the recorded ones."""
    if every == 1:
        return compute()
    return jax.lax.cond(state.count % every == 0, compute, lambda: state.stats)


def monitor(
    *,
    groups: GroupsLike = UNSET,
    step_scale: optax.ScalarOrSchedule | None = None,
    every: int = 1,
):
    """Records the per-group geometry of each step; put it last in an ``optax.chain``.

    The updates pass through unchanged; the state holds the :class:`GeometryStats` of the
    last step ``x_k -> x_k + updates`` (computed in at least float32 from two reduction
    passes over the params and the updates, no host transfer), so it works under ``jit``,
    ``pmap`` / sharding and with every optax wrapper. Its state is 6 scalars per group (8
    with ``step_scale``). Read it with :func:`metrics` or :class:`History`.

    Args:
      groups: the radially invariant groups (see :mod:`optax_sphere.groups`); the default,
        every optimizer's, groups nothing and warns at ``init``.
      step_scale: optional step scale ``s_k`` of the generic scheme of Roburin et al. eqs. 3-4 (a
        number or a schedule of the monitor's step count): the learning rate for SGD and
        SGD with momentum, with or without L2 (``b = 1``). Enables ``effective_lr`` and
        ``direction_norm``. For Adam-like optimizers, use :func:`monitored`.
      every: record the steps ``k`` with ``k % every == 0`` only (the state keeps the last
        recorded stats); the other steps skip the reductions (``lax.cond``).

    Returns:
      An ``optax.GradientTransformation`` (state :class:`MonitorState`); ``update`` needs
      ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> grads = {"w": jnp.array([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
      >>> monitor = optax_sphere.monitor(groups={"w": "unit"}, step_scale=0.1)
      >>> tx = optax.chain(optax.sgd(0.1), monitor)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> optax_sphere.metrics(state)["w/effective_lr/mean"].shape
      ()

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eqs. 3-4 and 11-13.
    """
    if step_scale is not None:
        _utils.check_rate("step_scale", step_scale)
    _check_every(every)

    resolution = resolution_of(groups)

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolution(params)
        return MonitorState(
            jnp.zeros([], jnp.int32), _init_stats(grp, params, step_scale is not None)
        )

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra_args  # accepted as by optax's aliases; nothing here uses them
        params = _utils.require_params(params, "monitor")
        grp = resolution(params)
        scale = None if step_scale is None else _utils.value_at(step_scale, state.count)
        stats = _maybe_record(every, state, lambda: stats_from_step(grp, params, updates, scale))
        return updates, MonitorState(optax.safe_increment(state.count), stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def monitored(
    inner: optax.GradientTransformation,
    groups: GroupsLike = UNSET,
    *,
    step_scale: Callable[[Any, PyTree], Any] | None = None,
    every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` followed by :func:`monitor`, with a step scale read from ``inner``'s state.

    It sees the gradients, so it also records ``radial_gradient`` (the check that every group
    is radially invariant, see the module docstring).

    Args:
      inner: the whole optimizer (learning rate included).
      groups: the radially invariant groups (see :mod:`optax_sphere.groups`); the default,
        every optimizer's, groups nothing and warns at ``init``.
      step_scale: optional ``step_scale(inner_state, params) -> s_k`` evaluated on the state
        after the step and the params before it, returning a number or a tree of per-group
        ``keepdims`` arrays, e.g. :func:`adam_step_scale` for optax's Adam and Adam + L2.
      every: as in :func:`monitor`.

    Returns:
      An ``optax.GradientTransformation`` (state :class:`MonitoredState`); ``update`` needs
      ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> grads = {"w": jnp.array([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
      >>> tx = optax_sphere.monitored(optax.sgd(0.1, momentum=0.9), {"w": "unit"}, step_scale=None)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> "w/radial_gradient/flagged" in optax_sphere.metrics(state)
      True

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 3 (the radial
      gradient of a radially invariant group is zero, eq. 2).
    """
    _check_every(every)
    inner = optax.with_extra_args_support(inner)

    resolution = resolution_of(groups)

    def init_fn(params: optax.Params) -> optax.OptState:
        grp = resolution(params)
        stats = _init_stats(grp, params, step_scale is not None, with_gradient=True)
        return MonitoredState(inner.init(params), MonitorState(jnp.zeros([], jnp.int32), stats))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        params = _utils.require_params(params, "monitored")
        grp = resolution(params)
        grads = updates
        updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        stats = _maybe_record(
            every,
            state.monitor,
            lambda: stats_from_step(
                grp,
                params,
                updates,
                None if step_scale is None else step_scale(inner_state, params),
                grads,
            ),
        )
        mon = MonitorState(optax.safe_increment(state.monitor.count), stats)
        return updates, MonitoredState(inner_state, mon)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_monitor_state(state: Any) -> MonitorState:
    """The (unique) :class:`MonitorState` inside an optimizer state.

    Args:
      state: an optimizer state holding exactly one :class:`MonitorState`.

    Returns:
      That :class:`MonitorState`.

    Raises:
      ValueError: the state holds none, or more than one.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
      >>> grads = {"w": jnp.array([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
      >>> tx = optax.chain(optax.sgd(0.1), optax_sphere.monitor(groups={"w": "unit"}))
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> optax_sphere.find_monitor_state(state).stats.angular_update["w"].shape  # per group
      (2,)

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 3.
    """
    found = _utils.find_states(state, lambda s: isinstance(s, MonitorState))
    if len(found) != 1:
        raise ValueError(
            f"expected one MonitorState in the optimizer state, found {len(found)}; chain "
            "optax_sphere.monitor() into the optimizer or wrap it with monitored()."
        )
    return found[0]
