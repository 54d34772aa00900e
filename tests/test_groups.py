"""Group specifications: defaults for Flax trees, shorthands, user specs and their errors."""

import jax.numpy as jnp
import pytest

import optax_sphere as osp
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


@pytest.mark.parametrize(
    "groups, hint",
    [(("unit",), "groups='unit'"), (["unit"], "groups='unit'"), (True, "groups='unit'"),
     (3, "lambda params"), ((0, 1), "lambda params"), (2.5, "is not a groups spec")],
)  # fmt: skip
def test_a_lone_value_of_no_allowed_form_names_the_forms(groups, hint):
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="is not a groups spec") as err:
        osp.resolve_groups(groups, params)
    assert hint in str(err.value) and "'unit_out_first'" in str(err.value)


@pytest.mark.parametrize("spec", [True, False, 1.0, ("unit",), (0, "unit")])
def test_a_leaf_spec_of_no_allowed_form_names_the_path_and_the_forms(spec):
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="parameter 'w'.*is not a spec.*int axis"):
        osp.resolve_groups({"w": spec, "b": None}, params)


def test_an_int_or_axes_for_one_array_are_its_own_spec():
    assert osp.resolve_groups(1, jnp.ones((3, 2))) == osp.Group((1,))
    assert osp.resolve_groups((0,), jnp.ones((3, 2))) == osp.Group((0,))
