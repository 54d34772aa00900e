"""Every alias reproduces the authors' reference implementation step by step in float64:
adam_s, adam_srt, sgdm_rt (Roburin et al.'s code), rv_adamw, rv_sgdm, rv_lion (Kosson et al.'s),
adamp, sgdp (Heo et al.'s), sgdg (with and without clipping) and adamg (Cho & Lee's)."""

import jax
import pytest
import reference
from tolerances import assert_within

import optax_sphere


@pytest.mark.parametrize("problem", reference.PROBLEMS)
def test_alias_matches_reference_trajectory(problem):
    with jax.enable_x64(True):
        alias = getattr(optax_sphere, reference.ALIAS[problem])
        hyper = dict(reference.HYPERPARAMETERS[problem])
        if problem.startswith("rv_"):  # REQ's 1-D leaves run without weight decay here
            hyper["ungrouped_weight_decay"] = 0.0
        tx = alias(**hyper, groups="unit")
        errors = reference.run(problem, tx)
    assert len(errors) == reference.num_steps(problem) >= 30
    assert_within(max(errors), 1e-8, f"{problem}: max relative error")
