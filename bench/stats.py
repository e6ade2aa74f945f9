"""Small statistics for benchmark reports: intervals that say how much a number can be trusted."""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0% and 100%, unlike Wald)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends at 0 and n (the formula leaves ~1e-17 of rounding there).
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the same items, with a 95% interval (normal approximation on the
    per-item differences). Paired, so the noise of item difficulty cancels: this is the right
    test for "did strategy A beat greedy on these items", not two overlapping intervals."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        return (0.0, -1.0, 1.0)
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return (mean, mean - half, mean + half)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def brier_score(probs: Sequence[float], outcomes: Sequence[bool]) -> float:
    """Mean squared error of probabilities against 0/1 outcomes (0 is perfect; always saying
    0.5 scores 0.25)."""
    if len(probs) != len(outcomes) or not probs:
        raise ValueError(f"need as many probabilities as outcomes (> 0), got {len(probs)} and {len(outcomes)}")
    return sum((p - float(y)) ** 2 for p, y in zip(probs, outcomes)) / len(probs)


def expected_calibration_error(probs: Sequence[float], outcomes: Sequence[bool], bins: int = 10) -> float:
    """ECE of a binary classifier: predictions binned by confidence max(p, 1 - p) into ``bins``
    equal-width bins; the item-weighted mean of |accuracy - mean confidence| per bin."""
    if len(probs) != len(outcomes) or not probs:
        raise ValueError(f"need as many probabilities as outcomes (> 0), got {len(probs)} and {len(outcomes)}")
    binned: dict[int, list[tuple[float, bool]]] = {}
    for p, y in zip(probs, outcomes):
        conf = max(p, 1 - p)
        right = (p >= 0.5) == bool(y)
        # confidence lies in [0.5, 1]; equal-width bins over [0, 1] as is usual
        binned.setdefault(min(bins - 1, int(conf * bins)), []).append((conf, right))
    n = len(probs)
    return sum(len(b) / n * abs(sum(r for _, r in b) / len(b) - sum(c for c, _ in b) / len(b)) for b in binned.values())
