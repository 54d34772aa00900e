"""Retraction: the sphere's own primitives for any chain.

A radially invariant group only matters through ``u = x / ||x||``, so one may optimise ``u``
directly on the unit sphere (Cho & Lee, "Riemannian approach to batch normalization", NeurIPS
2017; Roburin's thesis sec. 3.4.2). The pieces any optimizer can be chained with:

* :func:`project_tangent`: the Riemannian gradient of the sphere, ``g - <g, u> u``;
* :func:`retract_to_sphere`: the last link of a chain, which maps ``x + Delta`` back onto the
  sphere, by projection ``x_hat / ||x_hat||`` or by the exponential map;
* exact parallel transport of a momentum: ``transport_momentum(..., exact=True)``.

The optimizers that stay on the sphere are fused: Cho & Lee's SGD-G and Adam-G in
:mod:`optax_sphere.riemannian`, AdaGradG in :mod:`optax_sphere.spherical_adagrad`.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import optax

from optax_sphere import _utils, geometry
from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.groups import UNSET, GroupsLike, group_dot

__all__ = ["project_tangent", "retract_to_sphere"]

Method = Literal["projection", "exp"]


def project_tangent(*, groups: GroupsLike = UNSET) -> optax.GradientTransformation:
    """Riemannian gradient of the sphere: ``g <- g - <g, u> u`` per group, ``u = x / ||x||``.

    Stateless; needs ``params``. Ungrouped leaves pass through.

    Args:
      groups: the groups (see :func:`resolve_groups`).

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax_sphere.project_tangent(groups={"w": "unit", "b": None})
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> float(jnp.abs(jnp.sum(updates["w"] * params["w"], axis=0)).max())  # tangent
      0.0

    References:
      Cho and Lee, "Riemannian approach to batch normalization", NeurIPS 2017, sec. 3.
    """
    return _utils.stateless_per_group(
        "project_tangent",
        groups,
        lambda group, g, x: geometry.tangent_part(g, x, group).astype(g.dtype),
    )


def retract_to_sphere(
    method: Method = "projection",
    *,
    radius: float = 1.0,
    groups: GroupsLike = UNSET,
) -> optax.GradientTransformation:
    r"""Retraction onto the sphere of radius ``radius``: put it last in a chain.

    With ``x`` the params and ``Delta`` the incoming (final) update, per group:

    * ``"projection"`` (Roburin's thesis sec. 3.4.2): ``x' = radius * (x + Delta) / ||x + Delta||``;
    * ``"exp"`` (Cho & Lee 2017): the exponential map of the sphere from ``u = x / ||x||``
      along the tangent part of ``Delta`` measured in angle, ``v = Delta_perp / ||x||``:
      ``x' = radius (u cos|v| + (v/|v|) sin|v|)``. The radial part of ``Delta`` is dropped.

    Returns the update ``x' - x``. Both agree to first order in ``|v|``. Ungrouped leaves pass
    through. To move a momentum along with the point, wrap the whole chain in
    ``transport_momentum(..., exact=True)`` (exact parallel transport on the sphere).

    Args:
      method: ``"projection"`` or ``"exp"``.
      radius: the radius of the sphere.
      groups: the groups kept on the sphere.

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_sphere
      >>> params = {"w": jnp.ones((4, 2)) / 2, "b": jnp.zeros(2)}
      >>> tx = optax.chain(
      ...     optax.sgd(0.1), optax_sphere.retract_to_sphere(groups={"w": "unit", "b": None})
      ... )
      >>> grads = {"w": jnp.arange(8.0).reshape(4, 2), "b": jnp.ones(2)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)
      >>> jnp.linalg.norm(new["w"], axis=0).round(6).tolist()
      [1.0, 1.0]

    References:
      Roburin, PhD thesis, sec. 3.4.2 (projection); Cho and Lee, NeurIPS 2017, eq. 9 (exp).
    """
    if method not in ("projection", "exp"):
        raise ValueError(f"`method` must be 'projection' or 'exp', got {method!r}.")
    if not radius > 0:
        raise ValueError(f"`radius` must be > 0, got {radius!r}.")

    def leaf(group, delta, x):
        acc = accumulation_dtype(jnp.result_type(delta, x))
        d, x32 = delta.astype(acc), x.astype(acc)
        if method == "projection":
            new = geometry.project_to_sphere(x32 + d, group, radius)
        else:
            r = jnp.sqrt(group_dot(x32, x32, group))
            u = geometry.safe_div(x32, r)
            v = geometry.safe_div(geometry.tangent_part(d, x32, group), r)
            new = radius * geometry.exp_map(u, v, group)
        return (new - x32).astype(delta.dtype)

    return _utils.stateless_per_group("retract_to_sphere", groups, leaf)
