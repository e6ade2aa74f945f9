"""The Strategy contract: how test-time compute turns samples into one answer per prompt.

A strategy is a frozen, self-validating dataclass with two entry points:

* :meth:`Strategy.decide` - a *pure* function of already-drawn completions (consumed in order).
  This is what lets a benchmark draw e.g. 16 samples once and evaluate maj@8, best-of-8 and
  adaptive maj@<=16 on the very same samples.
* :meth:`Strategy.run` - draw from any :class:`~natix.engines.base.Engine` and decide. The default
  draws :meth:`sampling_spec` once for all prompts; adaptive strategies override it to draw in
  rounds.

Every decision is a :class:`StrategyResult`: the answer plus its evidence (votes, per-sample
answers and scores, samples spent of the budget, confidence, the chosen completion).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Mapping, Sequence

from natix.engines.base import Completion, Engine, SamplingSpec

__all__ = ["Strategy", "StrategyResult"]


@dataclass(frozen=True)
class StrategyResult:
    """One prompt's decision and the evidence behind it.

    ``answer``: canonical answer (``None``: no sample yielded one).
    ``confidence``: the winner's share of the vote, in [0, 1]; the denominator includes samples
    that gave no answer, so a run where most samples fail to answer is not reported as sure.
    For a yes/no task ``share("yes")`` is a probability score (e.g. for AUROC).
    ``votes``: answer -> total vote weight (counts for plain voting), in first-appearance order;
    ``total_weight``: the weight of all consumed samples, answered or not (the denominator).
    ``answers`` / ``scores``: per consumed sample, its extracted answer and its weight/score.
    ``completion``: the completion that carries the answer (best-scored, or the first
    sample with the winning answer). ``samples_spent`` of ``budget`` were consumed.
    """

    strategy: str
    answer: str | None
    confidence: float | None
    votes: Mapping[str, float]
    answers: tuple[str | None, ...]
    scores: tuple[float, ...]
    completion: Completion | None
    samples_spent: int
    budget: int
    total_weight: float = 0.0
    stopped_early: bool = False
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "votes", MappingProxyType(dict(self.votes)))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        if not 0 <= self.samples_spent <= self.budget:
            raise ValueError(f"samples_spent={self.samples_spent} outside [0, budget={self.budget}]")

    @property
    def samples_saved(self) -> int:
        """Budget left unspent by early stopping."""
        return self.budget - self.samples_spent

    def share(self, answer: str) -> float:
        """Vote share of ``answer`` (0.0 if it got no votes); denominator as for ``confidence``."""
        if self.total_weight <= 0:
            return 0.0
        return self.votes.get(answer, 0.0) / self.total_weight

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly summary (no completion objects) for the benchmark's JSONL rows."""
        return {
            "strategy": self.strategy,
            "answer": self.answer,
            "confidence": self.confidence,
            "votes": dict(self.votes),
            "answers": list(self.answers),
            "scores": list(self.scores),
            "samples_spent": self.samples_spent,
            "budget": self.budget,
            "samples_saved": self.samples_saved,
            "stopped_early": self.stopped_early,
            **{k: v for k, v in self.extra.items() if isinstance(v, (str, int, float, bool, type(None)))},
        }


class Strategy(ABC):
    """Base class of all strategies (concrete ones are frozen dataclasses).

    Subclasses set ``kind`` (the registry name used in :meth:`spec`) and implement
    :attr:`budget`, :meth:`spec` and :meth:`decide`.
    """

    kind: ClassVar[str] = ""

    @property
    @abstractmethod
    def budget(self) -> int:
        """The most samples this strategy consumes per prompt."""

    @abstractmethod
    def spec(self) -> str:
        """Canonical spec string; ``parse_strategy(s.spec())`` rebuilds an equal strategy
        (up to injected callables such as verifiers and extractors)."""

    @abstractmethod
    def decide(self, completions: Sequence[Completion], prompt: str | None = None) -> StrategyResult:
        """Decide from pre-drawn completions of one prompt, consumed in order. Raises
        ``ValueError`` if fewer than needed are given; extra ones are ignored."""

    @property
    def needs_logprobs(self) -> bool:
        return False

    def sampling_spec(self, base: SamplingSpec) -> SamplingSpec:
        """What to draw for this strategy given the task's base spec (``n`` = budget).
        Drawing more than one sample at temperature 0 buys nothing, so that is refused."""
        if self.budget > 1 and base.greedy:
            raise ValueError(
                f"{self.spec()} draws {self.budget} samples but the base spec is greedy "
                "(temperature 0): set a temperature > 0"
            )
        return base.replace(n=self.budget, logprobs=base.logprobs or self.needs_logprobs)

    def run(self, engine: Engine, prompts: Sequence[str], base: SamplingSpec) -> list[StrategyResult]:
        """Draw from ``engine`` and decide, one result per prompt."""
        drawn = engine.generate(list(prompts), self.sampling_spec(base))
        if len(drawn) != len(prompts):
            raise RuntimeError(f"engine returned {len(drawn)} results for {len(prompts)} prompts")
        return [self.decide(c, p) for c, p in zip(drawn, prompts)]

    def __str__(self) -> str:
        return self.spec()

    def _take(self, completions: Sequence[Completion], n: int) -> Sequence[Completion]:
        if len(completions) < n:
            raise ValueError(f"{self.spec()} needs {n} completions, got {len(completions)}")
        return completions[:n]
