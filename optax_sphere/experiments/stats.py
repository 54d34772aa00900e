"""Paired comparisons over seeds: the difference of an optimizer to its base, with a CI.

Seed ``s`` gives every optimizer of a comparison the same initialisation and data order, so
the runs of two optimizers pair up by seed and the per-seed differences cancel most of the
seed-to-seed variation. The interval is Student's t interval of the mean paired difference
(``scipy.stats.ttest_rel``); it is exact for normally distributed differences and
approximate otherwise, and each interval holds at its own level (no correction for the
number of comparisons in a table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["PairedComparison", "paired_comparison"]

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no detectable difference"
TOO_FEW = "too few seeds"


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """Mean of ``a - b`` over paired seeds, its confidence interval and the verdict.

    ``verdict``: ``"better"`` (the interval is above 0), ``"worse"`` (below 0), ``"no
    detectable difference"`` (it contains 0) or ``"too few seeds"`` (fewer than 2 pairs).
    ``half_width``: half the interval's width, the smallest difference these seeds can
    separate from 0 at this level (``None`` with fewer than 2 pairs).
    """

    n: int
    mean_difference: float
    low: float | None
    high: float | None
    p_value: float | None
    confidence: float
    verdict: str

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    def as_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "half_width": self.half_width}


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = 0.95,
    higher_is_better: bool = True,
) -> PairedComparison:
    """Compares ``a[i]`` with ``b[i]`` (the same seed ``i``): the mean of ``a - b`` and its
    interval; the verdict says whether ``a`` is better (higher, or lower for a loss).

    Args:
      a, b: one value per seed, the same seeds in the same order.
      confidence: the level of the interval.
      higher_is_better: ``False`` for a loss.

    Returns:
      A :class:`PairedComparison` (mean difference, interval, p-value, verdict).

    Example:
      >>> c = paired_comparison([0.91, 0.93, 0.92, 0.94], [0.90, 0.91, 0.91, 0.92])
      >>> c.verdict, round(c.mean_difference, 4)
      ('better', 0.015)

    References:
      Student's paired t-test, as ``scipy.stats.ttest_rel`` computes it.
    """
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"expected two 1-D sequences of one value per seed, got {a.shape}, {b.shape}"
        )
    diff = a - b
    n = len(diff)
    if n < 2:
        mean = float(diff.mean()) if n else float("nan")
        return PairedComparison(n, mean, None, None, None, confidence, TOO_FEW)
    mean = float(diff.mean())
    if np.all(diff == diff[0]):  # no spread: the t interval is degenerate
        low = high = mean
        p = 1.0 if mean == 0 else 0.0
    else:
        result = stats.ttest_rel(a, b)
        interval = result.confidence_interval(confidence)
        low, high, p = float(interval.low), float(interval.high), float(result.pvalue)
    verdict = NO_DIFFERENCE
    if low > 0 or high < 0:
        verdict = BETTER if (low > 0) == higher_is_better else WORSE
    return PairedComparison(n, mean, low, high, p, confidence, verdict)
