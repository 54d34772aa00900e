"""Group specifications: defaults for Flax trees, shorthands, user specs and their errors."""

import jax.numpy as jnp
import pytest

from optax_sphere.groups import (
    Group,
    group_mean,
    group_sq_norm,
    per_tensor,
    per_unit,
    resolve_groups,
)

PARAMS = {
    "conv": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.ones(8)},
    "dense": {"kernel": jnp.ones((16, 5))},
    "bn": {"scale": jnp.ones(8)},
}


def test_default_groups_per_output_unit():
    g = resolve_groups(per_unit, PARAMS)
    assert g["conv"]["kernel"] == Group((0, 1, 2))
    assert g["dense"]["kernel"] == Group((0,))
    assert g["conv"]["bias"] is None and g["bn"]["scale"] is None


def test_shorthands_and_none():
    assert resolve_groups("tensor", PARAMS)["conv"]["kernel"] == Group((0, 1, 2, 3))
    assert resolve_groups("unit", PARAMS) == resolve_groups(per_unit, PARAMS)
    assert resolve_groups(per_tensor, PARAMS)["dense"]["kernel"] == Group((0, 1))
    assert all(v is None for m in resolve_groups(None, PARAMS).values() for v in m.values())


def test_user_spec_with_negative_axes_and_ints():
    spec = {
        "conv": {"kernel": (-4, -3), "bias": None},
        "dense": {"kernel": 1},
        "bn": {"scale": "tensor"},
    }
    g = resolve_groups(spec, PARAMS)
    assert g["conv"]["kernel"] == Group((0, 1))
    assert g["dense"]["kernel"] == Group((1,))
    assert g["bn"]["scale"] == Group((0,))


def test_axis_out_of_range_names_the_path():
    spec = {
        "conv": {"kernel": (0, 4), "bias": None},
        "dense": {"kernel": None},
        "bn": {"scale": None},
    }
    with pytest.raises(ValueError, match=r"conv/kernel.*axis 4 is out of range"):
        resolve_groups(spec, PARAMS)


def test_unit_on_vector_names_the_path():
    spec = {
        "conv": {"kernel": None, "bias": "unit"},
        "dense": {"kernel": None},
        "bn": {"scale": None},
    }
    with pytest.raises(ValueError, match=r"conv/bias.*'unit' needs ndim >= 2"):
        resolve_groups(spec, PARAMS)


def test_tree_mismatch_lists_the_missing_paths():
    spec = {"conv": {"kernel": "unit"}, "dense": {"kernel": "unit"}, "bn": {"scale": None}}
    with pytest.raises(ValueError, match=r"conv/bias"):
        resolve_groups(spec, PARAMS)


def test_unknown_spec_and_shorthand():
    with pytest.raises(ValueError, match="unknown groups shorthand"):
        resolve_groups("filters", PARAMS)
    spec = {
        "conv": {"kernel": "rows", "bias": None},
        "dense": {"kernel": None},
        "bn": {"scale": None},
    }
    with pytest.raises(ValueError, match=r"conv/kernel.*unknown spec"):
        resolve_groups(spec, PARAMS)


def test_keepdims_reductions():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    g = Group((0, 1))
    assert group_sq_norm(x, g).shape == (1, 1, 4)
    assert jnp.allclose(group_sq_norm(x, g)[0, 0], jnp.sum(x * x, axis=(0, 1)))
    assert jnp.allclose(group_mean(x, g)[0, 0], jnp.mean(x, axis=(0, 1)))
