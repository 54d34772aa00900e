"""Equilibrium predictions (Kosson et al., Table 1, app. F-I) against closed forms and against a
simulation of the random-walk system of app. J trained with plain optax optimizers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_approximately

import optax_sphere as osp
from optax_sphere.theory import Equilibrium, equilibrium


def simulate(
    tx, *, steps, dim=32, units=32, batch=32, seed=0, gammas="normal", start=0, init_scale=1.0
):
    """The simple system of Kosson et al. app. J (eq. 88): ``f(X) = g_out * BN((g_in * X) W)``.

    Inputs and output gradients are drawn i.i.d. at every step (std ``1/(K B)`` for the
    latter), so the weights do a random walk; each column of ``W`` (Flax layout ``(C, K)``)
    is scale-invariant through the batch normalisation. PyTorch's default init (times
    ``init_scale``), gammas random normal or ones. Returns, per unit, the means over steps
    ``start`` to ``steps`` (default: the second half, after the transient phase) of the
    angular update, of the weight norm, and of ``(||g|| ||w||)^2`` (the squared gradient
    norm at unit weight norm, which differs between units).
    """
    k_w, k_in, k_out, k_steps = jax.random.split(jax.random.PRNGKey(seed), 4)
    bound = 1 / math.sqrt(dim)
    w0 = init_scale * jax.random.uniform(k_w, (dim, units), minval=-bound, maxval=bound)
    if gammas == "ones":
        gamma_in, gamma_out = jnp.ones(dim), jnp.ones(units)
    else:
        gamma_in, gamma_out = jax.random.normal(k_in, (dim,)), jax.random.normal(k_out, (units,))

    def f(w, x):
        y = (x * gamma_in) @ w
        return gamma_out * (y - y.mean(0)) / jnp.sqrt(y.var(0) + 1e-5)

    def step(carry, key):
        w, state = carry
        k_x, k_g = jax.random.split(key)
        x = jax.random.normal(k_x, (batch, dim))
        grad_out = jax.random.normal(k_g, (batch, units)) / (units * batch)
        g = jax.grad(lambda w: jnp.sum(f(w, x) * grad_out))(w)
        updates, state = tx.update(g, state, w)
        w1 = optax.apply_updates(w, updates)
        n0, n1 = jnp.linalg.norm(w, axis=0), jnp.linalg.norm(w1, axis=0)
        cos = jnp.clip(jnp.sum(w * w1, 0) / (n0 * n1), -1, 1)
        unit_grad = jnp.linalg.norm(g, axis=0) * n0
        return (w1, state), (jnp.arccos(cos), n1, unit_grad**2)

    run = jax.jit(lambda w, s: jax.lax.scan(step, (w, s), jax.random.split(k_steps, steps)))
    _, (angle, norm, unit_grad_sq) = run(w0, tx.init(w0))
    start = start or steps // 2
    return tuple(np.mean(np.asarray(a[start:]), axis=0) for a in (angle, norm, unit_grad_sq))


SIMULATIONS = {
    # name: (plain optax optimizer, equilibrium keywords); eta*lambda ~ 1e-3..5e-3 so the
    # transient phase (~ 1 / (2 eta lambda) steps) is short.
    "adamw": (optax.adamw(1e-2, weight_decay=0.5), dict(learning_rate=1e-2, weight_decay=0.5)),
    "sgdm": (
        optax.chain(optax.add_decayed_weights(0.05), optax.sgd(0.1, momentum=0.9)),
        dict(learning_rate=0.1, weight_decay=0.05, momentum=0.9),
    ),
    "lion": (
        optax.lion(1e-3, b1=0.9, b2=0.99, weight_decay=1.0),
        dict(learning_rate=1e-3, weight_decay=1.0, b1=0.9, b2=0.99),
    ),
}


@pytest.mark.parametrize("name", sorted(SIMULATIONS))
def test_random_walk_converges_to_predicted_equilibrium(name):
    tx, hyper = SIMULATIONS[name]
    angle, norm, unit_grad_sq = simulate(tx, steps=3000)
    pred = equilibrium(name, dim=32, grad_norm=np.sqrt(unit_grad_sq), **hyper)  # per unit
    assert_approximately(np.mean(angle / pred.angular_update), 1, abs=0.1, what=name)
    assert_approximately(np.mean(norm / pred.weight_norm), 1, abs=0.1, what=name)


def test_random_walk_adam_l2_matches_eq_84_and_87():
    """Kosson et al. app. I.2: the Adam+L2 predictions hold with unit gammas (a second moment
    uniform over the coordinates, the assumption of eq. 76)."""
    tx = optax.chain(optax.add_decayed_weights(1e-2), optax.adam(1e-2))
    angle, norm, unit_grad_sq = simulate(tx, steps=3000, gammas="ones")
    pred = equilibrium(
        "adam_l2", learning_rate=1e-2, weight_decay=1e-2, dim=32, grad_norm=np.sqrt(unit_grad_sq)
    )
    assert_approximately(np.mean(angle / pred.angular_update), 1, abs=0.1, what="adam_l2")
    assert_approximately(np.mean(norm / pred.weight_norm), 1, abs=0.1, what="adam_l2")


def test_rotational_variant_is_in_equilibrium_from_the_start():
    """Started 4x away from the equilibrium norm, RV-AdamW turns by the AdamW equilibrium
    angle after a few steps of its update-norm tracker, while plain AdamW is still in its
    transient phase (~ 1 / (2 eta lambda) = 100 steps; Kosson et al. fig. 1, app. M)."""
    hyper = dict(learning_rate=1e-2, weight_decay=0.5)
    pred = equilibrium("adamw", dim=32, **hyper).angular_update
    rv, _, _ = simulate(osp.rv_adamw(**hyper, groups="unit"), steps=100, start=20, init_scale=4.0)
    assert_approximately(np.mean(rv / pred), 1, abs=0.1, what="rv_adamw")
    plain, _, _ = simulate(optax.adamw(**hyper), steps=100, start=20, init_scale=4.0)
    assert np.mean(plain / pred) < 0.5


def test_random_walk_distinguishes_hyperparameters():
    """The prediction is not satisfied by chance: a 4x larger eta*lambda doubles the angle."""
    angle = np.mean(simulate(optax.adamw(4e-2, weight_decay=0.5), steps=3000)[0])
    small = equilibrium("adamw", learning_rate=1e-2, weight_decay=0.5, dim=32).angular_update
    big = equilibrium("adamw", learning_rate=4e-2, weight_decay=0.5, dim=32).angular_update
    assert big == pytest.approx(2 * small, rel=1e-3)
    assert angle == pytest.approx(big, rel=0.1)
    assert abs(angle - small) > 0.5 * small


def test_table_1_values():
    lr, wd, c = 1e-3, 0.1, 128
    adamw = equilibrium("adamw", learning_rate=lr, weight_decay=wd, dim=c)
    assert adamw.angular_update == pytest.approx(math.sqrt(2e-4 * 0.1 / 1.9), rel=1e-12)
    assert adamw.weight_norm == pytest.approx(math.sqrt(lr * c / (2 * wd - lr * wd**2)))
    assert adamw.rms_update == pytest.approx(lr * math.sqrt(c * 0.1 / 1.9))
    lion = equilibrium("lion", learning_rate=lr, weight_decay=wd, dim=c, b2=0.99)
    k = 0.1**2 + 0.81 * 0.01 / 1.99
    assert lion.angular_update == pytest.approx(math.sqrt(math.pi * lr * wd * k))
    assert lion.rms_update == pytest.approx(lr * math.sqrt(c))
    sgdm = equilibrium("sgdm", learning_rate=lr, weight_decay=wd, dim=c, momentum=0.9)
    assert sgdm.angular_update == pytest.approx(math.sqrt(2 * lr * wd / 1.9))
    assert sgdm.weight_norm is None and sgdm.rms_update is None
    assert equilibrium("adam_l2", learning_rate=lr, weight_decay=wd, dim=c) == (None,) * 3


@pytest.mark.parametrize("name", ["adamw", "lion", "sgdm"])
def test_angular_update_is_rms_update_over_weight_norm(name):
    """Table 1's eta_r = eta_g / ||w|| up to the dropped factor sqrt(1 - eta lambda / 2)."""
    lr, wd, mom = 3e-2, 0.2, 0.9
    e = equilibrium(name, learning_rate=lr, weight_decay=wd, dim=50, momentum=mom, grad_norm=0.7)
    dropped = lr * wd / (2 * (1 - mom)) if name == "sgdm" else lr * wd / 2
    assert e.rms_update / e.weight_norm == pytest.approx(
        e.angular_update * math.sqrt(1 - dropped), rel=1e-12
    )


@pytest.mark.parametrize("grad_norm", [1e-3, 0.3, 1.0, 50.0])
def test_adam_l2_weight_norm_is_the_real_root_of_eq_84(grad_norm):
    lr, wd, c = 1e-3, 0.1, 128
    e = equilibrium("adam_l2", learning_rate=lr, weight_decay=wd, dim=c, grad_norm=grad_norm)
    roots = np.roots([4 * wd**2, -c * lr**2 * wd**2, 0, -c * lr**2 * grad_norm**2])
    real = roots[np.abs(roots.imag) < 1e-12 * np.abs(roots)].real
    assert len(real) == 1 and real[0] > 0
    assert e.weight_norm**2 == pytest.approx(real[0], rel=1e-10)
    g2, w = grad_norm**2, e.weight_norm**2
    rms = lr * math.sqrt(c * 0.1 / 1.9 * (1 - wd**2 * w**2 / (g2 + wd**2 * w**2)))  # eq. 87
    assert e.rms_update == pytest.approx(rms, rel=1e-12)
    assert e.angular_update == pytest.approx(rms / e.weight_norm, rel=1e-12)


def test_adam_l2_rotation_depends_on_gradient_norm_unlike_adamw():
    """Kosson et al. app. I: Adam+L2's equilibrium rotation is imbalanced across gradient norms."""
    kw = dict(learning_rate=1e-3, weight_decay=0.1, dim=128)
    rates = [equilibrium("adam_l2", grad_norm=g, **kw).angular_update for g in (0.01, 1.0)]
    assert rates[0] > 2 * rates[1]  # smaller gradients rotate faster


def test_traced_inputs_match_python_floats():
    kw = dict(weight_decay=0.1, dim=64, grad_norm=0.5)
    for name in ("adamw", "sgdm", "lion", "adam_l2"):
        expected = equilibrium(name, learning_rate=2e-3, **kw)
        traced = jax.jit(lambda lr, name=name: equilibrium(name, learning_rate=lr, **kw))(2e-3)
        assert isinstance(traced, Equilibrium)
        np.testing.assert_allclose(np.array(traced), np.array(expected), rtol=1e-5)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="optimizer"):
        equilibrium("adam", learning_rate=1e-3, weight_decay=0.1, dim=4)
    with pytest.raises(ValueError, match="weight_decay"):
        equilibrium("adamw", learning_rate=1e-3, weight_decay=0.0, dim=4)
    with pytest.raises(ValueError, match="dim"):
        equilibrium("adamw", learning_rate=1e-3, weight_decay=0.1, dim=0)
