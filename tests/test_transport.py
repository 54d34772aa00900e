"""R, T and RT (Roburin et al. app. D.2): identities of eqs. 72-75 as property tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given
from hypothesis import strategies as st

from optax_sphere import geometry
from optax_sphere.groups import Group, group_dot, group_sq_norm


@st.composite
def leaf_and_group(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axes = draw(st.sets(st.integers(0, ndim - 1), min_size=1))
    if all(shape[a] == 1 for a in axes):  # a one-element group has no tangent space
        shape = tuple(3 if i in axes else n for i, n in enumerate(shape))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x_old, x_new, a = (jnp.asarray(rng.normal(size=shape)) for _ in range(3))
    x_new = x_old + 0.3 * x_new  # a step of moderate size
    return Group(tuple(sorted(axes))), x_old, x_new, a


def close(a, b, tol=1e-4):
    return float(jnp.max(jnp.abs(a - b))) <= tol * (1 + float(jnp.max(jnp.abs(b))))


@given(leaf_and_group())
def test_r_then_t_is_rt(case):
    g, x0, x1, a = case
    rt = geometry.rescale_transport(a, x0, x1, g)
    assert close(geometry.transport(geometry.rescale(a, x0, x1, g), x0, x1, g), rt)
    assert close(geometry.rescale(geometry.transport(a, x0, x1, g), x0, x1, g), rt)


@given(leaf_and_group(), st.floats(-3, 3))
def test_transport_kills_old_direction_and_decouples_l2(case, lam):
    g, x0, x1, a = case
    u0 = x0 / jnp.sqrt(group_sq_norm(x0, g))
    assert close(geometry.transport(u0, x0, x1, g), jnp.zeros_like(u0))
    assert close(geometry.transport(a - lam * u0, x0, x1, g), geometry.transport(a, x0, x1, g))
    assert close(geometry.rescale_transport(x0, x0, x1, g), jnp.zeros_like(x0))


@given(leaf_and_group())
def test_transported_momentum_is_tangent_at_new_point(case):
    g, x0, x1, a = case
    for op in (geometry.transport, geometry.rescale_transport, geometry.parallel_transport):
        moved = op(a, x0, x1, g)
        cos = group_dot(moved, x1, g) / jnp.sqrt(
            group_sq_norm(x1, g) * group_sq_norm(moved, g) + 1e-30
        )
        assert float(jnp.max(jnp.abs(cos))) < 1e-4


@given(leaf_and_group())
def test_exact_parallel_transport_is_an_isometry_of_tangent_spaces(case):
    g, x0, x1, a = case
    b = jnp.roll(a, 1)
    ta, tb = geometry.tangent_part(a, x0, g), geometry.tangent_part(b, x0, g)
    pa = geometry.parallel_transport(ta, x0, x1, g)
    pb = geometry.parallel_transport(tb, x0, x1, g)
    assert close(group_dot(pa, pb, g), group_dot(ta, tb, g))
    assert close(geometry.parallel_transport(ta, x0, x0, g), ta)


@given(leaf_and_group())
def test_paper_transport_is_exact_within_the_plane(case):
    """Eq. 72 is the exact transport for tangent vectors in the plane (u_old, u_new)."""
    g, x0, x1, _ = case
    a = geometry.tangent_part(x1, x0, g)  # in the plane, tangent at u_old
    assert close(geometry.transport(a, x0, x1, g), geometry.parallel_transport(a, x0, x1, g))


def test_zero_norm_group_leaves_momentum_unchanged():
    g = Group((0,))
    a = jnp.ones((3, 2))
    x0 = jnp.zeros((3, 2))
    x1 = jnp.ones((3, 2))
    for op in (geometry.transport, geometry.rescale, geometry.rescale_transport):
        out = op(a, x0, x1, g)
        assert jnp.all(jnp.isfinite(out)) and jnp.array_equal(out, a)


def test_angle_of_a_known_rotation():
    theta = 1e-3
    x0 = jnp.array([[2.0], [0.0]])
    x1 = 5.0 * jnp.array([[np.cos(theta)], [np.sin(theta)]])
    assert abs(float(geometry.angle(x0, x1, Group((0,)))[0, 0]) - theta) < 1e-9


def test_exp_map_stays_on_sphere():
    g = Group((0,))
    u = jnp.array([[1.0], [0.0], [0.0]])
    v = jnp.array([[0.0], [0.4], [0.3]])
    y = geometry.exp_map(u, v, g)
    assert abs(float(jnp.linalg.norm(y)) - 1) < 1e-6
    assert abs(float(geometry.angle(u, y, g)[0, 0]) - 0.5) < 1e-6


def test_wrappers_compose_r_t_into_rt():
    """transport_momentum(rescale_momentum(inner)) == rescale_transport_momentum(inner)."""
    import optax_sphere as osp

    rng = np.random.default_rng(0)
    params = {"k": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=3))}
    base = optax.sgd(0.1, momentum=0.9)
    a = osp.transport_momentum(osp.rescale_momentum(base, groups="unit"), groups="unit")
    b = osp.rescale_transport_momentum(base, groups="unit")
    sa, sb, xa, xb = a.init(params), b.init(params), params, params
    for t in range(5):
        g = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)), xa)
        ua, sa = a.update(g, sa, xa)
        ub, sb = b.update(g, sb, xb)
        xa, xb = optax.apply_updates(xa, ua), optax.apply_updates(xb, ub)
    assert close(xa["k"], xb["k"], 1e-5) and close(xa["b"], xb["b"], 1e-5)


def test_wrapper_needs_a_momentum_buffer():
    import pytest

    import optax_sphere as osp

    with pytest.raises(ValueError, match="no momentum field"):
        osp.transport_momentum(optax.sgd(0.1), groups="unit").init({"k": jnp.ones((3, 2))})
