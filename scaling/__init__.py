"""natix.scaling: test-time compute - answer extraction, majority / weighted vote, best-of-N,
adaptive early stopping, pass@k - over any :class:`natix.engines.base.Engine`.

Pure Python (no torch at import). Typical use::

    from natix.scaling import parse_strategy, run_shared, coverage
    strategies = [parse_strategy(s, extractor="number", verifier=task.verify)
                  for s in ("greedy", "maj@8", "bo8:verifier", "adaptive@16")]
    run = run_shared(engine, prompts, SamplingSpec(temperature=0.7, max_tokens=256), strategies)
    run.results["maj@8"][i].answer
"""

from natix.scaling.adaptive import AdaptiveVote, available_stop_rules, beta_leader_probability, register_stop_rule
from natix.scaling.best_of_n import BestOfN, available_scorers, register_scorer, resolve_scorer
from natix.scaling.extract import (
    AnswerExtractor,
    CallableExtractor,
    ChoiceExtractor,
    Extractor,
    NumberExtractor,
    RegexExtractor,
    YesNoExtractor,
    available_extractors,
    canonical_number,
    extract_choice,
    extract_number,
    extract_yes_no,
    get_extractor,
    normalize_number,
    parse_number,
    register_extractor,
)
from natix.scaling.greedy import Greedy
from natix.scaling.passk import count_correct, coverage, mean_pass_at_k, pass_at_k
from natix.scaling.registry import StrategyArgs, available_strategies, parse_strategy, register_strategy
from natix.scaling.shared import DrawPlan, SharedRun, decide_all, plan_draws, run_shared
from natix.scaling.strategy import Strategy, StrategyResult
from natix.scaling.vote import MajorityVote, Tally, available_weightings, register_weighting, tally

__all__ = [
    "AdaptiveVote", "AnswerExtractor", "BestOfN", "CallableExtractor", "ChoiceExtractor", "DrawPlan",
    "Extractor", "Greedy", "MajorityVote", "NumberExtractor", "RegexExtractor", "SharedRun", "Strategy",
    "StrategyArgs", "StrategyResult", "Tally", "YesNoExtractor", "available_extractors",
    "available_scorers", "available_stop_rules", "available_strategies", "available_weightings",
    "beta_leader_probability", "canonical_number", "count_correct", "coverage", "decide_all",
    "extract_choice", "extract_number", "extract_yes_no",
    "get_extractor", "mean_pass_at_k", "normalize_number", "parse_number", "parse_strategy",
    "pass_at_k", "plan_draws", "register_extractor", "register_scorer", "register_stop_rule",
    "register_strategy", "register_weighting", "resolve_scorer", "run_shared", "tally",
]
