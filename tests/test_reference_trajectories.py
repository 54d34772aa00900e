"""Every alias reproduces the authors' reference implementation step by step in float64."""

import jax
import pytest
import reference

import optax_sphere


@pytest.mark.parametrize("problem", reference.PROBLEMS)
def test_alias_matches_reference_trajectory(problem):
    if not hasattr(optax_sphere, problem):
        pytest.skip(f"optax_sphere.{problem} is not part of this build")
    with jax.enable_x64(True):
        tx = getattr(optax_sphere, problem)(**reference.HYPERPARAMETERS[problem], groups="unit")
        errors = reference.run(problem, tx)
    assert len(errors) == 30
    assert max(errors) < 1e-8, f"{problem}: max relative error {max(errors):.3e}"
