"""How the suite chooses a tolerance, and the audit that checks every tolerance's margin.

A tolerance is derived from the arithmetic it checks, never from what one machine measured:

* **Exact claims in float64.** An identity (two forms of one step, a sharded run against a
  single-device one, a transcription of a paper's equation) is checked in float64, where the
  only error is the order of the roundings: ``unit_roundoff(float64) * n`` for ``n`` operations,
  grown by the condition number of the step and the number of steps. The bounds used are
  ``1e-12`` to ``1e-9``: four or more orders above the ``1e-16``-``1e-13`` measured.
* **Float32 results.** A claim that must hold in the precision users train in is bounded by
  :func:`float32_bound`: the float32 unit roundoff (``6e-8``) times the number of steps, the
  condition of one step (how much a relative change of its inputs moves its output: 1 for a
  sum of positive terms, ``||g|| ||x|| / |<g, x>|`` for a radial part, ``1 / (1 - beta)`` for a
  moment), and a factor for the length of the reductions (``sqrt(n)`` for the pairwise and
  blocked sums XLA emits, whose order depends on the CPU's vector width).
* **Statistical claims** (a loss within the noise of another) are bounded by their own
  spread, measured over seeds, never by a fixed number.

The margin rule: on the machine where a tolerance is set, the measured error sits at most a
tenth of its bound, so that another CPU's vector widths and summation orders cannot cross it.
The audit checks it for every comparison of the suite: with ``TOLERANCE_AUDIT=DIR`` set,
``conftest.py`` wraps ``np.testing.assert_allclose``, ``np.allclose``, ``jnp.allclose``,
``chex.assert_trees_all_close``, ``pytest.approx`` and :func:`assert_within`, and writes the
ratio of each measured error to its bound, per call site, to ``DIR``;
``python scripts/tolerance_margins.py`` runs the suite so and lists the sites whose ratio is
above a tenth.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

#: unit roundoff (half the machine epsilon) of each float type
UNIT_ROUNDOFF = {
    "float64": float(np.finfo(np.float64).eps) / 2,
    "float32": float(np.finfo(np.float32).eps) / 2,
    "bfloat16": 2.0**-9,
}
#: the factor between a tolerance and the largest error the margin rule allows
MARGIN = 10.0


def float32_bound(steps: int = 1, condition: float = 1.0, length: int = 1) -> float:
    """A relative bound for a float32 result after ``steps`` steps of a computation whose one
    step has relative condition number ``condition`` and reductions of ``length`` terms:
    ``MARGIN * u32 * steps * condition * sqrt(length)`` with a floor of ``MARGIN * u32``."""
    u = UNIT_ROUNDOFF["float32"]
    return MARGIN * u * max(steps, 1) * max(condition, 1.0) * math.sqrt(max(length, 1))


def float64_bound(steps: int = 1, condition: float = 1.0, length: int = 1) -> float:
    """As :func:`float32_bound`, in float64."""
    u = UNIT_ROUNDOFF["float64"]
    return MARGIN * u * max(steps, 1) * max(condition, 1.0) * math.sqrt(max(length, 1))


def bfloat16_bound(steps: int = 1, roundings: int = 2) -> float:
    """An absolute bound on unit-scale values after ``steps`` steps with bfloat16 parameters:
    every step rounds ``roundings`` values at the bfloat16 unit roundoff (``2^-9``; the update
    and the new parameter, plus the gradient where it is bfloat16 too), and these add up:
    ``MARGIN * u_bf16 * steps * roundings``."""
    return MARGIN * UNIT_ROUNDOFF["bfloat16"] * max(steps, 1) * max(roundings, 1)


def assert_approximately(
    value: Any,
    expected: Any,
    *,
    rel: float = 0.0,
    abs: float = 0.0,  # noqa: A002
    what: str = "",
) -> None:
    """``value`` within ``max(rel |expected|, abs)`` of ``expected``, elementwise, for a claim
    that is itself an approximation (a prediction of a theory, the mean of a simulated walk):
    the bound is the approximation's size, not a rounding error, and the audit lists it apart.
    Such a run is deterministic (fixed seeds), so a CPU can move it only by its rounding,
    orders of magnitude below the approximation."""
    v, e = np.asarray(value, np.float64), np.asarray(expected, np.float64)
    tol = np.maximum(rel * np.abs(e), abs)
    diff = np.abs(v - e)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.max(np.where(diff == 0, 0.0, diff / tol), initial=0.0))
    record(ratio, kind="approximation")
    assert np.all(diff <= tol), f"{what}: {value} not within {rel=}, {abs=} of {expected}"


# -- the audit -----------------------------------------------------------------------------

_AUDIT_DIR = os.environ.get("TOLERANCE_AUDIT")
_records: list[dict[str, Any]] = []


def _caller() -> str:
    """``tests/file.py:line`` of the first frame in a test file outside this module."""
    for frame in inspect.stack()[2:]:
        name = os.path.basename(frame.filename)
        if name.startswith("test_") or name in ("alias_cases.py", "reference.py"):
            return f"{name}:{frame.lineno}"
    return "?"


def record(ratio: float, where: str | None = None, kind: str = "rounding") -> None:
    """Records the ratio of a measured error to its bound (only with ``TOLERANCE_AUDIT``)."""
    if _AUDIT_DIR is None or not math.isfinite(ratio) and ratio != math.inf:
        return
    _records.append(
        {
            "where": where or _caller(),
            "test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
            "ratio": float(ratio),
            "kind": kind,
        }
    )


def assert_within(error: float, bound: float, what: str = "") -> None:
    """``error <= bound``, recorded by the audit."""
    record(error / bound if bound > 0 else (0.0 if error == 0 else math.inf))
    assert error <= bound, f"{what}: error {error:.3e} above its bound {bound:.3e}"


def leaf_relative_error(actual: Any, expected: Any) -> float:
    """``max |a - e| / max |e|``: the error of a leaf relative to its largest entry (the scale
    its rounding is relative to), ``inf`` where ``actual`` is not finite."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {a.shape} and {e.shape}")
    if a.size == 0:
        return 0.0
    if not np.all(np.isfinite(a)):
        return math.inf
    scale = max(float(np.max(np.abs(e))), float(np.finfo(np.float32).tiny))
    return float(np.max(np.abs(a - e))) / scale


def assert_trees_close(actual: Any, expected: Any, bound: float, what: str = "") -> None:
    """Every leaf of ``actual`` within ``bound`` of ``expected``, relative to the leaf's largest
    entry (:func:`leaf_relative_error`); trees of the same structure."""
    import jax

    leaves_a, treedef_a = jax.tree_util.tree_flatten_with_path(actual)
    leaves_e, treedef_e = jax.tree_util.tree_flatten_with_path(expected)
    assert treedef_a == treedef_e, f"{what}: {treedef_a} != {treedef_e}"
    for (path, a), (_, e) in zip(leaves_a, leaves_e):
        where = f"{what}{jax.tree_util.keystr(path)}"
        assert_within(leaf_relative_error(a, e), bound, where)


def _ratio(actual: Any, desired: Any, rtol: float, atol: float) -> float | None:
    try:
        a = np.asarray(actual, dtype=np.float64)
        d = np.asarray(desired, dtype=np.float64)
        a, d = np.broadcast_arrays(a, d)
    except (TypeError, ValueError):
        return None
    if a.size == 0:
        return 0.0
    both_nan = np.isnan(a) & np.isnan(d)
    same_inf = np.isinf(a) & (a == d)
    diff = np.where(both_nan | same_inf, 0.0, np.abs(a - d))
    tol = atol + rtol * np.abs(np.where(np.isfinite(d), d, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, np.where(tol > 0, diff / tol, np.inf))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return float(np.max(ratio))


def _wrap(fn: Callable, ratio_of: Callable[..., float | None]) -> Callable:
    """``fn`` recording its ratio when the comparison holds (an assertion that passes, an
    ``allclose`` that is true): a comparison that fails is an assertion of a difference
    (``assert not np.allclose(...)``), whose margin is not a rounding question."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        if result is None or bool(result):
            try:
                r = ratio_of(*args, **kwargs)
            except Exception:  # the audit never changes a test's outcome
                r = None
            if r is not None:
                record(r)
        return result

    return wrapped


def _allclose_ratio(default_rtol: float, default_atol: float):
    def ratio_of(actual, desired, rtol=default_rtol, atol=default_atol, *_, **__):
        return _ratio(actual, desired, rtol, atol)

    return ratio_of


def _trees_ratio(*trees, rtol=1e-6, atol=0.0, **_):
    import jax

    first, *rest = trees
    worst = 0.0
    for other in rest:
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(first)):
            r = _ratio(a, b, rtol, atol)
            if r is not None:
                worst = max(worst, r)
    return worst


class _AuditedApprox:
    """``pytest.approx`` that records the ratio of each comparison made with it."""

    def __init__(self, approx: Any, expected: Any, rel: float | None, abs_: float | None):
        self._approx, self._expected = approx, expected
        self._rel = 1e-6 if rel is None and abs_ is None else (rel or 0.0)
        self._abs = 1e-12 if abs_ is None else abs_
        if rel is None and abs_ is not None:
            self._rel = 0.0

    def __eq__(self, actual: Any) -> bool:
        if not self._approx == actual:
            return False
        try:
            values = self._expected
            if isinstance(values, dict):
                actual = [actual[k] for k in values]
                values = list(values.values())
            a = np.asarray(actual, np.float64)
            e = np.asarray(values, np.float64)
            diff = np.abs(a - e)
            tol = np.maximum(self._rel * np.abs(e), self._abs)
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(diff == 0, 0.0, np.where(tol > 0, diff / tol, np.inf))
            record(float(np.max(r, initial=0.0)))
        except Exception:
            pass
        return True

    __hash__ = None

    def __ne__(self, actual: Any) -> bool:
        return not self == actual

    def __repr__(self) -> str:
        return repr(self._approx)


def install() -> None:
    """Wraps the comparisons of numpy, jax.numpy, chex and pytest (``TOLERANCE_AUDIT`` only)."""
    if _AUDIT_DIR is None:
        return
    import chex
    import jax.numpy as jnp
    import pytest

    np.testing.assert_allclose = _wrap(np.testing.assert_allclose, _allclose_ratio(1e-7, 0.0))
    np.allclose = _wrap(np.allclose, _allclose_ratio(1e-5, 1e-8))
    jnp.allclose = _wrap(jnp.allclose, _allclose_ratio(1e-5, 1e-8))
    chex.assert_trees_all_close = _wrap(chex.assert_trees_all_close, _trees_ratio)
    approx = pytest.approx

    @functools.wraps(approx)
    def audited_approx(expected, rel=None, abs=None, nan_ok=False):  # noqa: A002
        inner = approx(expected, rel=rel, abs=abs, nan_ok=nan_ok)
        return _AuditedApprox(inner, expected, rel, abs)

    pytest.approx = audited_approx


def flush() -> None:
    """Writes this process's records to ``TOLERANCE_AUDIT``."""
    if _AUDIT_DIR is None or not _records:
        return
    os.makedirs(_AUDIT_DIR, exist_ok=True)
    path = os.path.join(_AUDIT_DIR, f"audit-{os.getpid()}.jsonl")
    with open(path, "a") as f:
        for r in _records:
            f.write(json.dumps(r) + "\n")
    _records.clear()
