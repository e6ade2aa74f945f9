"""Adaptive majority vote: stop sampling once more samples are unlikely to change the answer.

Samples are consumed in order and a *stop rule* is checked at fixed checkpoints: after the first
``max(min_samples, round_size)`` samples, then every ``round_size`` samples, and at ``n_max``.
The checkpoints are the same whether samples are drawn live (in rounds of ``round_size``) or
replayed from a pre-drawn list via :meth:`AdaptiveVote.decide`, so a replay reports exactly what
a live run over the same sample sequence would have done - including the samples it saved.

Stop rules (registered by name, ``@register_stop_rule``), each returning a score in [0, 1];
sampling stops when the score exceeds ``threshold``:

* ``lead`` - *certain*: 1.0 once the leader cannot be overtaken (or out-tied, under the
  earliest-first-appearance tie-break) even if every remaining sample went to one rival.
  The answer is then provably the one full voting over ``n_max`` samples would give.
* ``beta`` - Adaptive-Consistency (Aggarwal et al., 2023): with leader and runner-up counts
  v1, v2, the posterior P(p1 > p2) under Beta(v1 + 1, v2 + 1) - computed exactly.
  Cheaper, but may stop on an answer full voting would overturn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from natix.engines.base import Completion, Engine, SamplingSpec
from natix.scaling.extract import AnswerExtractor, get_extractor
from natix.scaling.registry import StrategyArgs, register_strategy
from natix.scaling.strategy import Strategy, StrategyResult
from natix.scaling.vote import tally

__all__ = ["StopRule", "register_stop_rule", "available_stop_rules", "beta_leader_probability", "AdaptiveVote"]

StopRule = Callable[[Sequence[str | None], int], float]
"""``(answers so far, budget n_max) -> score in [0, 1]``; stop when score > threshold."""

_STOP_RULES: dict[str, StopRule] = {}


def register_stop_rule(name: str) -> Callable[[StopRule], StopRule]:
    def deco(fn: StopRule) -> StopRule:
        if name in _STOP_RULES:
            raise ValueError(f"stop rule {name!r} is already registered")
        _STOP_RULES[name] = fn
        return fn

    return deco


def available_stop_rules() -> list[str]:
    return sorted(_STOP_RULES)


@register_stop_rule("lead")
def _leader_locked(answers: Sequence[str | None], budget: int) -> float:
    remaining = budget - len(answers)
    votes = tally(answers).votes  # first-appearance order
    if remaining <= 0:
        return 1.0
    if not votes:
        return 0.0
    order = list(votes)
    leader = max(order, key=votes.__getitem__)
    lead_count, lead_pos = votes[leader], order.index(leader)
    # An answer not seen yet would appear after the leader, so it loses a tie.
    if remaining > lead_count:
        return 0.0
    for pos, rival in enumerate(order):
        if rival == leader:
            continue
        best_case = votes[rival] + remaining
        if best_case > lead_count or (best_case == lead_count and pos < lead_pos):
            return 0.0
    return 1.0


def beta_leader_probability(v1: int, v2: int) -> float:
    """P(p1 > p2) for p1 ~ Beta(v1 + 1, v2 + 1) (uniform prior, two leading answers).

    For integer parameters the Beta CDF is a binomial tail:
    P(X > 1/2) = P(Binomial(v1 + v2 + 1, 1/2) <= v1), summed exactly in integers.
    """
    if v1 < 0 or v2 < 0:
        raise ValueError("vote counts must be >= 0")
    n = v1 + v2 + 1
    return sum(math.comb(n, j) for j in range(v1 + 1)) / 2**n


@register_stop_rule("beta")
def _beta_rule(answers: Sequence[str | None], budget: int) -> float:
    counts = sorted(tally(answers).votes.values(), reverse=True) + [0.0, 0.0]
    return beta_leader_probability(int(counts[0]), int(counts[1]))


@dataclass(frozen=True)
class AdaptiveVote(Strategy):
    """Majority vote over at most ``n_max`` samples with early stopping (see module doc).

    Tie-break and confidence as in :class:`~natix.scaling.vote.MajorityVote` (earliest first
    appearance; winner's share of the samples spent). ``extra`` reports the rule, its score at
    the stop and the checkpoints used.
    """

    kind = "adaptive"

    n_max: int = 16
    rule: str = "lead"
    threshold: float = 0.95
    round_size: int = 2
    min_samples: int = 1
    extractor: AnswerExtractor | str = "number"

    def __post_init__(self) -> None:
        if self.n_max < 1:
            raise ValueError(f"AdaptiveVote.n_max must be >= 1, got {self.n_max}")
        if self.rule not in _STOP_RULES:
            raise ValueError(f"unknown stop rule {self.rule!r}; available: {', '.join(available_stop_rules())}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.round_size < 1:
            raise ValueError(f"round_size must be >= 1, got {self.round_size}")
        if not 1 <= self.min_samples <= self.n_max:
            raise ValueError(f"min_samples must be in [1, n_max={self.n_max}], got {self.min_samples}")
        object.__setattr__(self, "extractor", get_extractor(self.extractor))

    @property
    def budget(self) -> int:
        return self.n_max

    def spec(self) -> str:
        s = f"adaptive@{self.n_max}:{self.rule}"
        if self.rule != "lead":
            s += f",threshold={self.threshold:g}"
        return s + f",round={self.round_size},min={self.min_samples}"

    def checkpoints(self) -> list[int]:
        """Sample counts after which the stop rule is checked (the last is always n_max)."""
        first = min(max(self.min_samples, self.round_size), self.n_max)
        return [*range(first, self.n_max, self.round_size), self.n_max]

    def _scan(self, answers: Sequence[str | None]) -> tuple[int, float] | None:
        """First checkpoint within ``answers`` where sampling stops, and the rule's score
        there; ``None`` if more samples are needed to know."""
        stop = _STOP_RULES[self.rule]
        for cp in self.checkpoints():
            if cp > len(answers):
                return None
            score = stop(answers[:cp], self.n_max)
            if score > self.threshold or cp == self.n_max:
                return cp, score
        raise AssertionError("unreachable: the last checkpoint is n_max")

    def decide(self, completions: Sequence[Completion], prompt: str | None = None) -> StrategyResult:
        answers: list[str | None] = []
        for c in completions[: self.n_max]:
            answers.append(self.extractor(c.text))  # type: ignore[operator]
        found = self._scan(answers)
        if found is None:
            raise ValueError(
                f"{self.spec()}: {len(completions)} completions are not enough to reach a stop "
                f"(checkpoints {self.checkpoints()})"
            )
        spent, score = found
        used = tuple(answers[:spent])
        result = tally(used)
        chosen = None if result.winner is None else completions[used.index(result.winner)]
        return StrategyResult(
            strategy=self.spec(),
            answer=result.winner,
            confidence=result.confidence,
            votes=result.votes,
            answers=used,
            scores=(1.0,) * spent,
            completion=chosen,
            samples_spent=spent,
            budget=self.n_max,
            total_weight=float(spent),
            stopped_early=spent < self.n_max,
            extra={"rule": self.rule, "stop_score": score, "threshold": self.threshold},
        )

    def run(self, engine: Engine, prompts: Sequence[str], base: SamplingSpec) -> list[StrategyResult]:
        """Draw in rounds up to each checkpoint, only for prompts that have not stopped yet.
        Round ``r`` uses ``seed = base.seed + r`` (if seeded) so rounds draw fresh samples."""
        self.sampling_spec(base)  # validates (no multi-sample greedy)
        samples: list[list[Completion]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        spent = 0
        for round_idx, cp in enumerate(self.checkpoints()):
            chunk = cp - spent
            spec = base.replace(n=chunk, seed=None if base.seed is None else base.seed + round_idx)
            drawn = engine.generate([prompts[i] for i in active], spec)
            if len(drawn) != len(active) or any(len(d) < chunk for d in drawn):
                raise RuntimeError(f"engine returned fewer completions than the {chunk} asked for")
            for i, new in zip(active, drawn):
                samples[i].extend(new[:chunk])
            spent = cp
            active = [
                i for i in active
                if self._scan([self.extractor(c.text) for c in samples[i]]) is None  # type: ignore[operator]
            ]
            if not active:
                break
        return [self.decide(s, p) for s, p in zip(samples, prompts)]


@register_strategy("adaptive", "ada")
def _adaptive(args: StrategyArgs) -> AdaptiveVote:
    opts = args.options(positional="rule", aliases={"round": "round_size", "min": "min_samples"})
    return AdaptiveVote(n_max=args.n_or(16), extractor=args.extractor, **opts)
