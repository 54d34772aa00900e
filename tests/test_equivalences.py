"""The SGD equivalences of Roburin et al., shown on a BatchNorm-invariant problem.

* Roburin's thesis eq. 3.44: SGD with L2 and SGD without L2 under ``l2_equivalent_schedule`` visit
  the same directions (exactly).
* Roburin et al. / Roburin's thesis Theorem 4: SGD with L2 and AdaGradG with the hyperparameters of
  ``sgd_to_adagradg`` stay aligned (cosine similarity of the unit directions, as in Roburin's thesis
  fig. 3.4), while plain AdaGrad drifts away.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sphere as osp
from optax_sphere.theory import l2_equivalent_schedule, sgd_to_adagradg

D, G, STEPS = 16, 6, 200
LR, WD = 0.1, 1e-2


def _unit(x):
    return x / jnp.linalg.norm(x, axis=0, keepdims=True)


def _problem():
    rng = np.random.default_rng(0)
    target = jnp.asarray(rng.normal(size=(D, G)))
    noise = jnp.asarray(rng.normal(size=(STEPS, D, G)))

    def loss(params, t):
        # depends on each column only through its direction, like a unit followed by BatchNorm;
        # the noise plays the minibatch
        u = _unit(params["w"])
        return -jnp.sum(jnp.tanh(u * target)) + 0.5 * jnp.sum(noise[t] * u)

    x0 = jnp.asarray(rng.normal(size=(D, G)) * rng.uniform(0.5, 2.0, size=(1, G)))
    return jax.jit(jax.grad(loss)), x0


def _directions(tx, x0, grad):
    params = {"w": x0}
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for t in range(STEPS):
        u, state = update(grad(params, t), state, params)
        params = optax.apply_updates(params, u)
        out.append(_unit(params["w"]))
    return jnp.stack(out)


def _min_cosine(a, b):
    return jnp.min(jnp.sum(a * b, axis=1), axis=1)  # per step, worst group


def test_sgd_with_l2_is_sgd_under_the_exponential_schedule():
    with jax.enable_x64(True):
        grad, x0 = _problem()
        with_l2 = _directions(optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR)), x0, grad)
        scheduled = _directions(optax.sgd(l2_equivalent_schedule(LR, WD)), x0, grad)
        np.testing.assert_allclose(scheduled, with_l2, atol=1e-12)
        # without the schedule the directions differ: the test can fail
        constant = _directions(optax.sgd(LR), x0, grad)
        assert float(jnp.max(jnp.abs(constant - with_l2))) > 1e-2


def test_sgd_with_l2_and_the_equivalent_adagradg_stay_aligned_while_adagrad_drifts():
    with jax.enable_x64(True):
        grad, x0 = _problem()
        sgd = _directions(optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR)), x0, grad)
        radius = jnp.linalg.norm(x0, axis=0, keepdims=True)  # per-group r_0
        hyper = sgd_to_adagradg(LR, WD, {"w": radius})
        adagradg = _directions(osp.adagradg(**hyper, groups="unit"), _unit(x0), grad)
        adagrad = _directions(optax.adagrad(0.05), x0, grad)
        aligned = _min_cosine(sgd, adagradg)
        assert float(jnp.min(aligned)) > 1 - 1e-6  # every step, every group
        assert float(_min_cosine(sgd, adagrad)[-1]) < 0.9
        # a wrong equivalence (beta = (1 - lr wd)^2, or v0 twice as large) misaligns by > 1e-5
        for wrong in (
            dict(hyper, decay=(1 - LR * WD) ** 2),
            dict(hyper, v0={"w": 2 * hyper["v0"]["w"]}),
        ):
            off = _directions(osp.adagradg(**wrong, groups="unit"), _unit(x0), grad)
            assert float(jnp.min(_min_cosine(sgd, off))) < 1 - 1e-5


def test_sgd_to_adagradg_values():
    hyper = sgd_to_adagradg(0.1, 1e-3, 2.0)
    beta = (1 - 1e-4) ** 4
    assert hyper["decay"] == pytest.approx(beta, rel=1e-15)
    assert hyper["learning_rate"] == pytest.approx((2 * beta) ** -0.5, rel=1e-15)
    assert hyper["v0"] == pytest.approx(2.0**4 / (2 * 0.1**2 * beta**0.5), rel=1e-15)
    # Roburin's thesis app. C.1: lr 1e-2, L2 1e-3 -> beta ~ 0.99996, learning rate ~ 0.71
    h = sgd_to_adagradg(1e-2, 1e-3, 1.0)
    assert h["decay"] == pytest.approx(0.99996, abs=1e-6)
    assert h["learning_rate"] == pytest.approx(0.7071, abs=1e-3)
    tree = sgd_to_adagradg(0.1, 0.0, {"a": jnp.array([1.0, 2.0])})
    np.testing.assert_allclose(tree["v0"]["a"], np.array([1.0, 16.0]) / (2 * 0.01))
    assert tree["decay"] == 1.0


def test_l2_equivalent_schedule_values():
    schedule = l2_equivalent_schedule(0.1, 0.5)
    for k in (0, 1, 7):
        assert float(schedule(k)) == pytest.approx(0.1 * 0.95 ** (-2 * k - 1), rel=1e-6)
    assert float(schedule(jnp.asarray(3))) == pytest.approx(0.1 * 0.95**-7, rel=1e-6)


@pytest.mark.parametrize(
    "args", [(0.0, 1e-3), (-0.1, 1e-3), (0.1, -1.0), (10.0, 0.2), (float("nan"), 0.0)]
)
def test_invalid_arguments_fail(args):
    with pytest.raises(ValueError):
        l2_equivalent_schedule(*args)
    with pytest.raises(ValueError):
        sgd_to_adagradg(*args, radius=1.0)


def test_sgd_to_adagradg_rejects_a_non_positive_radius():
    with pytest.raises(ValueError, match="radius"):
        sgd_to_adagradg(0.1, 1e-3, 0.0)
