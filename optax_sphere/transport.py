"""Rescale (R) and transport (T) of the momentum between two steps.

Roburin et al. sec. 4.2 and app. D.2. Momentum accumulated on a radially invariant group mixes
gradients taken at other radii (phenomenon (c)) and at other points of the sphere, whose
tangent spaces differ (phenomena (b1), (b2)). After each step ``x_k -> x_{k+1}`` these
wrappers move the momentum held in the state of any inner optimizer:

* R (eq. 69): ``a <- (r_k / r_{k+1}) a``, and a second moment ``v <- (r_k / r_{k+1})^2 v``
  (eq. 21);
* T (eq. 72): ``a <- <u_k,u_{k+1}> a - <a,u_{k+1}> u_k`` (the published formula), or the exact
  parallel transport of the sphere with ``exact=True``;
* RT (eq. 75): both at once, ``(<x_{k+1},x_k> a - <x_{k+1},a> x_k) / ||x_{k+1}||^2``.

The inner transformation must produce the *final* update (learning rate included), since
the wrappers need ``x_{k+1} = x_k + update``: this is where the paper applies them too
(Roburin et al. alg. 1, lines 10-11). Momentum buffers are the state fields named ``mu``, ``trace``
or ``momentum`` (optax's Adam, ``trace`` / SGD momentum, and this library's own), second
moments the fields named ``nu``; both must be shaped like the params. The wrappers add no
state of their own: the state is the inner state. Ungrouped leaves are left untouched.

``transport_momentum(rescale_momentum(inner))`` equals ``rescale_transport_momentum(inner)``
(R and T commute, eq. 75).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from optax_sphere import _utils, geometry
from optax_sphere.groups import GroupsLike, group_sq_norm, resolve_groups

__all__ = [
    "MOMENTUM_FIELDS",
    "SECOND_MOMENT_FIELDS",
    "rescale_momentum",
    "transport_momentum",
    "rescale_transport_momentum",
]

#: State fields treated as momentum buffers (optax's Adam and Lion, SGD momentum, ours).
MOMENTUM_FIELDS: tuple[str, ...] = ("mu", "trace", "momentum")
#: State fields treated as second moments (rescaled by R and RT).
SECOND_MOMENT_FIELDS: tuple[str, ...] = ("nu",)

Op = Callable[[Any, Any, Any, Any], Any]


def _momentum_geometry(
    inner: optax.GradientTransformation,
    op: Op,
    rescale_second_moment: bool,
    groups: GroupsLike,
    momentum_fields: Sequence[str],
    name: str,
) -> optax.GradientTransformationExtraArgs:
    inner = optax.with_extra_args_support(inner)
    momentum_fields = tuple(momentum_fields)

    def init_fn(params: optax.Params) -> optax.OptState:
        resolve_groups(groups, params)  # validate the spec against the params now
        state = inner.init(params)
        _, found = _utils.map_state_fields(
            state, momentum_fields, jax.tree.structure(params), lambda t: t
        )
        if not found:
            raise ValueError(
                f"{name}: the inner transformation's state has no momentum field shaped like the "
                f"params (looked for NamedTuple fields {momentum_fields}); wrap an optimizer "
                "that keeps momentum, such as optax.sgd(lr, momentum) or an Adam."
            )
        return state

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        params = _utils.require_params(params, name)
        _utils.check_state_matches(params, updates, state, momentum_fields)
        grp = resolve_groups(groups, params)
        new_updates, state = inner.update(updates, state, params, **extra_args)
        new_params = optax.apply_updates(params, new_updates)
        treedef = jax.tree.structure(params)

        def move(tree):
            return _utils.map_groups(
                lambda g, a, x0, x1: a if g is None else op(a, x0, x1, g).astype(a.dtype),
                grp,
                tree,
                params,
                new_params,
            )

        def rescale_sq(tree):
            def leaf(g, v, x0, x1):
                if g is None:
                    return v
                ratio = geometry.safe_div(group_sq_norm(x0, g), group_sq_norm(x1, g))
                return (v * ratio.astype(v.dtype)).astype(v.dtype)

            return _utils.map_groups(leaf, grp, tree, params, new_params)

        state, _ = _utils.map_state_fields(state, momentum_fields, treedef, move)
        if rescale_second_moment:
            state, _ = _utils.map_state_fields(state, SECOND_MOMENT_FIELDS, treedef, rescale_sq)
        return new_updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rescale_momentum(
    inner: optax.GradientTransformation,
    *,
    groups: GroupsLike = "unset",
    momentum_fields: Sequence[str] = MOMENTUM_FIELDS,
) -> optax.GradientTransformationExtraArgs:
    """R (Roburin et al. eq. 69, 21): after each step, momentum ``*= r_k / r_{k+1}`` and second
    moment ``*= (r_k / r_{k+1})^2`` per group, in the state of ``inner``."""
    return _momentum_geometry(
        inner, geometry.rescale, True, groups, momentum_fields, "rescale_momentum"
    )


def transport_momentum(
    inner: optax.GradientTransformation,
    *,
    groups: GroupsLike = "unset",
    exact: bool = False,
    momentum_fields: Sequence[str] = MOMENTUM_FIELDS,
) -> optax.GradientTransformationExtraArgs:
    """T (Roburin et al. eq. 72): after each step, moves the momentum of ``inner`` from ``u_k`` to
    ``u_{k+1}``: ``a <- <u_k,u_{k+1}> a - <a,u_{k+1}> u_k``.

    With ``exact=True`` the momentum is projected on the tangent space at ``u_k`` and moved by
    the exact parallel transport of the sphere (:func:`optax_sphere.geometry.parallel_transport`),
    which preserves its norm; the default is the formula of the paper (what its results used).
    """
    op = geometry.parallel_transport if exact else geometry.transport
    return _momentum_geometry(inner, op, False, groups, momentum_fields, "transport_momentum")


def rescale_transport_momentum(
    inner: optax.GradientTransformation,
    *,
    groups: GroupsLike = "unset",
    momentum_fields: Sequence[str] = MOMENTUM_FIELDS,
) -> optax.GradientTransformationExtraArgs:
    """RT (Roburin et al. eq. 75): ``a <- (<x_{k+1},x_k> a - <x_{k+1},a> x_k) / ||x_{k+1}||^2`` on
    the momentum and ``v <- v ||x_k||^2 / ||x_{k+1}||^2`` on the second moment of ``inner``."""
    return _momentum_geometry(
        inner,
        geometry.rescale_transport,
        True,
        groups,
        momentum_fields,
        "rescale_transport_momentum",
    )
