"""Pure per-group geometry on the sphere of one radially invariant group.

Every function acts on one leaf and its :class:`~optax_sphere.groups.Group`; per-group
scalars are ``keepdims`` reductions, so the functions are shape-polymorphic, jit- and
sharding-friendly, and vectorised over all groups of a leaf at once. Notation of Roburin et al.:
``r = ||x||``, ``u = x / r``, ``q_perp = q - <q, u> u``.

Degenerate groups: a zero-norm group has no direction, so the transports and the rescale
return their input unchanged for it, and :func:`safe_div` never divides by zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_sphere._dtypes import accumulation_dtype
from optax_sphere.groups import Group, group_dot, group_sq_norm

__all__ = [
    "safe_div",
    "tangent_part",
    "radial_part",
    "transport",
    "rescale",
    "rescale_transport",
    "parallel_transport",
    "angle",
    "exp_map",
    "project_to_sphere",
]


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den != 0``, else 0 (no NaN leaks into gradients either).

    Args:
      num, den: arrays that broadcast together.

    Returns:
      The quotient, 0 where ``den == 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.geometry import safe_div
      >>> safe_div(jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0])).tolist()
      [0.5, 0.0]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2 (``u = x / r``
      is undefined for a zero group, which this leaves at zero).
    """
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _acc(*arrays: jax.Array) -> list[jax.Array]:
    dtype = accumulation_dtype(jnp.result_type(*arrays))
    return [a.astype(dtype) for a in arrays]


def radial_part(q: jax.Array, x: jax.Array, group: Group) -> jax.Array:
    """``<q, u> u``: the component of ``q`` along the group's direction ``u = x / ||x||``.

    Args:
      q: the vector decomposed, shaped like the leaf.
      x: the group's point.
      group: the group.

    Returns:
      ``<q, u> u`` per group, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.geometry import radial_part
      >>> from optax_sphere.groups import Group
      >>> g = Group((0,))  # one group per column
      >>> radial_part(jnp.array([[1.0], [1.0]]), jnp.array([[2.0], [0.0]]), g).tolist()
      [[1.0], [0.0]]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eq. 2 (the radial
      gradient of an invariant group is zero).
    """
    q, x = _acc(q, x)
    return safe_div(group_dot(q, x, group), group_sq_norm(x, group)) * x


def tangent_part(q: jax.Array, x: jax.Array, group: Group) -> jax.Array:
    """``q_perp = q - <q, u> u``: projection onto the tangent space of the sphere at ``u``.

    Args:
      q: the vector projected, shaped like the leaf.
      x: the group's point.
      group: the group.

    Returns:
      ``q - <q, u> u`` per group, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.geometry import tangent_part
      >>> from optax_sphere.groups import Group
      >>> g = Group((0,))  # one group per column
      >>> tangent_part(jnp.array([[1.0], [1.0]]), jnp.array([[2.0], [0.0]]), g).tolist()
      [[0.0], [1.0]]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2 and eq. 75.
    """
    q, x = _acc(q, x)
    return q - radial_part(q, x, group)


def transport(a: jax.Array, x_old: jax.Array, x_new: jax.Array, group: Group) -> jax.Array:
    """Transport T of Roburin et al. app. D.2, eq. 72: ``<u_old,u_new> a - <a,u_new> u_old``.

    The published formula, a rotation in the plane ``(u_old, u_new)``: a component of ``a``
    orthogonal to that plane is multiplied by ``cos(theta)`` and the radial component along
    ``u_old`` is dropped (``T(u_old) = 0``, eq. 74). See :func:`parallel_transport` for the
    exact transport. Returns ``a`` unchanged for a zero-norm group.

    Args:
      a: the vector moved (a momentum), shaped like the leaf.
      x_old, x_new: the group's point before and after the step.
      group: the group.

    Returns:
      The transported vector, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.geometry import transport
      >>> from optax_sphere.groups import Group
      >>> g = Group((0,))  # one group per column
      >>> x_old, x_new = jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [1.0]])
      >>> transport(jnp.array([[0.0], [1.0]]), x_old, x_new, g).tolist()  # a quarter turn
      [[-1.0], [0.0]]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", app. D.2, eqs. 72 and 74.
    """
    a, x_old, x_new = _acc(a, x_old, x_new)
    norm_prod = jnp.sqrt(group_sq_norm(x_old, group)) * jnp.sqrt(group_sq_norm(x_new, group))
    coef_a = safe_div(group_dot(x_old, x_new, group), norm_prod)
    coef_x = safe_div(group_dot(a, x_new, group), norm_prod)
    return jnp.where(norm_prod > 0, coef_a * a - coef_x * x_old, a)


def rescale(a: jax.Array, x_old: jax.Array, x_new: jax.Array, group: Group) -> jax.Array:
    """Rescale R of Roburin et al. eq. 69: ``(r_old / r_new) a``.

    Args:
      a: the vector moved (a momentum), shaped like the leaf.
      x_old, x_new: the group's point before and after the step.
      group: the group.

    Returns:
      ``(r_old / r_new) a``, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.geometry import rescale
      >>> from optax_sphere.groups import Group
      >>> g = Group((0,))  # one group per column
      >>> x_old, x_new = jnp.array([[1.0], [0.0]]), jnp.array([[2.0], [0.0]])
      >>> rescale(jnp.array([[1.0], [1.0]]), x_old, x_new, g).tolist()
      [[0.5], [0.5]]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eq. 69.
    """
    a, x_old, x_new = _acc(a, x_old, x_new)
    r_old = jnp.sqrt(group_sq_norm(x_old, group))
    r_new = jnp.sqrt(group_sq_norm(x_new, group))
    return jnp.where((r_old > 0) & (r_new > 0), safe_div(r_old, r_new) * a, a)


def rescale_transport(a: jax.Array, x_old: jax.Array, x_new: jax.Array, group: Group) -> jax.Array:
    """RT of Roburin et al. eq. 75: ``(<x_new,x_old> a - <x_new,a> x_old) / <x_new,x_new>``.

    Equal to ``rescale(transport(a))`` (R and T commute). ``RT(x_old) = 0``.

    Args:
      a: the vector moved (a momentum), shaped like the leaf.
      x_old, x_new: the group's point before and after the step.
      group: the group.

    Returns:
      The rescaled and transported vector, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.geometry import rescale_transport
      >>> from optax_sphere.groups import Group
      >>> g = Group((0,))  # one group per column
      >>> x_old, x_new = jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [2.0]])
      >>> rescale_transport(jnp.array([[0.0], [1.0]]), x_old, x_new, g).tolist()
      [[-0.5], [0.0]]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", eq. 75.
    """
    a, x_old, x_new = _acc(a, x_old, x_new)
    den = group_sq_norm(x_new, group)
    ok = (den > 0) & (group_sq_norm(x_old, group) > 0)
    coef_a = safe_div(group_dot(x_new, x_old, group), den)
    coef_x = safe_div(group_dot(x_new, a, group), den)
    return jnp.where(ok, coef_a * a - coef_x * x_old, a)


def parallel_transport(a: jax.Array, x_old: jax.Array, x_new: jax.Array, group: Group) -> jax.Array:
    """Exact Levi-Civita parallel transport on the sphere along the great circle.

    ``a`` is first projected onto the tangent space at ``u_old``; then
    ``Gamma(a) = a - <a, u_new> / (1 + <u_old, u_new>) (u_old + u_new)``, which is an
    isometry from ``T_{u_old}`` onto ``T_{u_new}`` (it preserves norms and inner products of
    tangent vectors, and is the identity when ``u_new = u_old``). For antipodal points the
    geodesic is not unique and ``a`` is returned tangent-projected only.

    Args:
      a: the vector moved (a momentum), shaped like the leaf.
      x_old, x_new: the group's point before and after the step.
      group: the group.

    Returns:
      The transported vector, tangent at ``u_new``, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.geometry import parallel_transport
      >>> from optax_sphere.groups import Group
      >>> g = Group((0,))  # one group per column
      >>> x_old, x_new = jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [1.0]])
      >>> parallel_transport(jnp.array([[0.0], [1.0]]), x_old, x_new, g).tolist()
      [[-1.0], [0.0]]

    References:
      Absil, Mahony and Sepulchre, "Optimization Algorithms on Matrix Manifolds", sec. 8.1; Cho and
      Lee, NeurIPS 2017, eq. 11.
    """
    a, x_old, x_new = _acc(a, x_old, x_new)
    r_old = jnp.sqrt(group_sq_norm(x_old, group))
    r_new = jnp.sqrt(group_sq_norm(x_new, group))
    u_old = safe_div(x_old, r_old)
    u_new = safe_div(x_new, r_new)
    a = a - group_dot(a, u_old, group) * u_old
    cos = group_dot(u_old, u_new, group)
    coef = safe_div(group_dot(a, u_new, group), 1 + cos)
    return a - coef * (u_old + u_new)


def step_parts(x: jax.Array, delta: jax.Array, group: Group) -> tuple[jax.Array, ...]:
    """The per-group sums of a step ``x -> x + delta`` that its angle and the monitor's
    statistics are made of, ``keepdims``, in at least float32: ``||x||^2``,
    ``<x, delta>``, ``||delta||^2``, ``along = <x, delta> / r^2`` and
    ``perp = ||delta - along x||`` (the tangential part, from its own reduction, so that tiny
    angles keep full relative precision)."""
    x, delta = _acc(x, delta)
    xx = group_sq_norm(x, group)
    xd = group_dot(x, delta, group)
    dd = group_sq_norm(delta, group)
    along = safe_div(xd, xx)
    perp = jnp.sqrt(group_sq_norm(delta - along * x, group))
    return xx, xd, dd, along, perp


def angle_of_step(xx: jax.Array, xd: jax.Array, perp: jax.Array) -> jax.Array:
    """The angle of a step from :func:`step_parts`: ``atan2(r ||delta_perp||, <x, x +
    delta>)`` (Kosson et al. eqs. 12, 37), accurate for tiny angles and over ``[0, pi]``;
    0 for a zero group."""
    r = jnp.sqrt(xx)
    return jnp.where(r > 0, jnp.arctan2(r * perp, xx + xd), 0)


def angle(x_old: jax.Array, x_new: jax.Array, group: Group) -> jax.Array:
    """Angle between ``x_old`` and ``x_new`` per group (Kosson et al. eq. 5), in radians.

    Computed as ``atan2(r ||delta_perp||, <x_old, x_new>)`` from the tangential part of the
    step ``delta = x_new - x_old`` (``angle_of_step``, the monitor's formula), which is
    accurate over the whole range: for tiny angles (where ``arccos`` of the cosine is not)
    and near ``pi``. Zero-norm groups give 0.

    Args:
      x_old, x_new: the group's point before and after the step.
      group: the group.

    Returns:
      The angle per group (``keepdims``), in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.geometry import angle
      >>> from optax_sphere.groups import Group
      >>> g = Group((0,))  # one group per column
      >>> float(angle(jnp.array([[1.0], [0.0]]), jnp.array([[1.0], [1.0]]), g)[0, 0])
      0.785398...

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", ICML 2024, eq. 5.
    """
    x_old, x_new = _acc(x_old, x_new)
    xx, xd, _, _, perp = step_parts(x_old, x_new - x_old, group)
    return jnp.where(group_sq_norm(x_new, group) > 0, angle_of_step(xx, xd, perp), 0)


def exp_map(u: jax.Array, v: jax.Array, group: Group) -> jax.Array:
    """Exponential map of the unit sphere: ``u cos|v| + (v/|v|) sin|v|`` for tangent ``v``.

    Args:
      u: a unit point of the sphere, shaped like the leaf.
      v: a tangent vector at ``u``.
      group: the group.

    Returns:
      The point reached, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.geometry import exp_map
      >>> from optax_sphere.groups import Group
      >>> g = Group((0,))  # one group per column
      >>> out = exp_map(jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [jnp.pi / 2]]), g)
      >>> [abs(round(float(v), 6)) for v in out[:, 0]]
      [0.0, 1.0]

    References:
      Cho and Lee, "Riemannian approach to batch normalization", NeurIPS 2017, eq. 9.
    """
    u, v = _acc(u, v)
    norm = jnp.sqrt(group_sq_norm(v, group))
    return u * jnp.cos(norm) + safe_div(v, norm) * jnp.sin(norm)


def project_to_sphere(x: jax.Array, group: Group, radius: jax.Array | float = 1.0) -> jax.Array:
    """Retraction by projection: ``radius * x / ||x||`` (zero groups stay at zero).

    Args:
      x: the point, shaped like the leaf.
      group: the group.
      radius: the sphere's radius (a number or a ``keepdims`` array).

    Returns:
      ``radius * x / ||x||`` per group, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.geometry import project_to_sphere
      >>> from optax_sphere.groups import Group
      >>> g = Group((0,))  # one group per column
      >>> project_to_sphere(jnp.array([[3.0], [4.0]]), g).tolist()
      [[0.6000000238418579], [0.800000011920929]]

    References:
      Roburin, PhD thesis, sec. 3.4.2.
    """
    (x,) = _acc(x)
    return radius * safe_div(x, jnp.sqrt(group_sq_norm(x, group)))
