"""Majority vote (self-consistency) and its log-probability-weighted variant.

Each sample's extracted answer gets a vote of some weight; the answer with the most weight wins.
Weightings are named and registered (``@register_weighting``):

* ``uniform`` - one vote per sample (classic self-consistency, Wang et al. 2022).
* ``mean_logprob`` - ``exp(mean token logprob)``, the geometric-mean token probability; length-
  neutral. (Softmax over mean logprobs gives the same shares: it only rescales these weights.)
* ``sum_logprob`` - softmax over summed logprobs, i.e. each sample's normalised sequence
  probability; favours short completions.

Ties are broken deterministically by **earliest first appearance**: among answers with equal
weight, the one whose first vote came first in sample order wins. This makes a decision a pure
function of the ordered samples, which adaptive stopping relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from natix.engines.base import Completion
from natix.scaling.extract import AnswerExtractor, get_extractor
from natix.scaling.registry import StrategyArgs, register_strategy
from natix.scaling.strategy import Strategy, StrategyResult

__all__ = [
    "Weighting",
    "register_weighting",
    "get_weighting",
    "available_weightings",
    "Tally",
    "tally",
    "MajorityVote",
]

Weighting = Callable[[Sequence[Completion]], list[float]]
"""Per-sample vote weights for a prompt's completions (all of them at once, so a weighting
may normalise across samples)."""

_WEIGHTINGS: dict[str, Weighting] = {}


def register_weighting(name: str) -> Callable[[Weighting], Weighting]:
    def deco(fn: Weighting) -> Weighting:
        if name in _WEIGHTINGS:
            raise ValueError(f"weighting {name!r} is already registered")
        _WEIGHTINGS[name] = fn
        return fn

    return deco


def available_weightings() -> list[str]:
    return sorted(_WEIGHTINGS)


def get_weighting(name: str) -> Weighting:
    if name not in _WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; available: {', '.join(available_weightings())}")
    return _WEIGHTINGS[name]


@register_weighting("uniform")
def _uniform(completions: Sequence[Completion]) -> list[float]:
    return [1.0] * len(completions)


@register_weighting("mean_logprob")
def _exp_mean_logprob(completions: Sequence[Completion]) -> list[float]:
    return [math.exp(c.mean_logprob) for c in completions]


@register_weighting("sum_logprob")
def _softmax_sum_logprob(completions: Sequence[Completion]) -> list[float]:
    if not completions:
        return []
    sums = [c.sum_logprob for c in completions]
    top = max(sums)  # subtract the max: exp of a -300 nat sequence logprob underflows to 0
    exps = [math.exp(s - top) for s in sums]
    total = sum(exps)
    return [e / total for e in exps]


@dataclass(frozen=True)
class Tally:
    """Outcome of a vote: ``winner`` (``None`` if nobody answered), ``votes`` in
    first-appearance order, ``total`` weight of all samples (answered or not)."""

    winner: str | None
    votes: dict[str, float]
    total: float

    @property
    def confidence(self) -> float | None:
        if self.winner is None or self.total <= 0:
            return None
        return self.votes[self.winner] / self.total


def tally(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> Tally:
    """Weighted plurality over ``answers`` (``None`` abstains); ties -> earliest first appearance."""
    if weights is None:
        weights = [1.0] * len(answers)
    if len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    votes: dict[str, float] = {}
    for answer, w in zip(answers, weights):
        if w < 0 or math.isnan(w):
            raise ValueError(f"vote weights must be >= 0, got {w}")
        if answer is not None:
            votes[answer] = votes.get(answer, 0.0) + w
    # max() returns the first maximal item and dicts keep insertion (= first appearance) order.
    winner = max(votes, key=votes.__getitem__) if votes else None
    return Tally(winner, votes, float(sum(weights)))


@dataclass(frozen=True)
class MajorityVote(Strategy):
    """Plurality vote over ``n`` samples, optionally weighted (see module doc).

    ``extractor``: an :class:`~natix.scaling.extract.AnswerExtractor`, a registered name or a
    callable. ``confidence`` is the winner's share of the total weight.
    """

    kind = "maj"

    n: int = 8
    extractor: AnswerExtractor | str = "number"
    weighting: str = "uniform"

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"MajorityVote.n must be >= 1, got {self.n}")
        get_weighting(self.weighting)  # fail at construction, not mid-benchmark
        object.__setattr__(self, "extractor", get_extractor(self.extractor))

    @property
    def budget(self) -> int:
        return self.n

    @property
    def needs_logprobs(self) -> bool:
        return self.weighting != "uniform"

    def spec(self) -> str:
        if self.weighting == "uniform":
            return f"maj@{self.n}"
        return f"wmaj@{self.n}:{self.weighting}"

    def decide(self, completions: Sequence[Completion], prompt: str | None = None) -> StrategyResult:
        samples = self._take(completions, self.n)
        answers = tuple(self.extractor(c.text) for c in samples)  # type: ignore[operator]
        weights = get_weighting(self.weighting)(samples)
        result = tally(answers, weights)
        chosen = None if result.winner is None else samples[answers.index(result.winner)]
        return StrategyResult(
            strategy=self.spec(),
            answer=result.winner,
            confidence=result.confidence,
            votes=result.votes,
            answers=answers,
            scores=tuple(weights),
            completion=chosen,
            samples_spent=len(samples),
            budget=self.n,
            total_weight=result.total,
        )


@register_strategy("maj", "majority")
def _maj(args: StrategyArgs) -> MajorityVote:
    return MajorityVote(n=args.n_or(8), extractor=args.extractor, **args.options(positional="weighting"))


@register_strategy("wmaj", "weighted")
def _wmaj(args: StrategyArgs) -> MajorityVote:
    opts = args.options(positional="weighting")
    opts.setdefault("weighting", "mean_logprob")
    return MajorityVote(n=args.n_or(8), extractor=args.extractor, **opts)
