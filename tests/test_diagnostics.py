"""Diagnostics: theorem 2 of Roburin et al. (eqs. 11-13, table 1) on recorded stats, float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import float32_bound

import optax_sphere as osp
from optax_sphere import diagnostics as D
from optax_sphere import geometry
from optax_sphere._utils import find_states
from optax_sphere.diagnostics.history import REDUCTIONS
from optax_sphere.groups import Group

D_IN, UNITS, STEPS = 6, 4, 5
LR, WD, B1, B2, EPS = 0.05, 0.3, 0.9, 0.999, 1e-8


def _col_norm(w):
    return jnp.sqrt(jnp.sum(w * w, axis=0, keepdims=True))


def _problem(seed=0):
    """A loss that is radially invariant per column of ``w`` (per-unit groups) plus a bias."""
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(size=(16, D_IN)))
    t = jnp.asarray(rng.normal(size=(16, UNITS)))
    params = {
        "bias": jnp.asarray(rng.normal(size=(UNITS,))),
        "w": jnp.asarray(rng.normal(size=(D_IN, UNITS)) * rng.uniform(0.5, 3, size=UNITS)),
    }

    def loss(p):
        h = jnp.tanh(z @ (p["w"] / _col_norm(p["w"])) + p["bias"])
        return jnp.sum((h - t) ** 2)

    return params, jax.grad(loss)


def _adam_parts(state, x, g):
    """Roburin et al. eq. 9, optax's eps placement: a = m / (1-b1), b = ... (sqrt(v_hat) + eps)."""
    # the Adam state that holds "w" (one per part of on_groups' partition for adam_s)
    (adam,) = [
        s
        for s in find_states(state, lambda s: {"count", "mu", "nu"} <= set(s._fields))
        if not isinstance(s.mu["w"], optax.MaskedNode)
    ]
    k1 = adam.count
    a = adam.mu["w"] / (1 - B1)
    b = (1 - B1**k1) / (1 - B1) * (jnp.sqrt(adam.nu["w"] / (1 - B2**k1)) + EPS)
    return a, b


def _sgd_parts(state, x, g, wd=0.0, momentum=False):
    if momentum:
        (tr,) = find_states(state, lambda s: "trace" in s._fields)
        return tr.trace["w"], jnp.ones_like(x)
    return g + wd * x, jnp.ones_like(x)


CASES = {  # name: (L2 coefficient, scheme)
    "sgd": (0.0, "sgd"),
    "sgd_l2": (WD, "sgd"),
    "sgdm": (0.0, "sgdm"),
    "sgdm_l2": (WD, "sgdm"),
    "adam": (0.0, "adam"),
    "adam_l2": (WD, "adam"),
    "adam_s_l2": (WD, "adam"),  # a scalar second moment per group: b is constant per group
}


def _build(name):
    wd, kind = CASES[name]
    if kind == "sgd":
        inner = optax.chain(optax.add_decayed_weights(wd), optax.sgd(LR))
        return optax.chain(inner, D.monitor(step_scale=LR, groups="unit")), lambda k: LR
    if kind == "sgdm":
        sched = lambda k: LR * 0.8**k
        inner = optax.chain(optax.add_decayed_weights(wd), optax.sgd(sched, momentum=0.9))
        return optax.chain(inner, D.monitor(step_scale=sched, groups="unit")), sched
    inner = optax.chain(optax.add_decayed_weights(wd), optax.adam(LR, B1, B2, EPS))
    if name == "adam_s_l2":
        inner = osp.adam_s(LR, B1, B2, EPS, weight_decay=wd, groups="unit")
    scale = D.adam_step_scale(LR, b1=B1, b2=B2, eps=EPS, groups="unit")
    return D.monitored(inner, step_scale=scale, groups="unit"), lambda k: LR


def _close(a, b, rtol=1e-11):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * (1 + np.max(np.abs(b))))


@pytest.mark.parametrize("name", list(CASES))
def test_theorem_2_identities_and_table_1(name):
    """u_{k+1} = (u_k - eta_e c_perp) / sqrt(1 + (eta_e ||c_perp||)^2) (eq. 12), eq. 13 and
    the table 1 closed forms, from the stats recorded by the monitor during a real run."""
    wd, kind = CASES[name]
    with jax.enable_x64(True):
        params, grad = _problem()
        opt, lr_at = _build(name)
        state = opt.init(params)
        update = jax.jit(opt.update)
        for k in range(STEPS):
            g = grad(params)
            updates, state = update(g, state, params)
            new = optax.apply_updates(params, updates)
            stats = D.find_monitor_state(state).stats
            x, x1, gw = params["w"], new["w"], g["w"]
            if kind == "adam":
                a, b = _adam_parts(state, x, gw)
            else:
                a, b = _sgd_parts(state, x, gw, wd, momentum=kind == "sgdm")
            eta = lr_at(k)
            r = _col_norm(x)
            u, u1 = x / r, x1 / _col_norm(x1)
            nb = jnp.sqrt(jnp.mean(b * b, axis=0, keepdims=True))  # d^-1/2 ||b||
            c = r * a / (b / nb)  # eq. 11
            cu = jnp.sum(c * u, axis=0, keepdims=True)
            c_perp = c - cu * u
            big_a = eta / (r**2 * nb)  # eq. 29
            eta_e = stats.effective_lr["w"][None]
            cpn = stats.direction_norm["w"][None]
            # eq. 11 (general expression) and the monitor's ||c_perp||
            _close(eta_e, big_a / (1 - big_a * cu))
            _close(cpn, jnp.sqrt(jnp.sum(c_perp**2, axis=0, keepdims=True)))
            # eq. 12, exact, with the recorded eta_e and ||c_perp||
            _close(u1, (u - eta_e * c_perp) / jnp.sqrt(1 + (eta_e * cpn) ** 2))
            # eq. 13 with the recorded radial and Taylor terms (app. C.1.2)
            _close(stats.radial_term["w"][None], big_a * cu)
            _close(stats.taylor_term["w"][None], eta_e * cpn)
            ratio = (1 - stats.radial_term["w"]) * jnp.sqrt(1 + stats.taylor_term["w"] ** 2)
            _close(stats.radius_ratio["w"], ratio)
            _close(stats.radius_ratio["w"][None], _col_norm(x1) / r)
            # table 1 closed forms
            grad_u = r * gw  # grad L(u) = r grad L(x) (lemma 1)
            if kind == "sgd":
                _close(eta_e, eta / (r**2 * (1 - eta * wd)))
                _close(cpn, jnp.sqrt(jnp.sum(grad_u**2, axis=0, keepdims=True)))
            elif kind == "sgdm":
                _close(eta_e, eta / r**2 / (1 - eta * cu / r**2))
            else:
                nu = r * nb
                _close(eta_e, eta / (r * nu) / (1 - eta * cu / (r * nu)))
            assert stats.effective_lr["bias"] is None
            params = new


def test_table_1_adam_srt_row():
    """Adam-SRT: eta_e = eta / (r nu^R) (1 - eta wd r / nu^R)^-1 (table 1): the transported
    momentum is tangent, so only the current L2 term is radial. Plain Adam-S fails it.
    ``nu^R = r d^-1/2 ||b||`` is computed here from eqs. 15 and 21, independently of the
    optimizer; the monitor reads the step scale from the state with adam_step_scale."""
    with jax.enable_x64(True):
        for alias, should_hold in ((osp.adam_srt, True), (osp.adam_s, False)):
            params, grad = _problem(1)
            opt = D.monitored(
                alias(LR, B1, B2, EPS, weight_decay=WD, groups="unit"),
                step_scale=D.adam_step_scale(LR, b1=B1, b2=B2, eps=EPS, groups="unit"),
                groups="unit",
            )
            state = opt.init(params)
            v = jnp.zeros((1, UNITS))
            prev_r2 = None
            holds = []
            for k in range(STEPS):
                g = grad(params)
                x = params["w"]
                r = _col_norm(x)
                gt = g["w"] + WD * x
                ratio = 1.0 if prev_r2 is None or alias is osp.adam_s else prev_r2 / r**2
                v = B2 * v * ratio + (1 - B2) * jnp.mean(gt * gt, axis=0, keepdims=True)
                nb = (1 - B1 ** (k + 1)) / (1 - B1) * (jnp.sqrt(v / (1 - B2 ** (k + 1))) + EPS)
                updates, state = opt.update(g, state, params)
                new = optax.apply_updates(params, updates)
                recorded = state.monitor.stats.effective_lr["w"][None]
                pure = D.geometry_stats(
                    params, new, "unit", step_scale={"bias": None, "w": LR / nb}
                )
                _close(recorded, pure.effective_lr["w"][None], rtol=1e-10)
                nu_r = r * nb
                closed = LR / (r * nu_r) / (1 - LR * WD * r / nu_r)
                holds.append(np.allclose(recorded, closed, rtol=1e-10))
                params, prev_r2 = new, r**2
            assert all(holds) == should_hold, (alias, holds)


@pytest.mark.parametrize("theta", [1e-9, 1e-5, 0.3, 2.0, 3.1])
def test_known_rotation_is_recovered(theta):
    """Rotating each unit by theta in a random plane and scaling it by rho: the monitor reads
    angle theta, radius ratio rho, Taylor term tan(theta), radial term 1 - rho cos(theta)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(5, 3))
        u = x / np.linalg.norm(x, axis=0)
        v = rng.normal(size=(5, 3))
        v -= np.sum(v * u, axis=0) * u
        v /= np.linalg.norm(v, axis=0)
        rho = np.array([0.5, 1.0, 2.5])
        x1 = rho * np.linalg.norm(x, axis=0) * (np.cos(theta) * u + np.sin(theta) * v)
        stats = D.geometry_stats({"w": jnp.asarray(x)}, {"w": jnp.asarray(x1)}, "unit")
        _close(stats.angular_update["w"], np.full(3, theta), rtol=1e-12)
        _close(stats.radius_ratio["w"], rho, rtol=1e-12)
        _close(stats.taylor_term["w"], np.tan(theta) * np.ones(3), rtol=1e-9)
        _close(stats.radial_term["w"], 1 - rho * np.cos(theta), rtol=1e-12)
        _close(stats.radius["w"], np.linalg.norm(x, axis=0), rtol=1e-14)
        _close(stats.update_norm["w"], np.linalg.norm(x1 - x, axis=0), rtol=1e-12)
    if theta >= 1e-5:  # float32 inputs cannot hold a smaller rotation of x
        # read to a small fraction of the angle, not of its cosine
        x32, x1_32 = jnp.asarray(x, jnp.float32), jnp.asarray(x1, jnp.float32)
        stats = D.geometry_stats({"w": x32}, {"w": x1_32}, "unit")
        # float32 inputs of size ~1 hold their difference to u32: the angle theta to u32 / theta
        rtol = float32_bound(condition=1 / theta)
        np.testing.assert_allclose(stats.angular_update["w"], theta, rtol=rtol)


def test_monitor_matches_pure_function_and_passes_updates_through():
    params, grad = _problem(2)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    inner = optax.adamw(1e-2, weight_decay=0.1)
    opt = optax.chain(inner, osp.monitor(groups="unit"))
    state = opt.init(params)
    g = grad(params)
    ref_updates, _ = jax.jit(inner.update)(g, inner.init(params), params)
    updates, state = jax.jit(opt.update)(g, state, params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), updates, ref_updates))
    recorded = D.find_monitor_state(state).stats
    pure = D.geometry_stats(params, optax.apply_updates(params, updates), "unit")
    for name in ("radius", "angular_update", "update_norm", "radius_ratio", "radial_term"):
        np.testing.assert_allclose(
            getattr(recorded, name)["w"], getattr(pure, name)["w"], 1e-4, 1e-7
        )
    angle = geometry.angle(params["w"], params["w"] + updates["w"], Group((0,)))
    np.testing.assert_allclose(recorded.angular_update["w"], angle[0], rtol=1e-4)
    assert recorded.effective_lr is None and recorded.radius["bias"] is None
    assert int(D.find_monitor_state(state).count) == 1


def test_monitor_with_optax_wrappers():
    params, grad = _problem(4)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    opt = optax.chain(
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
        osp.monitor(step_scale=0.1, groups="unit"),
    )
    opt = optax.apply_if_finite(optax.MultiSteps(opt, every_k_schedule=2), 3)
    state = opt.init(params)
    step = jax.jit(opt.update)
    for _ in range(4):
        updates, state = step(grad(params), state, params)
        params = optax.apply_updates(params, updates)
    mon = D.find_monitor_state(state)
    assert int(mon.count) == 2  # two real steps out of four mini-steps
    assert np.all(np.asarray(mon.stats.angular_update["w"]) > 0)
    assert np.all(np.isfinite(np.asarray(mon.stats.effective_lr["w"])))


def test_degenerate_groups_do_not_produce_nans():
    params = {
        "w": jnp.zeros((3, 2), jnp.bfloat16).at[:, 1].set(1),
        "s": jnp.float32(1.0),
        "e": jnp.zeros((0, 3)),
    }
    after = {"w": params["w"].at[:, 0].set(0.5), "s": jnp.float32(2.0), "e": params["e"]}
    stats = D.geometry_stats(params, after, "unit", step_scale=0.0)
    for name, tree in stats._asdict().items():
        for leaf in jax.tree.leaves(tree):
            assert leaf.dtype == jnp.float32, name
            assert np.all(np.isfinite(np.asarray(leaf))), name
    assert float(stats.angular_update["w"][1]) == 0.0  # unchanged unit
    assert float(stats.angular_update["w"][0]) == 0.0  # zero-norm unit: no direction
    assert stats.radius["s"] is None
    assert D.metrics(stats, fields=["radius"]).keys() == {f"w/radius/{r}" for r in REDUCTIONS}


def test_metrics_and_history():
    params, grad = _problem(5)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    params["conv"] = {"kernel": jnp.ones((3, 3, 2, 5)) + jnp.arange(5.0)}
    opt = optax.chain(optax.sgd(0.1), osp.monitor(step_scale=0.1, groups="unit"))
    state = opt.init(params)
    hist = osp.History()
    for k in range(3):
        g = grad({"bias": params["bias"], "w": params["w"]})
        g["conv"] = {"kernel": jnp.sin(params["conv"]["kernel"] * (k + 1))}
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
        flat = hist.record(10 * k, state)
    stats = D.find_monitor_state(state).stats
    m = jax.device_get(osp.metrics(state, prefix="geo/"))
    assert len(m) == 2 * 8 * 3  # 2 grouped params, 8 stats, mean/min/max
    ang = np.asarray(stats.angular_update["conv"]["kernel"])
    assert ang.shape == (5,)
    assert m["geo/conv/kernel/angular_update/max"] == pytest.approx(ang.max())
    assert m["geo/conv/kernel/angular_update/mean"] == pytest.approx(ang.mean())
    assert m["geo/w/radius/min"] == pytest.approx(np.min(stats.radius["w"]))
    assert flat["conv/kernel/angular_update/min"] == pytest.approx(ang.min())
    assert hist.steps == [0, 10, 20] and hist.layers() == ["conv/kernel", "w"]
    assert hist.series("w", "radius", "max").shape == (3,)
    np.testing.assert_allclose(hist.per_group("conv/kernel", "angular_update")[-1], ang)
    jitted = jax.jit(osp.metrics)(state)  # also works inside jit
    assert jitted.keys() == osp.metrics(state).keys()
    with pytest.raises(ValueError, match="unknown stat"):
        osp.metrics(state, fields=["angle"])
    with pytest.raises(KeyError):
        hist.series("w", "nope")


def test_errors():
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="step_scale"):
        osp.monitor(step_scale=-1.0, groups="unit")
    with pytest.raises(ValueError, match="params"):
        osp.monitor(groups="unit").update(params, osp.monitor(groups="unit").init(params))
    with pytest.raises(ValueError, match="MonitorState"):
        osp.metrics(optax.sgd(0.1).init(params))
    opt = osp.monitored(
        optax.sgd(0.1), step_scale=osp.adam_step_scale(0.1, groups="unit"), groups="unit"
    )
    with pytest.raises(ValueError, match="Adam state"):
        opt.update(params, opt.init(params), params)
    with pytest.raises(ValueError, match="groups for parameter 'w'"):
        osp.monitor(groups={"w": 5}).init(params)


def test_every_records_one_step_in_n_and_state_can_be_donated():
    params, grad = _problem(6)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    every = optax.chain(optax.sgd(0.1), osp.monitor(every=3, groups="unit"))
    always = optax.chain(optax.sgd(0.1), osp.monitor(groups="unit"))
    step_e = jax.jit(every.update, donate_argnums=(1,))
    step_a = jax.jit(always.update)
    se, sa, recorded = every.init(params), always.init(params), []
    for k in range(5):
        g = grad(params)
        updates, se = step_e(g, se, params)
        _, sa = step_a(g, sa, params)
        if k % 3 == 0:
            recorded = np.asarray(D.find_monitor_state(sa).stats.angular_update["w"])
        got = np.asarray(D.find_monitor_state(se).stats.angular_update["w"])
        np.testing.assert_array_equal(got, recorded)  # steps 1, 2, 4 keep the last record
        params = optax.apply_updates(params, updates)
    assert int(D.find_monitor_state(se).count) == 5
    with pytest.raises(ValueError, match="every"):
        osp.monitor(every=0, groups="unit")


def test_sharded_group_axis_gives_the_same_stats():
    """A group axis split over devices: XLA reduces across them; the stats do not change."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = np.array(jax.devices()[:4])
    if devices.size < 4:
        pytest.skip("needs 4 devices")
    mesh = Mesh(devices, ("d",))
    rng = np.random.default_rng(7)
    params = {"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)}
    updates = {"w": jnp.asarray(0.01 * rng.normal(size=(8, 6)), jnp.float32)}
    opt = osp.monitor(step_scale=0.1, groups="unit")
    _, ref = jax.jit(opt.update)(updates, opt.init(params), params)
    shard = NamedSharding(mesh, PartitionSpec("d", None))  # rows = the group axis
    sharded = jax.tree.map(lambda x: jax.device_put(x, shard), (params, updates))
    _, got = jax.jit(opt.update)(sharded[1], opt.init(sharded[0]), sharded[0])
    for name in osp.GeometryStats._fields:
        if getattr(ref.stats, name) is None:  # radial_gradient: monitored() only
            assert getattr(got.stats, name) is None
            continue
        np.testing.assert_allclose(
            getattr(got.stats, name)["w"], getattr(ref.stats, name)["w"], rtol=1e-5
        )


def test_monitor_default_groups_are_the_optimizers_and_warn():
    """``monitor``, ``monitored`` and ``geometry_stats`` default to ``"unset"`` as every
    optimizer does: nothing monitored, with the warning, never a guess by shape."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    for tx in (osp.monitor(), osp.monitored(optax.sgd(0.1))):
        with pytest.warns(UserWarning, match="no `groups` given"):
            state = tx.init(params)
        assert osp.metrics(state) == {}
    with pytest.warns(UserWarning, match="no `groups` given"):
        D.geometry_stats(params, params)


def test_flagged_says_when_the_radial_gradient_was_not_measured():
    params = {"w": jnp.asarray([[1.0, -1.0], [2.0, 0.5], [-3.0, 0.5]])}
    grads = {"w": jnp.asarray([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0]])}
    history = osp.History()
    with pytest.raises(ValueError, match="not measured"):
        history.flagged()  # nothing recorded
    tx = optax.chain(optax.sgd(0.1), osp.monitor(groups="unit"))
    _, state = tx.update(grads, tx.init(params), params)
    history.record(0, state)
    assert not history.radial_gradient_measured
    with pytest.raises(ValueError, match="monitored"):
        history.flagged()
    tx = osp.monitored(optax.sgd(0.1), groups="unit")
    _, state = tx.update(grads, tx.init(params), params)
    measured = osp.History()
    with pytest.warns(UserWarning, match="not radially invariant"):
        measured.record(0, state)
    assert measured.radial_gradient_measured and measured.flagged() == ["w"]
