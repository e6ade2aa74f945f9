"""Greedy decoding: one temperature-0 sample, its answer taken as is - the baseline every
test-time-compute strategy has to beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from natix.engines.base import Completion, SamplingSpec
from natix.scaling.extract import AnswerExtractor, get_extractor
from natix.scaling.registry import StrategyArgs, register_strategy
from natix.scaling.strategy import Strategy, StrategyResult

__all__ = ["Greedy"]


@dataclass(frozen=True)
class Greedy(Strategy):
    """One greedy sample. Its draw is its own (temperature 0), so in draw-once evaluation it
    never shares samples with the sampling strategies; ``decide`` simply reads the first
    completion it is given. Confidence is 1.0 when it answered (a vote of one)."""

    kind = "greedy"

    extractor: AnswerExtractor | str = "number"

    def __post_init__(self) -> None:
        object.__setattr__(self, "extractor", get_extractor(self.extractor))

    @property
    def budget(self) -> int:
        return 1

    def spec(self) -> str:
        return "greedy"

    def sampling_spec(self, base: SamplingSpec) -> SamplingSpec:
        return base.replace(n=1, temperature=0.0)

    def decide(self, completions: Sequence[Completion], prompt: str | None = None) -> StrategyResult:
        (first,) = self._take(completions, 1)
        answer = self.extractor(first.text)  # type: ignore[operator]
        return StrategyResult(
            strategy=self.spec(),
            answer=answer,
            confidence=None if answer is None else 1.0,
            votes={} if answer is None else {answer: 1.0},
            answers=(answer,),
            scores=(1.0,),
            completion=first,
            samples_spent=1,
            budget=1,
            total_weight=1.0,
        )


@register_strategy("greedy")
def _greedy(args: StrategyArgs) -> Greedy:
    if args.n not in (None, 1):
        raise ValueError(f"{args.spec!r}: greedy draws exactly one sample")
    return Greedy(extractor=args.extractor, **args.options())
