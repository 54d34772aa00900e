"""Invariants of every primitive, over random shapes, group specs and dtypes (hypothesis).

Geometry (``optax_sphere.geometry``): tangency of projections and transports, norm and inner
product preservation of the exact transport, unit norm of the exponential map and of the
projection, and invariance under a positive rescaling of each group *separately* (which also
proves that no reduction mixes two groups). Transforms: the momentum left by every transport
is tangent at the new point; R multiplies it by ``r_k / r_k+1``; standardisation is invariant
to a per-group rescaling of the gradients. Inputs in bfloat16 / float16 are computed in float32,
so the invariants hold to float32 precision of the rounded inputs.
"""

import math

import alias_cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_sphere as osp
from optax_sphere import geometry
from optax_sphere.groups import Group, group_dot, group_sq_norm

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
FEW = settings(max_examples=12, deadline=None, derandomize=True)


@st.composite
def leaves(draw, n=3, near=False):
    """``n`` arrays of one random shape and dtype, a random group over its axes, and a
    positive power-of-two scale per group (exact in every dtype)."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axes = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=1))))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    group = Group(axes)
    arrays = [rng.normal(size=shape) for _ in range(n)]
    if near:  # second array a perturbation of the first (x_k -> x_k+1 of a step)
        arrays[1] = arrays[0] + 0.3 * rng.normal(size=shape)
    scale = 2.0 ** rng.integers(-3, 4, size=group.scalar_shape(shape))
    cast = [jnp.asarray(a, dtype) for a in arrays]
    return group, cast, jnp.asarray(scale, dtype)


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


def _dot(a, b, group):
    return np.asarray(group_dot(*_f32(a, b), group), np.float64)


def _norm(a, group):
    return np.sqrt(np.asarray(group_sq_norm(jnp.asarray(a, jnp.float32), group), np.float64))


def _tangent_at(v, x, group, scale_of_v):
    """|<v, u>| small against ``scale_of_v`` (per group), u = x / ||x||."""
    cos = np.abs(_dot(v, x, group)) / np.maximum(_norm(x, group), 1e-30)
    np.testing.assert_array_less(cos, 1e-5 * np.maximum(scale_of_v, 1e-30) + 1e-30)


@FEW
@given(leaves())
def test_tangent_part_is_tangent_and_complements_the_radial_part(case):
    group, (q, x, _), scale = case
    t = geometry.tangent_part(q, x, group)
    assert t.dtype == jnp.float32
    _tangent_at(t, x, group, _norm(q, group))
    np.testing.assert_allclose(t + geometry.radial_part(q, x, group), _f32(q)[0], atol=1e-5)
    np.testing.assert_allclose(geometry.tangent_part(t, x, group), t, atol=1e-5)
    # depends on the direction of each group only
    np.testing.assert_allclose(geometry.tangent_part(q, x * scale, group), t, atol=1e-5)


@FEW
@given(leaves(near=True))
def test_paper_transport_lands_in_the_new_tangent_space_and_kills_the_old_direction(case):
    group, (x0, x1, a), scale = case
    t = geometry.transport(a, x0, x1, group)
    _tangent_at(t, x1, group, _norm(a, group))
    np.testing.assert_allclose(geometry.transport(x0, x0, x1, group), 0.0, atol=1e-5)
    # eq. 72 depends on the directions u_k, u_k+1 only: rescale each group of each point
    np.testing.assert_allclose(
        geometry.transport(a, x0 * scale, x1 * scale * scale, group), t, rtol=1e-4, atol=1e-5
    )


@FEW
@given(leaves(near=True))
def test_rescale_transport_is_r_after_t_and_is_invariant_to_a_common_scale(case):
    group, (x0, x1, a), scale = case
    rt = geometry.rescale_transport(a, x0, x1, group)
    r_after_t = geometry.rescale(geometry.transport(a, x0, x1, group), x0, x1, group)
    np.testing.assert_allclose(rt, r_after_t, rtol=1e-4, atol=1e-5)
    _tangent_at(rt, x1, group, _norm(a, group) * _norm(x0, group) / _norm(x1, group))
    np.testing.assert_allclose(geometry.rescale_transport(x0, x0, x1, group), 0.0, atol=1e-5)
    np.testing.assert_allclose(
        geometry.rescale_transport(a, x0 * scale, x1 * scale, group), rt, rtol=1e-4, atol=1e-5
    )


@FEW
@given(leaves(n=4, near=True))
def test_exact_parallel_transport_is_an_isometry_between_tangent_spaces(case):
    group, (x0, x1, a, b), scale = case
    a, b = geometry.tangent_part(a, x0, group), geometry.tangent_part(b, x0, group)
    pa = geometry.parallel_transport(a, x0, x1, group)
    pb = geometry.parallel_transport(b, x0, x1, group)
    size = _norm(a, group) * _norm(b, group)
    np.testing.assert_allclose(_dot(pa, pb, group), _dot(a, b, group), atol=1e-5 * size.max())
    np.testing.assert_allclose(_norm(pa, group), _norm(a, group), rtol=1e-4, atol=1e-6)
    _tangent_at(pa, x1, group, _norm(a, group))
    np.testing.assert_allclose(
        geometry.parallel_transport(a, x0 * scale, x1, group), pa, rtol=1e-4, atol=1e-5
    )


@FEW
@given(leaves())
def test_exp_map_and_projection_land_on_the_sphere(case):
    group, (x, v, _), scale = case
    u = geometry.project_to_sphere(x, group)
    np.testing.assert_allclose(_norm(u, group), 1.0, rtol=1e-5)
    np.testing.assert_allclose(_norm(geometry.project_to_sphere(x, group, 3.0), group), 3.0, 1e-5)
    np.testing.assert_allclose(geometry.project_to_sphere(x * scale, group), u, atol=1e-5)
    step = geometry.exp_map(u, geometry.tangent_part(v, u, group), group)
    np.testing.assert_allclose(_norm(step, group), 1.0, rtol=1e-5)


@FEW
@given(leaves(near=True))
def test_angle_is_scale_invariant_symmetric_and_in_range(case):
    group, (x0, x1, _), scale = case
    theta = np.asarray(geometry.angle(x0, x1, group))
    assert np.all(theta >= 0) and np.all(theta <= math.pi + 1e-6)
    np.testing.assert_allclose(geometry.angle(x1, x0, group), theta, atol=1e-5)
    np.testing.assert_allclose(geometry.angle(x0 * scale, x1, group), theta, atol=1e-5)
    np.testing.assert_allclose(geometry.angle(x0, x0 * scale, group), 0.0, atol=1e-3)
    x0_32 = _f32(x0)[0]
    np.testing.assert_allclose(geometry.angle(x0_32, -x0_32, group), math.pi, rtol=1e-6)
    np.testing.assert_array_equal(geometry.angle(0 * x0_32, x0_32, group), 0.0)  # no direction


def _spec_for(group):
    return {"w": group.axes}


@FEW
@given(leaves(n=3))
def test_standardisation_is_invariant_to_a_per_group_gradient_scale(case):
    """``m / sqrt(v)`` with a per-group scalar ``v``: multiplying the gradients of a group by
    ``c > 0`` at every step leaves its step unchanged (up to eps), each group on its own."""
    group, grads, scale = case
    tx = osp.scale_by_standardized_adam(0.9, 0.99, eps=1e-12, groups=_spec_for(group))
    steps = []
    for c in (1.0, scale):
        state = tx.init({"w": grads[0]})
        for g in grads:
            u, state = tx.update({"w": jnp.asarray(g * c, g.dtype)}, state)
        steps.append(np.asarray(u["w"], np.float32))
    np.testing.assert_allclose(
        steps[1], steps[0], rtol=2e-2 if grads[0].dtype != jnp.float32 else 1e-4, atol=1e-3
    )


TRANSPORTING = [
    "adam_st",
    "adam_srt",
    "sgdm_rt",
    "transport_momentum(adam)",
    "transport_momentum(adam,exact=True)",
    "rescale_transport_momentum(scale_by_standardized_adam)",
]


def _momentum(state):
    """The params-shaped momentum buffer of a state (first field named mu / trace)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [getattr(k, "name", None) for k in path]
        if "mu" in names or "trace" in names:
            return leaf
    raise AssertionError("no momentum in the state")


@FEW
@given(leaves(n=3), st.sampled_from(TRANSPORTING))
def test_momentum_after_a_transporting_step_is_tangent_at_the_new_point(case, name):
    """Roburin et al. eq. 72-75: T and RT map the momentum into the tangent space at x_k+1, for the
    fused aliases and for the wrappers around any inner optimizer."""
    case_ = alias_cases.BY_NAME[name]
    group, (x, g0, g1), _ = case
    x = jnp.asarray(x, jnp.float32) + 0.0  # float32 params: optax inner optimizers follow them
    # The fused aliases keep m_k where it was computed and transport it at the start of the
    # next update (documented): a probe step with a zero gradient and no weight decay stores
    # beta T(m_k), the transported momentum, which is what must be tangent at x_k+1.
    fused = case_.kind == "alias"
    tx = case_.make(
        learning_rate=0.05, groups=_spec_for(group), **({"weight_decay": 0.0} if fused else {})
    )
    params = {"w": x}
    state = tx.init(params)
    for g in (g0, g1):
        u, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, u)
        m = _momentum(state)
        if fused:
            _, probe = tx.update({"w": jnp.zeros_like(params["w"])}, state, params)
            m = _momentum(probe)
            assert np.any(np.asarray(m)) or group.size(x.shape) == 1  # a momentum to test
        _tangent_at(m, params["w"], group, _norm(m, group) + _norm(g, group))


@FEW
@given(leaves(n=2, near=True))
def test_rescale_multiplies_the_momentum_by_the_radius_ratio(case):
    group, (x, g), _ = case
    x, g = _f32(x, g)
    inner = optax.sgd(0.3, momentum=0.9)
    tx = osp.rescale_momentum(inner, groups=_spec_for(group))
    u, state = tx.update({"w": g}, tx.init({"w": x}), {"w": x})
    _, plain = inner.update({"w": g}, inner.init({"w": x}), {"w": x})
    x1 = x + u["w"]
    ratio = _norm(x, group) / _norm(x1, group)
    np.testing.assert_allclose(
        state[0].trace["w"], ratio * np.asarray(plain[0].trace["w"]), rtol=1e-4, atol=1e-6
    )
