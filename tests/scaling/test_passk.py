"""pass@k (Chen et al. 2021) against brute-force enumeration of k-subsets."""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations

import pytest

from natix.scaling.passk import count_correct, coverage, mean_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> Fraction:
    correct = set(range(c))  # which samples are correct does not matter, only how many
    subsets = list(combinations(range(n), k))
    return Fraction(sum(1 for s in subsets if correct & set(s)), len(subsets))


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_matches_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force(n, c, k)), abs=1e-15)


def test_pass_at_k_edges() -> None:
    assert pass_at_k(16, 0, 8) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 9, 8) == 1.0  # fewer than k wrong samples: every subset hits one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the plain accuracy c/n
    # huge n stays exact-ish (integer combinatorics, no overflow)
    assert 0.0 < pass_at_k(2000, 1, 1000) == pytest.approx(0.5)


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_validates(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_and_coverage_helpers() -> None:
    assert mean_pass_at_k([(4, 0), (4, 4)], 2) == 0.5
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)
    answers = ["5", None, "7", "5"]
    assert count_correct(answers, "5") == 2
    assert count_correct(answers, None) == 0
    assert count_correct(answers, "5", lambda a, g: a is None) == 1
    assert coverage(answers, "7") == 1.0  # pass@n: any sample right
    assert coverage(answers, "7", k=1) == 0.25
    assert coverage(answers, "9") == 0.0
