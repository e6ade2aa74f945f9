"""pass@k / coverage: the chance that at least one of k samples is correct.

Reports show coverage beside every strategy so the gap between "some sample was right" and
"the strategy picked a right one" stays visible (DESIGN.md: pass@8 74.7% vs maj@8 47.0%).

The estimator is the unbiased one of Chen et al. 2021 (Codex paper): draw n >= k samples, count
c correct, and estimate pass@k = 1 - C(n - c, k) / C(n, k) - the probability that a random
k-subset of the n samples contains a correct one. Computed with exact integers (then one
correctly rounded division), so it is exact for any n.
"""

from __future__ import annotations

from math import comb
from typing import Callable, Iterable, Sequence

__all__ = ["pass_at_k", "mean_pass_at_k", "count_correct", "coverage"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (``1 <= k <= n``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:  # every k-subset must contain a correct sample
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as ``(n, c)`` pairs (the dataset-level coverage)."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("no problems to average over")
    return sum(values) / len(values)


def count_correct(
    answers: Sequence[str | None],
    gold: str | None,
    is_correct: Callable[[str | None, str], bool] | None = None,
) -> int:
    """How many sampled ``answers`` match ``gold`` (canonical strings compare with ``==``
    unless ``is_correct(answer, gold)`` is given). A ``None`` gold matches nothing."""
    if gold is None:
        return 0
    if is_correct is None:
        return sum(1 for a in answers if a is not None and a == gold)
    return sum(1 for a in answers if is_correct(a, gold))


def coverage(answers: Sequence[str | None], gold: str | None, k: int | None = None) -> float:
    """pass@k of one problem's sampled answers (``k`` defaults to all of them)."""
    n = len(answers)
    return pass_at_k(n, count_correct(answers, gold), n if k is None else k)
