"""The papers' best hyperparameters: values against the tables, and every preset builds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import float32_bound

import optax_sphere
from optax_sphere import presets

K = 1e-3  # Roburin et al.'s L2 grid: 1e-3 * {0, 1/128, ..., 1/4}
LAMBDA_GRID = {0.0, K / 128, K / 64, K / 32, K / 16, K / 8, K / 4, K / 2}


def _params():
    key = jax.random.key(0)
    return {
        "conv": {"kernel": jax.random.normal(key, (3, 3, 2, 4))},
        "bn": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
    }


def test_roburin_table_values():
    """Spot checks against Roburin et al. tables 3 and 4 (CIFAR-10 ResNet-20 column, and more)."""
    srt = presets.get("roburin2022/cifar10_resnet20/adam_srt").hyperparams
    assert srt == {"learning_rate": 1e-3, "weight_decay": K / 128, "b1": 0.9, "b2": 0.99}
    sgdm = presets.get("roburin2022/cifar10_resnet20/sgdm").hyperparams
    assert sgdm == {"learning_rate": 0.1, "weight_decay": 2.5e-4, "momentum": 0.9}
    # printed as 3.1e-5 in table 4: the grid value 1e-3 / 32
    assert presets.get("roburin2022/cifar10_resnet20/sgdm_rt").hyperparams["weight_decay"] == K / 32
    assert presets.get("roburin2022/cifar10_resnet20/adamg").hyperparams["learning_rate"] == 0.01
    assert presets.get("roburin2022/cifar100_resnet18/adam_srt").hyperparams["weight_decay"] == 0
    assert presets.get("roburin2022/svhn_vgg16/adam_srt").hyperparams["b2"] == 0.999
    # ImageNet: no AdamW/AdamG runs ("X" in table 4), batch 256 and 135 epochs.
    assert presets.names(benchmark="imagenet_resnet18", optimizer="adamw") == []
    imagenet = presets.get("roburin2022/imagenet_resnet18/adam")
    assert (imagenet.batch_size, imagenet.epochs) == (256, 135)
    # every lambda of table 4 is a point of the paper's grid, shown rounded to 6 decimals
    for name in presets.names():
        p = presets.get(name)
        if name.startswith("roburin2022"):
            assert p.hyperparams["weight_decay"] in LAMBDA_GRID, name
            assert p.schedule == "step"


def test_kosson_table_values():
    """Spot checks against Kosson et al. table 4; RVs take the baseline's values (zero-shot)."""
    adamw = presets.get("kosson2024/cifar10_resnet20/adamw")
    assert dict(adamw.hyperparams) == {"learning_rate": 5e-2, "weight_decay": 1e-2}
    assert presets.get("kosson2024/cifar10_resnet20/rv_adamw").hyperparams == adamw.hyperparams
    best = presets.get("kosson2024/cifar10_resnet20_b2048/rv_sgdm/best_shot").hyperparams
    assert best == {"learning_rate": 16.0, "weight_decay": 1e-4, "momentum": 0.9}
    gpt = presets.get("kosson2024/wikitext_gpt/adamw")
    assert gpt.hyperparams["b2"] == 0.95 and gpt.steps == 15000 and gpt.epochs is None
    assert adamw.schedule == "cosine" and adamw.warmup_epochs == 5


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_builds_and_steps(name):
    preset = presets.get(name)
    for value in preset.hyperparams.values():
        assert math.isfinite(value)
    params = _params()
    # this library's optimizers get the groups of the test tree; optax's baselines have none
    groups = {"groups": "unit"} if hasattr(optax_sphere, preset.optimizer) else {}
    tx = preset.build(learning_rate=preset.learning_rate_schedule(total_steps=10), **groups)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
    updates, _ = tx.update(grads, state, params)
    for u in jax.tree.leaves(updates):
        assert bool(jnp.all(jnp.isfinite(u))) and bool(jnp.any(u != 0))


def test_baseline_presets_are_the_papers_optax_chains():
    """Adam + L2 (coupled, PyTorch's `weight_decay`) and AdamW (decoupled, times lr)."""
    params = _params()
    grads = jax.tree.map(lambda p: jnp.cos(p) + 0.5, params)
    cases = [
        (
            "roburin2022/cifar10_resnet20/adam",
            optax.chain(optax.add_decayed_weights(5e-4), optax.adam(1e-3, b2=0.99)),
        ),
        ("roburin2022/cifar10_resnet20/adamw", optax.adamw(1e-3, b2=0.99, weight_decay=1.25e-4)),
        (
            "roburin2022/cifar10_resnet20/sgdm",
            optax.chain(optax.add_decayed_weights(2.5e-4), optax.sgd(0.1, 0.9)),
        ),
    ]
    for name, expected in cases:
        got = presets.build(name)
        u1, _ = got.update(grads, got.init(params), params)
        u2, _ = expected.update(grads, expected.init(params), params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)


def test_sphere_preset_is_the_alias():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.3, params)
    got = presets.build("roburin2022/cifar10_resnet20/adam_srt", groups="unit")
    expected = optax_sphere.adam_srt(1e-3, b2=0.99, weight_decay=K / 128, groups="unit")
    u1, _ = got.update(grads, got.init(params), params)
    u2, _ = expected.update(grads, expected.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), u1, u2)


def test_step_schedule_jumps_at_the_papers_epochs():
    """405 epochs: x0.1 at epochs 135, 225 and 315 (Roburin et al. app. E.1)."""
    sched = presets.roburin_step_schedule(0.1, total_steps=405)
    values = [float(sched(k)) for k in (0, 134, 135, 224, 225, 314, 315, 404)]
    np.testing.assert_allclose(values, [0.1, 0.1, 1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-6)
    with pytest.raises(ValueError):
        presets.roburin_step_schedule(0.1, 0)


def test_cosine_schedule_warms_up_then_decays():
    sched = presets.get("kosson2024/cifar10_resnet20/adamw").learning_rate_schedule(200)
    # optax's warm-up computes (init - peak) + peak in float32: a cancellation of condition
    # peak / init = 5e4
    assert float(sched(0)) == pytest.approx(1e-6, rel=float32_bound(condition=5e-2 / 1e-6))
    assert float(sched(5)) == pytest.approx(5e-2, rel=1e-5)  # 5 of 200 epochs of warm-up
    assert float(sched(199)) < 1e-3


def test_unknown_preset_names_close_ones():
    with pytest.raises(ValueError, match="adam_srt"):
        presets.get("roburin2022/cifar11_resnet20/adam_srt")
