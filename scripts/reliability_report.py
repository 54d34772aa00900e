"""Runs every reliability condition on every optimizer and writes the table of the docs.

    python scripts/reliability_report.py [--out docs/results/reliability.json] [-n 2]

Each row of the table is one condition (bad input, degenerate data, low precision, checkpoints,
composition with the optax wrappers, invariants) for one optimizer: what the library documents
that the optimizer does under it (``outcome``), whether the test that asserts it passed in this
run (``status``), and the pytest node id of that test (``test``), so that every row is backed by
a test of the suite. The tests are run with pytest and their results read from its JUnit XML.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import alias_cases  # noqa: E402

TEST_FILES = [
    "tests/test_validation.py",
    "tests/test_degenerate.py",
    "tests/test_low_precision.py",
    "tests/test_checkpoint.py",
    "tests/test_composition.py",
    "tests/test_properties.py",
]


@dataclass(frozen=True)
class Condition:
    id: str
    group: str
    title: str
    test: str  # "file.py::function"
    outcome: Callable[[alias_cases.Case], str]
    variants: tuple[str, ...] = ("",)  # parameter ids after the case's, e.g. "-bfloat16"


def _const(text: str) -> Callable[[alias_cases.Case], str]:
    return lambda case: text


def _zero_group(case: alias_cases.Case) -> str:
    if case.zero_group == "moves":
        return "finite; leaves the origin once its gradient is nonzero, like its base optimizer"
    return "finite; stays at the origin (its step is proportional to its norm)"


def _state_dtype(case: alias_cases.Case) -> str:
    if case.state_dtype == "float32":
        return "updates in the params dtype; moments and per-group scalars in float32"
    return "updates in the params dtype; state of the inner optax optimizer (params dtype)"


def _float16(case: alias_cases.Case) -> str:
    if case.float16_limitation:
        return f"known limitation: {case.float16_limitation}"
    return "finite updates and state: per-group reductions accumulate in float32"


V, D, L, C, K, P = (
    "tests/test_validation.py",
    "tests/test_degenerate.py",
    ("tests/test_low_precision.py"),
    "tests/test_checkpoint.py",
    "tests/test_composition.py",
    "tests/test_properties.py",
)

CONDITIONS = [
    Condition(
        "group_spec_mismatch",
        "Validation",
        "groups spec that does not fit the params (axis out of range, 'unit' on a vector, "
        "missing entry)",
        f"{V}::test_group_spec_errors_at_init_name_the_parameter_path",
        _const("ValueError at init naming the parameter path"),
    ),
    Condition(
        "non_array_leaf",
        "Validation",
        "a parameter leaf that is not an array (Python float, string)",
        f"{V}::test_non_array_parameter_leaf_raises_at_init_naming_the_path",
        _const("ValueError at init naming the parameter path"),
    ),
    Condition(
        "tree_changed",
        "Validation",
        "params tree changed between init and update (leaf added, removed, reshaped)",
        f"{V}::test_parameter_tree_changed_since_init_gives_a_clear_error",
        _const("ValueError naming the changed parameter, eagerly and under jit"),
    ),
    Condition(
        "missing_params",
        "Validation",
        "update called without params",
        f"{V}::test_update_without_params_is_a_value_error_or_works",
        _const("ValueError asking for params when the optimizer needs them"),
    ),
    Condition(
        "degenerate_leaves",
        "Degenerate data",
        "zero kernel, dead unit, groups of dimension 1, empty and scalar leaves, denormal "
        "params; zero, denormal and large (1e15) gradients",
        f"{D}::test_degenerate_leaves_give_finite_updates_and_state",
        _const("finite updates, state and params; empty leaves keep their shape"),
    ),
    Condition(
        "zero_group_zero_gradient",
        "Degenerate data",
        "zero-norm group (zero kernel, dead unit) with a zero gradient",
        f"{D}::test_zero_group_with_zero_gradient_stays_exactly_at_the_origin",
        _const("stays exactly at the origin; the other units train"),
    ),
    Condition(
        "zero_group_gradient",
        "Degenerate data",
        "zero-norm group with a nonzero gradient",
        f"{D}::test_zero_group_moves_with_its_gradient_or_stays_as_documented",
        _zero_group,
    ),
    Condition(
        "nonfinite_without_guard",
        "Degenerate data",
        "NaN / Inf gradient without optax.apply_if_finite",
        f"{D}::test_non_finite_gradient_without_apply_if_finite_stays_in_its_own_leaf",
        _const("non-finite update and state of that leaf only; every other leaf finite"),
    ),
    Condition(
        "nonfinite_apply_if_finite",
        "Degenerate data",
        "NaN / Inf gradient under optax.apply_if_finite",
        f"{D}::test_non_finite_gradient_under_apply_if_finite_leaves_state_exactly_unchanged",
        _const("zero update, inner state bit-for-bit unchanged, training resumes"),
    ),
    Condition(
        "bfloat16_params",
        "Low precision",
        "bfloat16 params",
        f"{L}::test_low_precision_params_dtypes_of_updates_and_state",
        _state_dtype,
        ("-bfloat16",),
    ),
    Condition(
        "float16_params",
        "Low precision",
        "float16 params",
        f"{L}::test_low_precision_params_dtypes_of_updates_and_state",
        _state_dtype,
        ("-float16",),
    ),
    Condition(
        "float16_overflow",
        "Low precision",
        "float16 group whose squared norm overflows float16 (||x||^2 > 65504)",
        f"{L}::test_float16_group_whose_squared_norm_overflows_float16",
        _float16,
    ),
    Condition(
        "bfloat16_run",
        "Low precision",
        "20-step run in bfloat16 against float32",
        f"{L}::test_bfloat16_run_stays_close_to_float32",
        _const("every unit direction and vector within 0.05 of the float32 run"),
    ),
    Condition(
        "float64_params",
        "Low precision",
        "float64 params (jax_enable_x64)",
        f"{L}::test_float64_params_keep_a_float64_state",
        _const("float64 updates and state"),
    ),
    Condition(
        "state_pytree",
        "Checkpoints",
        "state is a pytree of arrays",
        f"{C}::test_state_is_a_pytree_of_arrays",
        _const("every leaf a jax.Array (NamedTuple states)"),
    ),
    Condition(
        "orbax_resume",
        "Checkpoints",
        "orbax.checkpoint save / restore in the middle of a run",
        f"{C}::test_orbax_resume_in_the_middle_is_bit_for_bit",
        _const("restored state bit-for-bit; resumed run equals the uninterrupted run bit for bit"),
        ("-plain",),
    ),
    Condition(
        "orbax_resume_wrapped",
        "Checkpoints",
        "same, inside MultiSteps(apply_if_finite(inject_hyperparams(...)))",
        f"{C}::test_orbax_resume_in_the_middle_is_bit_for_bit",
        _const("restored state bit-for-bit; resumed run equals the uninterrupted run bit for bit"),
        ("-wrapped",),
    ),
    Condition(
        "flax_serialization",
        "Checkpoints",
        "flax.serialization to_bytes / from_bytes and state dicts",
        f"{C}::test_flax_serialization_round_trip_and_resume",
        _const("round trip bit-for-bit; resumed run equals the uninterrupted run"),
    ),
    Condition(
        "chain_clip",
        "Composition",
        "optax.chain after optax.clip_by_global_norm",
        f"{K}::test_chain_after_clip_by_global_norm",
        _const("identical to the optimizer fed the clipped gradients"),
    ),
    Condition(
        "inject_learning_rate",
        "Composition",
        "optax.inject_hyperparams, learning rate changed between steps",
        f"{K}::test_inject_hyperparams_learning_rate_changed_between_steps",
        _const("same trajectory as the equivalent schedule"),
    ),
    Condition(
        "inject_groups",
        "Composition",
        "optax.inject_hyperparams with a groups spec (static_args=('groups',))",
        f"{K}::test_inject_hyperparams_with_groups_as_a_static_argument",
        _const("same trajectory as without injection"),
    ),
    Condition(
        "multisteps",
        "Composition",
        "optax.MultiSteps (gradient accumulation over 2 steps)",
        f"{K}::test_multisteps_accumulation_is_one_step_on_the_mean_gradient",
        _const("zero update, then one step on the mean gradient"),
    ),
    Condition(
        "masked",
        "Composition",
        "optax.masked (default groups, and a groups spec written for the whole tree)",
        f"{K}::test_masked",
        _const("masked-in leaves as on the sub-tree; masked-out leaves pass through"),
        ("-default_groups", "-spec_for_the_whole_tree"),
    ),
    Condition(
        "multi_transform",
        "Composition",
        "optax.multi_transform beside optax.sgd",
        f"{K}::test_multi_transform",
        _const("each label's leaves get their own optimizer's update"),
    ),
    Condition(
        "schedule",
        "Composition",
        "learning-rate schedules (constant; dropping to zero)",
        f"{K}::test_learning_rate_schedule",
        _const("constant schedule equals the constant; zero learning rate stops the motion"),
    ),
    Condition(
        "determinism",
        "Composition",
        "same inputs twice under jit",
        f"{K}::test_deterministic",
        _const("bit-identical trajectories"),
    ),
]

# Invariants of the primitives and tests not parametrized by optimizer: one row each.
SINGLE_ROWS = [
    (
        "Validation",
        "invalid hyperparameters",
        "every builder",
        f"{V}::test_invalid_hyperparameters_raise_when_built",
        "ValueError at build time naming the hyperparameter (negative or non-finite rates, decays "
        "outside [0, 1), b1 = b2 = 1)",
    ),
    (
        "Validation",
        "boundary hyperparameters",
        "every builder",
        f"{V}::test_boundary_hyperparameters_are_accepted",
        "zero weight decay, zero momentum and schedules accepted",
    ),
    (
        "Validation",
        "unknown names",
        "resolve_groups, theory.equilibrium",
        f"{V}::test_unknown_optimizer_names_raise",
        "ValueError listing the accepted names",
    ),
    (
        "Degenerate data",
        "groups of dimension 1",
        "adam_s",
        f"{D}::test_groups_of_dimension_one_make_standardisation_adam",
        "Adam with coupled L2 (the scalar second moment of one element is Adam's)",
    ),
    (
        "Degenerate data",
        "groups of dimension 1",
        "adam_st, adam_srt, sgdm_rt",
        f"{D}::test_groups_of_dimension_one_have_no_tangent_momentum",
        "momentum transported to zero (the tangent space of a 0-sphere is {0}); finite steps",
    ),
    (
        "Composition",
        "masked spec still checked",
        "adam_srt",
        f"{K}::test_masked_spec_for_the_whole_tree_still_rejects_a_missing_entry",
        "ValueError naming the parameter without a spec",
    ),
    (
        "Properties",
        "tangency, complement, idempotence, scale invariance",
        "geometry.tangent_part / radial_part",
        f"{P}::test_tangent_part_is_tangent_and_complements_the_radial_part",
        "holds to float32 precision for float32, bfloat16 and float16 inputs",
    ),
    (
        "Properties",
        "tangent at the new point, T(u_k) = 0, direction-only",
        "geometry.transport",
        f"{P}::test_paper_transport_lands_in_the_new_tangent_space_and_kills_the_old_direction",
        "holds",
    ),
    (
        "Properties",
        "RT = R after T, tangent, common-scale invariance",
        "geometry.rescale_transport",
        f"{P}::test_rescale_transport_is_r_after_t_and_is_invariant_to_a_common_scale",
        "holds",
    ),
    (
        "Properties",
        "isometry of tangent spaces (norms and inner products)",
        "geometry.parallel_transport",
        f"{P}::test_exact_parallel_transport_is_an_isometry_between_tangent_spaces",
        "holds",
    ),
    (
        "Properties",
        "unit norm, scale invariance",
        "geometry.exp_map / project_to_sphere",
        f"{P}::test_exp_map_and_projection_land_on_the_sphere",
        "holds",
    ),
    (
        "Properties",
        "range [0, pi], symmetry, scale invariance, 0 for zero groups",
        "geometry.angle",
        f"{P}::test_angle_is_scale_invariant_symmetric_and_in_range",
        "holds",
    ),
    (
        "Properties",
        "invariance to a per-group gradient scale",
        "scale_by_standardized_adam",
        f"{P}::test_standardisation_is_invariant_to_a_per_group_gradient_scale",
        "holds",
    ),
    (
        "Properties",
        "momentum tangent at x_k+1 after each step",
        "adam_st, adam_srt, sgdm_rt, transport wrappers",
        f"{P}::test_momentum_after_a_transporting_step_is_tangent_at_the_new_point",
        "holds",
    ),
    (
        "Properties",
        "momentum multiplied by r_k / r_k+1",
        "rescale_momentum",
        f"{P}::test_rescale_multiplies_the_momentum_by_the_radius_ratio",
        "holds",
    ),
]


def _run_pytest(workers: int | None) -> dict[str, str]:
    """Node id -> passed / failed / skipped / xfailed / xpassed."""
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES]
        cmd += [f"--junitxml={xml_path}", "-o", "junit_family=xunit1"]
        if workers:
            cmd += ["-n", str(workers)]
        subprocess.run(cmd, cwd=ROOT, check=False)
        tree = ET.parse(xml_path)
    results: dict[str, str] = {}
    for tc in tree.iter("testcase"):
        file = tc.get("file") or (tc.get("classname", "").replace(".", "/") + ".py")
        node = f"{file}::{tc.get('name')}"
        status = "passed"
        for child in tc:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                kind = child.get("type", "")
                status = "xfailed" if "xfail" in kind else "skipped"
        results[node] = status
    return results


def _status(statuses: list[str]) -> str:
    if not statuses:
        return "not run"
    for s in ("failed", "xpassed", "not run"):
        if s in statuses:
            return s
    if all(s == "skipped" for s in statuses):
        return "skipped"
    if "xfailed" in statuses:
        return "xfailed"
    return "passed"


def build_report(results: dict[str, str]) -> dict:
    rows = []
    for cond in CONDITIONS:
        for case in alias_cases.CASES:
            nodes = [f"{cond.test}[{case.name}{v}]" for v in cond.variants]
            status = _status([results.get(n, "not run") for n in nodes])
            outcome = cond.outcome(case)
            rows.append(
                {
                    "group": cond.group,
                    "condition": cond.title,
                    "condition_id": cond.id,
                    "alias": case.name,
                    "kind": case.kind,
                    "outcome": outcome,
                    "status": status,
                    "test": nodes[0] if len(nodes) == 1 else nodes,
                }
            )
    for group, title, who, test, outcome in SINGLE_ROWS:
        matching = [s for n, s in results.items() if n == test or n.startswith(test + "[")]
        rows.append(
            {
                "group": group,
                "condition": title,
                "condition_id": test.split("::")[1],
                "alias": who,
                "kind": "primitive" if group == "Properties" else "several",
                "outcome": outcome,
                "status": _status(matching),
                "test": test,
            }
        )
    import jax
    import optax

    return {
        "command": "python scripts/reliability_report.py",
        "environment": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "optax": optax.__version__,
            "platform": platform.platform(),
        },
        "summary": {
            s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})
        },
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "reliability.json")
    parser.add_argument("-n", "--workers", type=int, default=None, help="pytest-xdist workers")
    args = parser.parse_args()
    report = build_report(_run_pytest(args.workers))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{len(report['rows'])} rows -> {args.out}: {report['summary']}")
    return 1 if report["summary"].get("failed") or report["summary"].get("not run") else 0


if __name__ == "__main__":
    sys.exit(main())
