"""Every optimizer of the library, with small valid keyword arguments, for the reliability tests.

Each :class:`Case` builds one ``optax.GradientTransformation`` from keyword arguments
(``learning_rate`` and ``groups`` always among them, so that ``optax.inject_hyperparams`` and
user group specs reach it). A published alias is looked up by name on ``optax_sphere``; a
primitive is wrapped into a usable optimizer (a direction, a learning rate, and whatever it
needs around it). Every name must be exported: a missing one fails the suite at collection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax
import pytest

import optax_sphere

Factory = Callable[..., optax.GradientTransformation]


def _exported(name: str) -> Any:
    # a missing name fails the whole suite at collection: an alias cannot disappear quietly
    return getattr(optax_sphere, name)


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer of the library: ``make(**overrides)`` builds it."""

    name: str
    factory: Factory
    kwargs: dict[str, Any]
    kind: str  # "alias" or "primitive"
    # Documented behaviour (docs/reliability.md), asserted by the tests:
    # a group at the origin with a nonzero gradient "moves", or "stays" there (its norm or its
    # metric is zero: rotational and PSI optimizers).
    zero_group: str = "moves"
    # dtype of the floating state for bf16 / fp16 params: "float32" (this library's
    # transforms accumulate in at least float32) or "params" (an optax inner optimizer's
    # state, which follows the params).
    state_dtype: str = "float32"
    # A known limitation with float16 params, inherited from an optax inner optimizer
    # (asserted as a strict expected failure), or None.
    float16_limitation: str | None = None
    # What ``update`` does on a parameter tree that changed since ``init``: "raises" the
    # library's ValueError naming the paths; "stateless": no per-parameter state (psi_sgd
    # without momentum, as optax.sgd), so the step applies to any tree; "per_group": the
    # state holds one scalar per group only, so a reshape that keeps the groups is a valid
    # tree for it (one that changes them raises); "optax_inner": a stateless primitive of
    # the library in front of an optax optimizer, whose own error is raised.
    changed_tree: str = "raises"

    def make(self, **overrides: Any) -> optax.GradientTransformation:
        return self.factory(**{**self.kwargs, **overrides})


def _alias(name: str, behaviour: dict[str, Any] | None = None, **kwargs: Any) -> Case:
    # the exported function itself, so that optax.inject_hyperparams sees its signature
    factory = _exported(name)
    kwargs = {"groups": "unit", **kwargs}
    return Case(name, factory, kwargs, "alias", **(behaviour or {}))


def _primitive(
    name: str,
    build: Factory,
    behaviour: dict[str, Any] | None = None,
    learning_rate: float = 1e-2,
) -> Case:
    kwargs = {"learning_rate": learning_rate, "groups": "unit"}
    return Case(name, build, kwargs, "primitive", **(behaviour or {}))


# the step of a group is proportional to its norm: a group at the origin stays there
STAYS = {"zero_group": "stays"}

# Published aliases (DESIGN.md section 4), with the fixtures' hyperparameters, scaled to take
# visible steps on the small problems of the tests.
ALIASES = [
    _alias("adam_s", learning_rate=1e-2, weight_decay=1e-3),
    _alias("adam_st", learning_rate=1e-2, weight_decay=1e-3),
    _alias("adam_srt", learning_rate=1e-2, weight_decay=1e-3),
    _alias("sgdm_rt", learning_rate=0.05, momentum=0.9, weight_decay=5e-4),
    _alias("rv_adamw", STAYS, learning_rate=1e-2, weight_decay=0.1),
    _alias("rv_sgdm", STAYS, learning_rate=0.05, momentum=0.9, weight_decay=5e-4),
    # Lion steps every ungrouped weight by exactly +-lr: 20 steps of 1e-3 could not move a
    # vector by the 0.05 the bf16 test needs; 2^-6 is a multiple of bf16's spacing below 4, so
    # those steps are exact in bf16 and the comparison measures the optimizer, not rounding.
    _alias("rv_lion", STAYS, learning_rate=2**-6, weight_decay=1.0),
    _alias("wrapped_adam_l2", STAYS, learning_rate=1e-2, weight_decay=0.1),
    _alias("adamg", STAYS, learning_rate=1e-2),
    _alias("sgdg", STAYS, learning_rate=0.05, momentum=0.9),
    _alias("adagradg", {**STAYS, "changed_tree": "per_group"}, learning_rate=0.05),
    _alias("psi_sgd", {**STAYS, "changed_tree": "stateless"}, learning_rate=0.05),
    _alias("psi_sgdm", STAYS, learning_rate=0.05, momentum=0.9),
    # Adam steps each weight by about lr: 3e-2 turns a unit of norm ~6 visibly in 20 steps
    _alias("adamp", learning_rate=3e-2, weight_decay=1e-2),
    _alias("sgdp", learning_rate=0.05, momentum=0.9, weight_decay=1e-4),
    # a group turns by about arctan(lr) per step: 0.05 is visible in 20 steps
    _alias("adamh", STAYS, learning_rate=0.05, ungrouped_learning_rate=1e-2),
    _alias("muonh", STAYS, learning_rate=0.05, ungrouped_learning_rate=1e-2),
]


ADAM_INNER = {
    "state_dtype": "params",
    "float16_limitation": "optax.adam keeps float16 moments for float16 params, where its "
    "eps=1e-8 underflows to 0: a step divides by zero once the squared gradient underflows "
    "(use float32 params, or an eps >= 1e-4)",
}

# The primitives, each made a complete optimizer by the smallest chain that needs it.
PRIMITIVES = [
    _primitive(
        "chain(coupled_weight_decay,scale_by_standardized_adam)",
        lambda learning_rate, groups="unit": optax.chain(
            optax_sphere.coupled_weight_decay(1e-3),
            optax_sphere.scale_by_standardized_adam(0.9, 0.99, groups=groups),
            optax.scale_by_learning_rate(learning_rate),
        ),
    ),
    _primitive(
        "rescale_momentum(sgd)",
        lambda learning_rate, groups="unit": optax_sphere.rescale_momentum(
            optax.sgd(learning_rate, momentum=0.9), groups=groups
        ),
        {"state_dtype": "params"},
    ),
    _primitive(
        "transport_momentum(adam)",
        lambda learning_rate, groups="unit": optax_sphere.transport_momentum(
            optax.adam(learning_rate), groups=groups
        ),
        ADAM_INNER,
    ),
    _primitive(
        "transport_momentum(adam,exact=True)",
        lambda learning_rate, groups="unit": optax_sphere.transport_momentum(
            optax.adam(learning_rate), groups=groups, exact=True
        ),
        ADAM_INNER,
    ),
    _primitive(
        "rescale_transport_momentum(scale_by_standardized_adam)",
        lambda learning_rate, groups="unit": optax_sphere.rescale_transport_momentum(
            optax.chain(
                optax_sphere.scale_by_standardized_adam(groups=groups),
                optax.scale_by_learning_rate(learning_rate),
            ),
            groups=groups,
        ),
    ),
    _primitive(
        "chain(scale_by_standardized_adam,decoupled_weight_decay)",
        lambda learning_rate, groups="unit": optax.chain(
            optax_sphere.scale_by_standardized_adam(groups=groups),
            optax.scale_by_learning_rate(learning_rate),
            optax_sphere.decoupled_weight_decay(1e-2, learning_rate),
        ),
    ),
    _primitive(
        "scale_invariant_projection(adam)",
        lambda learning_rate, groups="unit": optax.chain(
            optax_sphere.scale_invariant_projection(
                optax.scale_by_adam(), weight_decay=1e-2, groups=groups
            ),
            optax.scale_by_learning_rate(learning_rate),
        ),
        learning_rate=3e-2,  # as adamp
    ),
]

PRIMITIVES += [
    _primitive(
        "rotational_rms_control(scale_by_adam)",
        # rotational groups move by eta_r alone: tie it to the learning rate (as the rv_*
        # aliases do), so that a learning-rate schedule or injected value reaches them
        lambda learning_rate, groups="unit": optax_sphere.rotational_rms_control(
            optax.scale_by_adam(),
            eta_r=learning_rate,
            ungrouped_learning_rate=learning_rate,
            ungrouped_weight_decay=1e-2,
            groups=groups,
        ),
        STAYS,
    ),
    _primitive(
        "chain(scale_by_psi_metric,sgd)",
        lambda learning_rate, groups="unit": optax.chain(
            optax_sphere.scale_by_psi_metric(groups=groups), optax.sgd(learning_rate, momentum=0.9)
        ),
        # the state is optax.sgd's
        {**STAYS, "state_dtype": "params", "changed_tree": "optax_inner"},
    ),
    _primitive(
        "chain(project_tangent,sgd,retract_to_sphere)",
        lambda learning_rate, groups="unit": optax.chain(
            optax_sphere.project_tangent(groups=groups),
            optax.sgd(learning_rate, momentum=0.9),
            optax_sphere.retract_to_sphere("exp", groups=groups),
        ),
        # the exponential map steps by the angle Delta_perp / ||x||: none at the origin
        {**STAYS, "state_dtype": "params", "changed_tree": "optax_inner"},
    ),
    _primitive(
        "monitored(adam_srt)",
        lambda learning_rate, groups="unit": optax_sphere.monitored(
            optax_sphere.adam_srt(learning_rate, groups=groups), groups=groups
        ),
    ),
]

CASES: list[Case] = ALIASES + PRIMITIVES
BY_NAME: dict[str, Case] = {c.name: c for c in CASES}


def params(cases: list[Case] | None = None) -> list[Any]:
    """``pytest.param`` per case."""
    out = []
    for case in CASES if cases is None else cases:
        out.append(pytest.param(case, id=case.name))
    return out
