"""Sphere retraction, exact transport, and SGDG / AdamG / AdaGradG: on the sphere at every
step, equal to unfused transcriptions of the published algorithms, BN training."""

import bn_training
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import bfloat16_bound, float32_bound

import optax_sphere as osp
from optax_sphere import geometry
from optax_sphere.groups import Group
from optax_sphere.riemannian import _orthogonality_gradient

UNIT = Group((0, 1))  # per output unit of a (3, 4, 6) kernel


def _params(seed=0, unit_norm=False):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(3, 4, 6))
    if unit_norm:
        k = k / np.sqrt(np.sum(k * k, axis=(0, 1), keepdims=True))
    return {"k": jnp.asarray(k), "b": jnp.asarray(rng.normal(size=6))}


def _unit(x, axes=(0, 1)):
    return x / jnp.sqrt(jnp.sum(x * x, axes, keepdims=True))


def _loss(params):
    u = _unit(params["k"])
    # the bias term does not involve the kernel, so that the unfused transcriptions below can
    # drive the kernel alone
    return jnp.sum(jnp.sin(3 * u) * u[::-1]) + jnp.sum((params["b"] - 0.2) ** 2)


_grad = jax.jit(jax.grad(_loss))


def _run(tx, params, steps, grad=_grad):
    state, x, xs = tx.init(params), params, []
    update = jax.jit(tx.update)
    for _ in range(steps):
        u, state = update(grad(x), state, x)
        x = optax.apply_updates(x, u)
        xs.append(x)
    return xs, state


def _norms(x):
    return jnp.sqrt(jnp.sum(x * x, axis=(0, 1)))


# --- retraction and transport ---------------------------------------------------------


@pytest.mark.parametrize("method", ["projection", "exp"])
@pytest.mark.parametrize("groups", ["unit", "tensor"])
def test_retraction_keeps_every_group_on_the_sphere(method, groups):
    tx = optax.chain(
        optax.sgd(0.3, momentum=0.9),
        osp.retract_to_sphere(method, radius=2.0, groups=groups),
    )
    xs, _ = _run(tx, _params(1), 10)
    axes = (0, 1) if groups == "unit" else (0, 1, 2)
    for x in xs:
        np.testing.assert_allclose(jnp.sqrt(jnp.sum(x["k"] ** 2, axes)), 2.0, rtol=1e-5)


def test_projection_and_exponential_map_agree_to_first_order():
    with jax.enable_x64(True):
        x = _params(2, unit_norm=True)
        gaps = []
        for scale in (1e-2, 1e-3):
            delta = jax.tree.map(lambda p, s=scale: s * jnp.cos(7 * p), x)
            outs = [
                osp.retract_to_sphere(m, groups="unit").update(delta, optax.EmptyState(), x)[0]["k"]
                for m in ("projection", "exp")
            ]
            gaps.append(float(jnp.max(jnp.abs(outs[0] - outs[1]))))
            assert gaps[-1] < 0.1 * scale  # both are x + Delta_perp to first order
        assert gaps[1] < gaps[0] / 50  # the gap is of second order in the step


@st.composite
def tangent_pair(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    d = draw(st.integers(2, 6))
    x_old, x_new = rng.normal(size=(d, 3)), rng.normal(size=(d, 3)) * draw(st.floats(0.1, 5))
    a, b = rng.normal(size=(d, 3)), rng.normal(size=(d, 3))
    return x_old, x_new, a, b


@settings(max_examples=10)
@given(tangent_pair())
def test_exact_transport_preserves_norms_and_inner_products_of_tangent_vectors(case):
    with jax.enable_x64(True):
        x_old, x_new, a, b = (jnp.asarray(v) for v in case)
        g = Group((0,))
        a, b = geometry.tangent_part(a, x_old, g), geometry.tangent_part(b, x_old, g)
        ta = geometry.parallel_transport(a, x_old, x_new, g)
        tb = geometry.parallel_transport(b, x_old, x_new, g)
        dot = lambda p, q: jnp.sum(p * q, axis=0)
        np.testing.assert_allclose(dot(ta, tb), dot(a, b), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(dot(ta, ta), dot(a, a), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(dot(ta, x_new), 0.0, atol=1e-10)  # tangent at the new point


def test_sgdg_momentum_is_tangent_and_keeps_its_norm_through_the_step():
    with jax.enable_x64(True):
        x = _params(3)
        tx = osp.sgdg(0.2, 0.9, groups="unit")
        state = tx.init(x)
        for _ in range(4):
            g = _grad(x)
            before = osp.grouped_state(state).tangent_momentum(x)["k"]
            # B' = mu B - h before the transport (the buffer without the learning rate, as
            # optax.sgd's trace), from the unfused formulas
            h = geometry.tangent_part(g["k"], x["k"], UNIT)
            m_new = 0.9 * before - h
            u, state = tx.update(g, state, x)
            x = optax.apply_updates(x, u)
            after = osp.grouped_state(state).tangent_momentum(x)["k"]
            # kept and tangent up to Cho & Lee's 1e-8 in the unit vectors of the transport
            np.testing.assert_allclose(_norms(after), _norms(m_new), rtol=CHO_LEE_EPS_F32)
            tangent = jnp.sum(after * x["k"], axis=(0, 1))
            np.testing.assert_allclose(tangent, 0.0, atol=CHO_LEE_EPS_F32 * _norms(after).max())


# --- the aliases against the published algorithms ---------------------------------------


def test_sgdg_equals_the_chain_of_primitives_with_exact_transport():
    with jax.enable_x64(True):
        params = _params(4, unit_norm=True)
        fused, _ = _run(osp.sgdg(0.1, 0.9, ungrouped_learning_rate=0.01, groups="unit"), params, 12)
        sphere = osp.transport_momentum(
            optax.chain(
                osp.project_tangent(groups="unit"),
                optax.sgd(0.1, momentum=0.9),
                osp.retract_to_sphere("exp", groups="unit"),
            ),
            exact=True,
            groups="unit",
        )
        # the weights off the sphere: SGD with Nesterov momentum at their own learning rate
        chain = optax.multi_transform(
            {"on": sphere, "off": optax.sgd(0.01, momentum=0.9, nesterov=True)},
            {"k": "on", "b": "off"},
        )
        ref, _ = _run(chain, params, 12)
        for a, b in zip(fused, ref):
            # the same algorithm up to Cho & Lee's 1e-8 in every normalisation: a relative
            # change of 1e-8 / ||v|| per step, with momentum norms ||v|| down to 1e-3 here
            np.testing.assert_allclose(a["k"], b["k"], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(a["b"], b["b"], rtol=1e-10, atol=1e-12)


#: a float32 point on the sphere after 4 steps, from a float64 transcription: each step
#: rebuilds the point from the momentum through a coefficient of at least 1/2 and takes a sine
#: and a cosine of an angle up to 3 pi / 2 (condition <= 10), over groups of 54 elements
SPHERE_STEP_F32 = float32_bound(steps=4, condition=10, length=54)
#: float32 steps plus Cho & Lee's 1e-8 in the unit vector of the transport (about 1e-8 / ||m||
#: relative, ||m|| ~ 1e-2 here)
CHO_LEE_EPS_F32 = float32_bound(steps=4, condition=10) + 4e-6


# Cho & Lee's code normalises as unit(v) = v / (||v|| + 1e-8) (gutils.unit), per group: the
# transcriptions below follow it (their exp map and their two parallel transports)
def _cl_unit(v):
    return v / (jnp.sqrt(jnp.sum(v * v, axis=(0, 1), keepdims=True)) + 1e-8)


def _cl_exp(y, h):
    """gexp: y cos|h| + unit(h) sin|h|."""
    t = jnp.sqrt(jnp.sum(h * h, axis=(0, 1), keepdims=True))
    return y * jnp.cos(t) + _cl_unit(h) * jnp.sin(t)


def _cl_transport(y, h, d):
    """gpt: d moved along the geodesic from y with velocity h."""
    t = jnp.sqrt(jnp.sum(h * h, axis=(0, 1), keepdims=True))
    u = _cl_unit(h)
    return d - jnp.sum(u * d, axis=(0, 1), keepdims=True) * (y * jnp.sin(t) + u * (1 - jnp.cos(t)))


def _cl_self_transport(y, h):
    """gpt2: h moved along its own geodesic."""
    t = jnp.sqrt(jnp.sum(h * h, axis=(0, 1), keepdims=True))
    return t * (_cl_unit(h) * jnp.cos(t) - y * jnp.sin(t))


def _clip(h, c):
    n = jnp.sqrt(jnp.sum(h * h, axis=(0, 1), keepdims=True))
    return h * jnp.minimum(1.0, c / n)


def _adamg_reference(params, steps, lr, b1, b2, eps, clip, omega):
    """Cho & Lee's AdamG step by step, unfused, as their code does it."""
    x = params["k"]
    m = jnp.zeros_like(x)
    v = jnp.zeros((1, 1, x.shape[-1]))
    xs = []
    for t in range(1, steps + 1):
        g = _grad({"k": x, "b": params["b"]})["k"]
        u = _cl_unit(x)
        if omega:
            y = u.reshape(-1, x.shape[-1]).T  # rows: unit vectors of the groups
            g = g + (2 * omega * (y @ y.T @ y - y)).T.reshape(x.shape)
        h = geometry.tangent_part(g, u, UNIT)
        if clip is not None:
            h = _clip(h, clip)
        m = b1 * m + (1 - b1) * h
        v = b2 * v + (1 - b2) * jnp.sum(h * h, axis=(0, 1), keepdims=True)
        delta = -lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / jnp.sqrt(v + eps)
        x, m = _cl_exp(u, delta), _cl_transport(u, delta, m)
        xs.append(x)
    return xs


@pytest.mark.parametrize("clip, omega", [(None, 0.0), (0.05, 0.0), (None, 0.1)])
def test_adamg_equals_an_unfused_transcription(clip, omega):
    with jax.enable_x64(True):
        params = _params(5)
        ref = _adamg_reference(params, 10, 0.05, 0.9, 0.99, 1e-8, clip, omega)
        fused, _ = _run(
            osp.adamg(0.05, 0.9, 0.99, 1e-8, grad_clip=clip, omega=omega, groups="unit"), params, 10
        )
        for a, b in zip(fused, ref):
            # the regulariser's unit vectors are exact here, Cho & Lee's unit() has 1e-8: a
            # relative change of 1e-8 / ||v|| per normalisation, ||v|| down to 1e-2 here
            tol = 1e-6 if omega else 1e-7
            np.testing.assert_allclose(a["k"], b, rtol=tol, atol=tol / 100)
            # unit norm up to their 1e-8 added to the norm (1e-8 / ||x|| per step, 10 steps)
            np.testing.assert_allclose(_norms(a["k"]), 1.0, rtol=1e-6)


def test_sgdg_with_clipping_equals_an_unfused_transcription():
    with jax.enable_x64(True):
        params = _params(6)
        x, mom = params["k"], jnp.zeros_like(params["k"])
        fused, _ = _run(osp.sgdg(0.3, 0.9, grad_clip=0.02, groups="unit"), params, 8)
        for t in range(8):
            g = _grad({"k": x, "b": params["b"]})["k"]
            u = _cl_unit(x)
            mom = 0.9 * mom - 0.3 * _clip(geometry.tangent_part(g, u, UNIT), 0.02)
            x, mom = _cl_exp(u, mom), _cl_self_transport(u, mom)
            np.testing.assert_allclose(fused[t]["k"], x, rtol=1e-9, atol=1e-11)


def _gradients_with_unit_first_step(x0, steps, seed):
    """Gradients whose first tangent part has norm 1 in every group (so that the first step
    turns every group by exactly the learning rate), then arbitrary ones."""
    rng = np.random.default_rng(seed)
    first = geometry.tangent_part(jnp.asarray(rng.normal(size=x0.shape)), x0, UNIT)
    gs = [first / _norms(first)]
    return gs + [jnp.asarray(rng.normal(size=x0.shape)) for _ in range(steps - 1)]


# quarter turn, just below and above two thirds of a half turn, half turn, three quarters
ANGLES = [np.pi / 2, 2 * np.pi / 3 - 1e-3, 2 * np.pi / 3 + 1e-3, np.pi, 3 * np.pi / 2, 0.3]


@pytest.mark.parametrize("angle", ANGLES)
@pytest.mark.parametrize("name", ["sgdg", "adamg"])
def test_float32_sphere_steps_stay_within_rounding_of_float64_at_every_angle(name, angle):
    """The step writes the new momentum first and rebuilds the point from it: at no angle may
    that divide by a vanishing coefficient (cos(angle) at a quarter turn would)."""
    steps, lr = 4, float(np.float32(angle))
    with jax.enable_x64(True):
        x0 = _params(11, unit_norm=True)["k"]
        gs = _gradients_with_unit_first_step(x0, steps, seed=12)
        x, mom, v, ref = x0, jnp.zeros_like(x0), jnp.zeros((1, 1, 6)), []
        for t, g in enumerate(gs, start=1):  # Cho & Lee's code, float64
            u = _cl_unit(x)
            h = geometry.tangent_part(g, u, UNIT)
            if name == "sgdg":
                mom = 0.9 * mom - lr * h
                x, mom = _cl_exp(u, mom), _cl_self_transport(u, mom)
            else:
                mom = 0.9 * mom + 0.1 * h
                v = 0.99 * v + 0.01 * jnp.sum(h * h, axis=(0, 1), keepdims=True)
                delta = -lr * np.sqrt(1 - 0.99**t) / (1 - 0.9**t) * mom / jnp.sqrt(v + 1e-12)
                x, mom = _cl_exp(u, delta), _cl_transport(u, delta, mom)
            ref.append(np.asarray(x))
        mom = np.asarray(mom / lr if name == "sgdg" else mom)  # the aliases' momentum
    if name == "sgdg":
        tx = osp.sgdg(lr, 0.9, groups={"k": "unit"})
    else:
        tx = osp.adamg(lr, 0.9, 0.99, 1e-12, groups={"k": "unit"})
    params = {"k": jnp.asarray(x0, jnp.float32)}
    state, update = tx.init(params), jax.jit(tx.update)
    for g, expected in zip(gs, ref):
        u, state = update({"k": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, u)
        np.testing.assert_allclose(params["k"], expected, atol=SPHERE_STEP_F32)
    momentum = osp.grouped_state(state).tangent_momentum(params)["k"]
    np.testing.assert_allclose(momentum, mom, atol=SPHERE_STEP_F32 * np.max(np.abs(mom)))


@pytest.mark.parametrize("layout", ["flax", "leading_units"])
def test_orthogonality_regulariser_is_the_gradient_of_its_loss(layout):
    """2 omega (Y Y^T Y - Y) = d/dY of (omega / 2) ||Y Y^T - I||^2, Y: rows = unit vectors."""
    with jax.enable_x64(True):
        x = _params(7)["k"]  # (3, 4, 6): 6 groups of 12
        group = UNIT
        if layout == "leading_units":  # (6, 3, 4), groups over the last two axes
            x, group = jnp.transpose(x, (2, 0, 1)), Group((1, 2))
        to_rows = (
            (lambda k: k.reshape(-1, 6).T) if layout == "flax" else (lambda k: k.reshape(6, -1))
        )
        y = _unit(x, group.axes)

        def loss(yy):
            rows = to_rows(yy)
            return 0.5 * 0.3 * jnp.sum((rows @ rows.T - jnp.eye(6)) ** 2)

        expected = jax.jit(jax.grad(loss))(y)
        ours = jax.jit(_orthogonality_gradient, static_argnums=(1, 2))(x, group, 0.3)
        np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


def test_adagradg_equals_the_thesis_equations_and_stays_on_the_sphere():
    """Roburin's thesis sec. 3.4.2: x_hat = x - lr g / sqrt(v_k), x = x_hat / ||x_hat||,
    v = beta v + ||g||^2."""
    with jax.enable_x64(True):
        params = _params(8, unit_norm=True)
        lr, beta, v0 = 0.7, 0.99, 3.0
        fused, state = _run(osp.adagradg(lr, beta, v0, groups="unit"), params, 10)
        x, v = params["k"], jnp.full((1, 1, 6), v0)
        b, vb = params["b"], jnp.full(6, v0)
        for t in range(10):
            g = _grad({"k": x, "b": b})
            x_hat = x - lr * g["k"] / jnp.sqrt(v)
            x = _unit(x_hat)
            v = beta * v + jnp.sum(g["k"] ** 2, axis=(0, 1), keepdims=True)
            vb = beta * vb + g["b"] ** 2  # ungrouped: optax.adagrad's order, started at v0
            b = b - lr * g["b"] / jnp.sqrt(vb + 1e-7)
            np.testing.assert_allclose(fused[t]["k"], x, rtol=1e-11, atol=1e-13)
            np.testing.assert_allclose(fused[t]["b"], b, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(osp.grouped_state(state).nu["k"], v, rtol=1e-11)


def test_adagradg_accepts_a_per_group_v0_tree():
    params = _params(9)
    v0 = {"k": jnp.arange(1.0, 7.0).reshape(1, 1, 6), "b": 2.0}
    state = osp.adagradg(0.5, 0.9, v0, groups="unit").init(params)
    np.testing.assert_allclose(osp.grouped_state(state).nu["k"][0, 0], np.arange(1.0, 7.0))
    (rss, _) = state.inner_states["ungrouped"].inner_state  # AdaGrad's, off the sphere
    np.testing.assert_allclose(rss.sum_of_squares["b"], 2.0)
    with pytest.raises(ValueError, match="v0"):
        osp.adagradg(0.5, 0.9, {"k": 1.0}, groups="unit").init(params)


@pytest.mark.parametrize("alias", [osp.sgdg, osp.adamg, osp.adagradg])
def test_zero_groups_and_zero_gradients_stay_finite_and_unchanged(alias):
    tx = alias(groups="unit")
    params = {"k": jnp.zeros((4, 3)).at[:, 0].set(1.0), "b": jnp.zeros(3)}
    state = tx.init(params)
    g = {"k": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    update = jax.jit(tx.update)
    for _ in range(2):
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves((params, state)))
    np.testing.assert_array_equal(params["k"][:, 1:], 0.0)
    np.testing.assert_allclose(jnp.linalg.norm(params["k"][:, 0]), 1.0, rtol=1e-6)


def test_bf16_params_keep_float32_state():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params(10))
    for tx in (osp.sgdg(groups="unit"), osp.adamg(groups="unit"), osp.adagradg(groups="unit")):
        state = tx.init(params)
        u, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
        assert u["k"].dtype == jnp.bfloat16
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state)[1:])


@pytest.mark.parametrize("alias", [osp.sgdg, osp.adamg])
def test_bf16_params_follow_the_float32_trajectory(alias):
    """Below float32 the momentum is kept as it is (no offset: the parameters' rounding
    would enter it), and the steps stay those of float32 parameters to bf16 rounding."""
    params32 = {"k": _params(13, unit_norm=True)["k"].astype(jnp.float32)}
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params32)
    tx = alias(0.5, groups={"k": "unit"})
    states = [tx.init(params32), tx.init(params16)]
    runs = [params32, params16]
    update = jax.jit(tx.update)
    for _ in range(3):
        for i in range(2):
            g = _grad({"k": runs[i]["k"].astype(jnp.float32), "b": jnp.zeros(6)})
            u, states[i] = update({"k": g["k"].astype(runs[i]["k"].dtype)}, states[i], runs[i])
            runs[i] = optax.apply_updates(runs[i], u)
    offsets = [osp.grouped_state(s)[-1]["k"] for s in states]
    np.testing.assert_array_equal(offsets[1], 0.0)  # the offset of the momentum
    assert np.any(offsets[0] != 0)  # float32: the offset in use
    # four bf16 roundings a step (the gradient, the update, the sum, the renormalised point)
    bf16 = bfloat16_bound(steps=3, roundings=4)
    np.testing.assert_allclose(runs[1]["k"].astype(jnp.float32), runs[0]["k"], atol=bf16)
    np.testing.assert_allclose(_norms(runs[1]["k"].astype(jnp.float32)), 1.0, atol=bf16)


@pytest.mark.parametrize(
    "build",
    [
        lambda: osp.sgdg(learning_rate=-1.0, groups="unit"),
        lambda: osp.sgdg(grad_clip=0.0, groups="unit"),
        lambda: osp.adamg(b2=1.0, groups="unit"),
        lambda: osp.adamg(omega=-1.0, groups="unit"),
        lambda: osp.adagradg(decay=0.0, groups="unit"),
        lambda: osp.adagradg(v0=0.0, groups="unit"),
        lambda: osp.retract_to_sphere("cayley", groups="unit"),
        lambda: osp.retract_to_sphere(radius=0.0, groups="unit"),
    ],
)
def test_invalid_hyperparameters_fail_at_build(build):
    with pytest.raises(ValueError):
        build()


def test_inject_hyperparams_and_schedules():
    params = _params(11)
    for tx in (
        optax.inject_hyperparams(osp.sgdg)(learning_rate=0.1, momentum=0.9, groups="unit"),
        optax.inject_hyperparams(osp.adamg)(learning_rate=0.05, groups="unit"),
        optax.inject_hyperparams(osp.adagradg)(learning_rate=0.5, decay=0.99, groups="unit"),
        osp.adamg(optax.cosine_decay_schedule(0.05, 10), groups="unit"),
    ):
        xs, _ = _run(tx, params, 2)
        np.testing.assert_allclose(_norms(xs[-1]["k"]), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "alias",
    [
        lambda: osp.sgdg(0.2, groups="unit"),
        lambda: osp.adamg(0.05, groups="unit"),
        lambda: osp.adagradg(0.5, groups="unit"),
    ],
)
def test_trains_a_flax_batchnorm_network_under_jit(alias):
    losses, params = bn_training.train(alias())
    assert losses[-1] < 0.5 * losses[0]
    k = params["Conv_1"]["kernel"]
    np.testing.assert_allclose(jnp.sqrt(jnp.sum(k * k, axis=(0, 1, 2))), 1.0, rtol=1e-5)


# one alias per module (composition is generic: update functions without Python side effects)
ALL_ALIASES = {
    "adamg": lambda: osp.adamg(0.05, groups="unit"),
    "psi_sgdm": lambda: osp.psi_sgdm(0.05, groups="unit"),
    "sgdp": lambda: osp.sgdp(0.1, weight_decay=1e-3, groups="unit"),
}


@pytest.mark.parametrize("name", sorted(ALL_ALIASES))
def test_composes_with_multisteps_apply_if_finite_and_multi_transform(name):
    """Accumulating two micro-batches equals one step on their mean; a non-finite gradient is
    skipped; multi_transform routes leaves."""
    params = _params(12)
    g1, g2 = _grad(params), jax.tree.map(lambda v: 0.5 * v, _grad(params))
    mean = jax.tree.map(lambda a, b: 0.5 * (a + b), g1, g2)
    plain = ALL_ALIASES[name]()
    one, _ = plain.update(mean, plain.init(params), params)
    multi = optax.MultiSteps(ALL_ALIASES[name](), every_k_schedule=2)
    state = multi.init(params)
    update = multi.update
    _, state = update(g1, state, params)
    two, state = update(g2, state, params)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    guarded = optax.apply_if_finite(ALL_ALIASES[name](), max_consecutive_errors=3)
    state = guarded.init(params)
    bad = jax.tree.map(lambda v: v.at[(0,) * v.ndim].set(jnp.nan), g1)
    u, state = guarded.update(bad, state, params)
    assert all(bool(jnp.all(u_leaf == 0)) for u_leaf in jax.tree.leaves(u))

    routed = optax.multi_transform(
        {"sphere": ALL_ALIASES[name](), "sgd": optax.sgd(0.1)}, {"k": "sphere", "b": "sgd"}
    )
    u, _ = routed.update(g1, routed.init(params), params)
    np.testing.assert_allclose(u["b"], -0.1 * g1["b"], rtol=1e-6)
    alone = ALL_ALIASES[name]()
    k_only = {"k": params["k"]}
    expected, _ = alone.update({"k": g1["k"]}, alone.init(k_only), k_only)
    np.testing.assert_allclose(u["k"], expected["k"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alias", [osp.sgdg, osp.adamg])
def test_sphere_optimizers_under_nnx_optimizer_and_nnx_jit(alias):
    """``nnx.Optimizer`` rebuilds the state after each jitted update; the grouped kernel
    stays on the unit sphere and the loss falls."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(256, 128, use_bias=False, rngs=rngs)
            self.norm = nnx.BatchNorm(128, rngs=rngs)
            self.head = nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.norm(self.hidden(x))))

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (32, 256))
    y = jnp.arange(32) % 10
    groups = osp.find_groups(model, x)
    optimizer = nnx.Optimizer(model, alias(groups=groups), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer)) for _ in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    kernel = model.hidden.kernel[...]
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["sgdg", "adamg"])
def test_with_nothing_grouped_the_learning_rate_given_is_sgd_nesterovs(name):
    """The leaves off the sphere step at ``learning_rate`` unless ``ungrouped_learning_rate``
    is given: with nothing grouped the alias is ``optax.sgd(lr, 0.9, nesterov=True)``, and it
    converges on Rosenbrock's function as that does."""

    def rosenbrock(p):
        return (1 - p["x"]) ** 2 + 100 * (p["y"] - p["x"] ** 2) ** 2

    def run(tx, steps):
        p = {"x": jnp.asarray(-1.0), "y": jnp.asarray(1.0)}
        state = tx.init(p)

        @jax.jit
        def step(p, state):
            updates, state = tx.update(jax.grad(rosenbrock)(p), state, p)
            return optax.apply_updates(p, updates), state

        for _ in range(steps):
            p, state = step(p, state)
        return p

    alias = getattr(osp, name)
    got = run(alias(learning_rate=1e-3, groups=None), 2000)
    chex.assert_trees_all_equal(got, run(optax.sgd(1e-3, momentum=0.9, nesterov=True), 2000))
    assert float(rosenbrock(got)) < 1e-6
    slower = run(alias(learning_rate=1e-3, ungrouped_learning_rate=1e-4, groups=None), 50)
    chex.assert_trees_all_equal(slower, run(optax.sgd(1e-4, momentum=0.9, nesterov=True), 50))
