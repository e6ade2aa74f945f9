from __future__ import annotations

import math

import pytest

from natix.bench.stats import paired_difference, percentile, wilson_interval


def test_wilson_known_values() -> None:
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_difference() -> None:
    a = [True] * 30 + [False] * 10
    b = [False] * 10 + [True] * 20 + [False] * 10
    mean, lo, hi = paired_difference(a, b)
    assert mean == pytest.approx(0.25) and lo > 0 and hi < 1
    assert paired_difference(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_percentile() -> None:
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))
