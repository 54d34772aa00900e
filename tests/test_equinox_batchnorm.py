"""Equinox with BatchNorm: a model of one example that normalises over a named batch axis and
carries an ``eqx.nn.State``. ``find_groups(model, x, state, batch_axis_name="batch")`` maps it
over the batch, finds the kernel before the norm per output unit, and the groups train with
the usual Equinox step (``eqx.filter_vmap`` with the axis name, the state threaded)."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sphere as osp


class _Net(eqx.Module):
    conv: eqx.nn.Conv1d
    norm: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv1d(1, 8, 3, use_bias=False, key=k1)
        self.norm = eqx.nn.BatchNorm(8, axis_name="batch", mode="batch")
        self.head = eqx.nn.Linear(8 * 14, 3, key=k2)

    def __call__(self, x, state):
        h, state = self.norm(self.conv(x), state)
        return self.head(jax.nn.relu(h).reshape(-1)), state


def _data():
    x = jax.random.normal(jax.random.key(1), (32, 1, 16))
    y = (x[:, 0, :5].sum(-1) > 0).astype(jnp.int32) + (x[:, 0, 5:9].sum(-1) > 1)
    return x, y


def _model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Equinox's notice on the BatchNorm mode
        return eqx.nn.make_with_state(_Net)(jax.random.key(0))


def test_find_groups_maps_a_per_example_model_over_the_named_batch_axis():
    model, state = _model()
    x, _ = _data()
    found = osp.find_groups(model, x, state, batch_axis_name="batch")
    assert found.grouped == ["conv/weight"]
    (conv,) = [r for r in found.reports if r.path == "conv/weight"]
    assert conv.grouping == "unit_out_first" and conv.num_groups == 8
    # the same groups from the structure checks, and from the rotational groups
    osp.check_groups(found, model, x, state, batch_axis_name="batch")
    rotational = osp.rotational_groups(model, x, state, head=False, batch_axis_name="batch")
    assert rotational.grouped == ["conv/weight"]


def test_without_the_axis_name_the_error_says_how_to_call_it():
    model, state = _model()
    x, _ = _data()
    with pytest.raises(ValueError, match='batch_axis_name="batch"'):
        osp.find_groups(model, x, state)


@pytest.mark.parametrize("name", ["adam_srt", "sgdm_rt"])
def test_the_groups_found_train_an_equinox_batchnorm_model(name):
    model, state = _model()
    x, y = _data()
    groups = osp.find_groups(model, x, state, batch_axis_name="batch")
    tx = getattr(osp, name)(1e-2 if name == "adam_srt" else 0.1, groups=groups)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = tx.init(params)

    @eqx.filter_jit
    def step(model, state, opt_state):
        def loss(model, state):
            logits, state = eqx.filter_vmap(
                model, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
            )(x, state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, state)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = tx.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), state, opt_state, value

    losses = []
    for _ in range(30):
        model, state, opt_state, value = step(model, state, opt_state)
        losses.append(float(value))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
    # the BatchNorm makes the kernel scale invariant: the model's outputs ignore its norm
    doubled = eqx.tree_at(lambda m: m.conv.weight, model, 2 * model.conv.weight)
    run = lambda m: eqx.filter_vmap(m, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(
        x, state
    )[0]
    np.testing.assert_allclose(run(doubled), run(model), rtol=1e-3, atol=1e-4)
