"""Draw once, evaluate many: run several strategies on one shared set of samples.

Sampling dominates the cost of test-time compute, and comparing strategies on *different*
samples adds noise to exactly the differences a benchmark wants to see. So strategies whose
draws differ only in ``n`` share one draw of the largest ``n``; each then decides on the prefix
it needs (maj@8 and best-of-8 read samples 0-7, adaptive maj@<=16 reads on until it stops).
Greedy draws at temperature 0, so it gets a draw of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from natix.engines.base import Completion, Engine, SamplingSpec
from natix.scaling.strategy import Strategy, StrategyResult

__all__ = ["DrawPlan", "SharedRun", "plan_draws", "decide_all", "run_shared"]


@dataclass(frozen=True)
class DrawPlan:
    """One engine call: ``spec`` (``n`` = the largest budget in the group) serves ``strategies``."""

    spec: SamplingSpec
    strategies: tuple[Strategy, ...]


@dataclass(frozen=True)
class SharedRun:
    """``draws[i][p]``: plan ``i``'s completions for prompt ``p``; ``results[label][p]``:
    the strategy labelled ``label`` (its :meth:`~Strategy.spec`) on prompt ``p``."""

    plans: tuple[DrawPlan, ...]
    draws: tuple[list[list[Completion]], ...]
    results: Mapping[str, list[StrategyResult]]


def plan_draws(strategies: Sequence[Strategy], base: SamplingSpec) -> list[DrawPlan]:
    """Group strategies by what they sample (their spec minus ``n`` and ``logprobs``), in order
    of first appearance. Each group's draw asks for logprobs if any member needs them."""
    labels = [s.spec() for s in strategies]
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise ValueError(f"strategies must have distinct specs, repeated: {dupes}")
    groups: dict[SamplingSpec, list[tuple[Strategy, SamplingSpec]]] = {}
    for s in strategies:
        spec = s.sampling_spec(base)
        groups.setdefault(spec.replace(n=1, logprobs=True), []).append((s, spec))
    plans = []
    for key, members in groups.items():
        n = max(spec.n for _, spec in members)
        logprobs = any(spec.logprobs for _, spec in members)
        plans.append(DrawPlan(key.replace(n=n, logprobs=logprobs), tuple(s for s, _ in members)))
    return plans


def decide_all(
    strategies: Sequence[Strategy],
    completions: Sequence[Sequence[Completion]],
    prompts: Sequence[str] | None = None,
) -> dict[str, list[StrategyResult]]:
    """Every strategy on the same pre-drawn ``completions[p]`` (one list per prompt, at least
    each strategy's budget long). Pure: no engine involved."""
    if prompts is not None and len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but completions for {len(completions)}")
    out: dict[str, list[StrategyResult]] = {}
    for s in strategies:
        out[s.spec()] = [
            s.decide(c, None if prompts is None else prompts[p]) for p, c in enumerate(completions)
        ]
    return out


def run_shared(
    engine: Engine, prompts: Sequence[str], base: SamplingSpec, strategies: Sequence[Strategy]
) -> SharedRun:
    """Draw each plan once from ``engine`` and let every strategy decide on its share."""
    plans = plan_draws(strategies, base)
    draws: list[list[list[Completion]]] = []
    results: dict[str, list[StrategyResult]] = {}
    for plan in plans:
        drawn = engine.generate(list(prompts), plan.spec)
        if len(drawn) != len(prompts):
            raise RuntimeError(f"engine returned {len(drawn)} results for {len(prompts)} prompts")
        draws.append(drawn)
        results.update(decide_all(plan.strategies, drawn, prompts))
    # Report in the caller's order, not the plans' order.
    ordered = {s.spec(): results[s.spec()] for s in strategies}
    return SharedRun(tuple(plans), tuple(draws), ordered)
