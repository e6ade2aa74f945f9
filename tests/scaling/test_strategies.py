"""Strategies (greedy, majority / weighted vote, best-of-N, adaptive), the spec registry and
draw-once-evaluate-many, against a tiny deterministic fake Engine."""

from __future__ import annotations

import itertools
import math
import random
import re
from typing import ClassVar, Sequence

import pytest

from natix.engines.base import Completion, Engine, EngineConfig, SamplingSpec
from natix.scaling.adaptive import _STOP_RULES
from natix.scaling import (
    AdaptiveVote,
    BestOfN,
    Greedy,
    MajorityVote,
    StrategyArgs,
    YesNoExtractor,
    available_strategies,
    beta_leader_probability,
    decide_all,
    parse_strategy,
    plan_draws,
    register_strategy,
    run_shared,
    tally,
)


def C(text: str, *logprobs: float) -> Completion:
    """A canned completion; one token of logprob -0.1 unless given."""
    lps = logprobs or (-0.1,)
    return Completion(text, tuple(range(len(lps))), tuple(lps), "stop")


def texts(*answers: str | None) -> list[Completion]:
    return [C("no idea" if a is None else f"The answer is {a}.") for a in answers]


class FakeEngine:
    """Serves canned samples per prompt in order (a cursor per prompt, so successive calls
    draw fresh samples, as a seeded engine would); temperature 0 serves the greedy text."""

    name: ClassVar[str] = "fake"

    def __init__(self, samples: dict[str, list[Completion]], greedy: dict[str, Completion] | None = None):
        self.samples = samples
        self.greedy = greedy or {}
        self.cursor = dict.fromkeys(samples, 0)
        self.calls: list[tuple[tuple[str, ...], SamplingSpec]] = []

    def load(self, cfg: EngineConfig) -> None:
        pass

    def generate(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[Completion]]:
        self.calls.append((tuple(prompts), spec))
        out = []
        for p in prompts:
            if spec.greedy:
                out.append([self.greedy[p]] * spec.n)
                continue
            start = self.cursor[p]
            if start + spec.n > len(self.samples[p]):
                raise RuntimeError(f"fake engine ran out of samples for {p!r}")
            out.append(self.samples[p][start : start + spec.n])
            self.cursor[p] += spec.n
        return out

    def close(self) -> None:
        pass


T07 = SamplingSpec(temperature=0.7, seed=100)


def test_fake_engine_is_an_engine() -> None:
    assert isinstance(FakeEngine({}), Engine)


# --- majority vote ---------------------------------------------------------------------------


def test_majority_normalises_and_reports_evidence() -> None:
    comps = [C("5"), C("5.0"), C("$5.00"), C("so 7"), C("#### 7"), C("nothing")]
    r = MajorityVote(n=6).decide(comps)
    assert r.answer == "5"
    assert dict(r.votes) == {"5": 3.0, "7": 2.0}
    assert r.answers == ("5", "5", "5", "7", "7", None)
    assert r.confidence == pytest.approx(3 / 6)  # abstentions count in the denominator
    assert r.completion is comps[0]
    assert (r.samples_spent, r.budget, r.samples_saved, r.stopped_early) == (6, 6, 0, False)
    assert r.strategy == "maj@6"
    row = r.as_dict()
    assert row["answer"] == "5" and row["samples_saved"] == 0 and "completion" not in row


@pytest.mark.parametrize(
    "answers, winner",
    [
        (["7", "5", "5", "7"], "7"),  # tie: earliest first appearance wins
        (["5", "7", "7", "5"], "5"),
        ([None, "3", "2", "2", "3"], "3"),
        (["1", "2", "3"], "1"),
        (["1", "2", "2"], "2"),
    ],
)
def test_tie_break_is_earliest_first_appearance(answers: list[str | None], winner: str) -> None:
    assert MajorityVote(n=len(answers)).decide(texts(*answers)).answer == winner
    assert tally(answers).winner == winner


def test_no_answers_at_all() -> None:
    r = MajorityVote(n=3).decide(texts(None, None, None))
    assert r.answer is None and r.confidence is None and r.completion is None and not r.votes


def test_decide_uses_a_prefix_and_refuses_too_few() -> None:
    comps = texts("1", "2", "2", "2")
    assert MajorityVote(n=1).decide(comps).answer == "1"
    assert MajorityVote(n=4).decide(comps).answer == "2"
    with pytest.raises(ValueError, match="needs 5 completions"):
        MajorityVote(n=5).decide(comps)


def test_yes_no_share_is_a_probability_score() -> None:
    r = MajorityVote(n=4, extractor="yesno").decide([C("Yes."), C("yes"), C("No,"), C("hmm")])
    assert r.answer == "yes" and r.share("yes") == 0.5 and r.share("no") == 0.25
    assert r.share("maybe") == 0.0
    r2 = MajorityVote(n=4, extractor=YesNoExtractor()).decide([C("No")] * 4)
    assert r2.share("yes") == 0.0 and r2.confidence == 1.0


def test_weighted_vote_by_mean_and_sum_logprob() -> None:
    short_unsure = C("3", -0.5)  # one token, p = 0.61
    long_sure = C("9", *([-0.1] * 10))  # ten tokens, mean -0.1 but sum -1.0
    comps = [short_unsure, long_sure]
    assert MajorityVote(n=2).decide(comps).answer == "3"  # tie -> first appearance
    by_mean = MajorityVote(n=2, weighting="mean_logprob").decide(comps)
    assert by_mean.answer == "9"
    assert by_mean.scores == pytest.approx((math.exp(-0.5), math.exp(-0.1)))
    assert by_mean.confidence == pytest.approx(math.exp(-0.1) / (math.exp(-0.5) + math.exp(-0.1)))
    by_sum = MajorityVote(n=2, weighting="sum_logprob").decide(comps)
    assert by_sum.answer == "3"
    assert sum(by_sum.scores) == pytest.approx(1.0)
    assert by_sum.confidence == pytest.approx(math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1.0)))
    # weighting can overturn a count majority
    crowd = [C("1", -3.0), C("1", -3.0), C("2", -0.01)]
    assert MajorityVote(n=3).decide(crowd).answer == "1"
    assert MajorityVote(n=3, weighting="mean_logprob").decide(crowd).answer == "2"


def test_sum_logprob_weighting_does_not_underflow() -> None:
    comps = [C("1", *([-5.0] * 200)), C("2", *([-5.0] * 201))]  # sums -1000, -1005
    r = MajorityVote(n=2, weighting="sum_logprob").decide(comps)
    assert r.answer == "1" and r.confidence == pytest.approx(1 / (1 + math.exp(-5)))


def test_weighted_vote_needs_logprobs() -> None:
    bare = Completion("5", (1,), None, "stop")
    with pytest.raises(ValueError, match="without logprobs"):
        MajorityVote(n=1, weighting="mean_logprob").decide([bare])
    assert MajorityVote(n=1).decide([bare]).answer == "5"
    assert MajorityVote(n=2, weighting="sum_logprob").sampling_spec(T07.replace(logprobs=False)).logprobs


def test_validation() -> None:
    with pytest.raises(ValueError):
        MajorityVote(n=0)
    with pytest.raises(ValueError, match="unknown weighting"):
        MajorityVote(weighting="loud")
    with pytest.raises(ValueError):
        BestOfN(n=0)
    with pytest.raises(ValueError, match="needs a verifier"):
        BestOfN(scorer="verifier")
    with pytest.raises(ValueError):
        BestOfN(tie_break="random")
    with pytest.raises(ValueError):
        AdaptiveVote(n_max=0)
    with pytest.raises(ValueError):
        AdaptiveVote(threshold=1.0)
    with pytest.raises(ValueError):
        AdaptiveVote(rule="vibes")
    with pytest.raises(ValueError):
        AdaptiveVote(n_max=4, min_samples=5)
    with pytest.raises(ValueError):
        AdaptiveVote(round_size=0)
    with pytest.raises(Exception):  # frozen
        MajorityVote().n = 3  # type: ignore[misc]


def test_sampling_spec() -> None:
    assert MajorityVote(n=8).sampling_spec(T07) == T07.replace(n=8)
    with pytest.raises(ValueError, match="greedy"):
        MajorityVote(n=8).sampling_spec(SamplingSpec())
    assert MajorityVote(n=1).sampling_spec(SamplingSpec()).n == 1
    g = Greedy().sampling_spec(T07.replace(n=4))
    assert g.n == 1 and g.greedy


# --- greedy ----------------------------------------------------------------------------------


def test_greedy_runs_at_temperature_zero() -> None:
    eng = FakeEngine({"q": texts("1", "1")}, greedy={"q": C("The answer is 4.")})
    (r,) = Greedy().run(eng, ["q"], T07)
    assert r.answer == "4" and r.confidence == 1.0 and r.samples_spent == 1
    assert eng.calls[0][1].greedy and eng.calls[0][1].n == 1
    assert Greedy().decide([C("nothing")]).confidence is None


# --- best-of-N -------------------------------------------------------------------------------


def arithmetic_verifier(prompt: str, text: str) -> float:
    """Reward 1.0 if every 'a + b = c' step in the text is right (DESIGN.md's task verifier)."""
    steps = [tuple(map(int, m)) for m in re.findall(r"(\d+) \+ (\d+) = (\d+)", text)]
    return float(bool(steps) and all(a + b == c for a, b, c in steps))


def test_best_of_n_verifier_beats_logprob() -> None:
    comps = [
        C("2 + 2 = 5. The answer is 5.", -0.05),  # confident and wrong
        C("2 + 2 = 4. The answer is 4.", -0.9),
        C("2 + 2 = 5. The answer is 5.", -0.1),
    ]
    assert MajorityVote(n=3).decide(comps).answer == "5"
    assert BestOfN(n=3, scorer="mean_logprob").decide(comps).answer == "5"
    seen: list[str] = []

    def verifier(prompt: str, text: str) -> float:
        seen.append(prompt)
        return arithmetic_verifier(prompt, text)

    r = BestOfN(n=3, scorer="verifier", verifier=verifier).decide(comps, prompt="what is 2 + 2?")
    assert r.answer == "4" and r.completion is comps[1]
    assert r.scores == (0.0, 1.0, 0.0) and r.extra["best_score"] == 1.0 and r.extra["best_index"] == 1
    assert r.confidence == pytest.approx(1 / 3)  # agreement with the chosen answer
    assert seen == ["what is 2 + 2?"] * 3
    # a callable scorer is a verifier too
    assert BestOfN(n=3, scorer=arithmetic_verifier).decide(comps, prompt="p").answer == "4"
    with pytest.raises(ValueError, match="needs the prompt"):
        BestOfN(n=3, scorer=arithmetic_verifier).decide(comps)


def test_best_of_n_sum_vs_mean() -> None:
    comps = [C("1", -0.5), C("2", *([-0.1] * 10))]
    assert BestOfN(n=2, scorer="mean_logprob").decide(comps).answer == "2"
    assert BestOfN(n=2, scorer="logprob").decide(comps).answer == "2"
    assert BestOfN(n=2, scorer="sum_logprob").decide(comps).answer == "1"


def test_best_of_n_ties_and_unanswered() -> None:
    always = lambda p, t: 1.0  # noqa: E731
    comps = texts("3", "8", "8", None)
    assert BestOfN(n=4, scorer=always).decide(comps, "p").answer == "3"  # earliest tied
    assert BestOfN(n=4, scorer=always, tie_break="vote").decide(comps, "p").answer == "8"
    # a higher-scored sample without an answer is passed over ...
    unanswered_best = [C("no idea", -0.01), C("The answer is 2.", -1.0)]
    assert BestOfN(n=2).decide(unanswered_best).answer == "2"
    r = BestOfN(n=2, require_answer=False).decide(unanswered_best)
    assert r.answer is None and r.confidence is None
    # ... unless nobody answered
    assert BestOfN(n=2).decide(texts(None, None)).answer is None
    with pytest.raises(ValueError, match="NaN"):
        BestOfN(n=1, scorer=lambda p, t: float("nan")).decide(texts("1"), "p")


# --- adaptive --------------------------------------------------------------------------------


def test_beta_leader_probability() -> None:
    assert beta_leader_probability(0, 0) == 0.5
    assert beta_leader_probability(3, 0) == 15 / 16
    assert beta_leader_probability(4, 0) == 31 / 32
    for v1, v2 in [(1, 0), (5, 3), (2, 7), (10, 10)]:
        assert beta_leader_probability(v1, v2) + beta_leader_probability(v2, v1) == pytest.approx(1.0)
        # numerical integration of the Beta(v1 + 1, v2 + 1) density over (1/2, 1)
        steps = 20000
        xs = [0.5 + (i + 0.5) * 0.5 / steps for i in range(steps)]
        norm = math.factorial(v1 + v2 + 1) / (math.factorial(v1) * math.factorial(v2))
        integral = sum(norm * x**v1 * (1 - x) ** v2 for x in xs) * 0.5 / steps
        assert beta_leader_probability(v1, v2) == pytest.approx(integral, rel=1e-6)


def test_adaptive_lead_stops_when_locked() -> None:
    comps = texts(*["4"] * 16)
    r = AdaptiveVote(n_max=16, rule="lead", round_size=2).decide(comps)
    # 8 votes with 8 left: a rival could only tie, and would lose the tie (appeared later)
    assert (r.answer, r.samples_spent, r.samples_saved, r.stopped_early) == ("4", 8, 8, True)
    assert r.confidence == 1.0 and r.extra["rule"] == "lead"
    r1 = AdaptiveVote(n_max=16, round_size=1).decide(comps)
    assert r1.samples_spent == 8
    r3 = AdaptiveVote(n_max=16, round_size=3).decide(comps)
    assert r3.samples_spent == 9  # checkpoints 3, 6, 9, ...


def test_adaptive_beta_stops_earlier() -> None:
    r = AdaptiveVote(n_max=16, rule="beta", threshold=0.95, round_size=1).decide(texts(*["4"] * 16))
    assert r.samples_spent == 4 and r.extra["stop_score"] == 31 / 32
    split = texts(*["1", "2"] * 8)
    r2 = AdaptiveVote(n_max=16, rule="beta", round_size=1).decide(split)
    assert r2.samples_spent == 16 and not r2.stopped_early and r2.answer == "1"


def test_adaptive_checkpoints() -> None:
    assert AdaptiveVote(n_max=16, round_size=4).checkpoints() == [4, 8, 12, 16]
    assert AdaptiveVote(n_max=10, round_size=4, min_samples=3).checkpoints() == [4, 8, 10]
    assert AdaptiveVote(n_max=10, round_size=2, min_samples=5).checkpoints() == [5, 7, 9, 10]
    assert AdaptiveVote(n_max=1).checkpoints() == [1]


def test_adaptive_decide_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="not enough"):
        AdaptiveVote(n_max=16, round_size=2).decide(texts("1", "2", "3"))
    # extra samples past n_max are ignored
    assert AdaptiveVote(n_max=2, round_size=1).decide(texts("1", "2", "2", "2")).answer == "1"


def _winner_after(prefix: list[str | None], rest: Sequence[str | None]) -> str | None:
    return tally([*prefix, *rest]).winner


def test_lead_rule_is_exact_against_brute_force() -> None:
    """Locked (per the rule) <=> every way of filling the remaining budget keeps the winner."""
    rng = random.Random(0)
    for _ in range(300):
        budget = rng.randint(1, 6)
        spent = rng.randint(0, budget)
        prefix = [rng.choice(["a", "b", "c", None]) for _ in range(spent)]
        locked = _STOP_RULES["lead"](prefix, budget) == 1.0
        now = tally(prefix).winner
        alphabet = ["a", "b", "c", "new", None]
        outcomes = {
            _winner_after(prefix, rest) for rest in itertools.product(alphabet, repeat=budget - spent)
        }
        assert locked == (outcomes == {now} and now is not None or spent == budget), (prefix, budget)


def test_adaptive_lead_never_changes_the_answer() -> None:
    rng = random.Random(1)
    for _ in range(400):
        n_max = rng.randint(1, 16)
        seq = [rng.choice(["1", "2", "3", None, "1"]) for _ in range(n_max)]
        comps = texts(*seq)
        full = MajorityVote(n=n_max).decide(comps)
        for round_size in (1, 2, 3):
            r = AdaptiveVote(n_max=n_max, round_size=round_size).decide(comps)
            assert r.answer == full.answer, (seq, round_size)
            assert r.samples_spent <= n_max
            assert r.stopped_early == (r.samples_spent < n_max)


def test_adaptive_saves_on_easy_prompts() -> None:
    rng = random.Random(2)
    saved = 0
    for _ in range(50):
        seq = ["7" if rng.random() < 0.9 else "8" for _ in range(16)]
        saved += AdaptiveVote(n_max=16, round_size=2).decide(texts(*seq)).samples_saved
    assert saved > 50 * 4  # a 90%-consistent model saves well over a quarter of the budget


def test_adaptive_live_run_matches_replay() -> None:
    easy = texts(*["3"] * 16)
    hard = texts(*["1", "2"] * 8)
    eng = FakeEngine({"easy": easy, "hard": hard})
    strat = AdaptiveVote(n_max=16, round_size=4)
    r_easy, r_hard = strat.run(eng, ["easy", "hard"], T07)
    assert r_easy.samples_spent == 8 and r_hard.samples_spent == 16
    assert r_easy.answer == "3" and r_hard.answer == "1"
    # rounds of 4; the easy prompt leaves after its 2nd round; fresh seeds per round
    assert [(c[0], c[1].n, c[1].seed) for c in eng.calls] == [
        (("easy", "hard"), 4, 100),
        (("easy", "hard"), 4, 101),
        (("hard",), 4, 102),
        (("hard",), 4, 103),
    ]
    assert strat.decide(easy) == r_easy and strat.decide(hard) == r_hard
    with pytest.raises(ValueError, match="greedy"):
        strat.run(eng, ["easy"], SamplingSpec())


# --- registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, cls, fields",
    [
        ("greedy", Greedy, {}),
        ("maj@8", MajorityVote, {"n": 8, "weighting": "uniform"}),
        ("MAJ@3", MajorityVote, {"n": 3}),
        ("wmaj@8", MajorityVote, {"n": 8, "weighting": "mean_logprob"}),
        ("wmaj@4:sum_logprob", MajorityVote, {"n": 4, "weighting": "sum_logprob"}),
        ("maj@4:weighting=sum_logprob", MajorityVote, {"weighting": "sum_logprob"}),
        ("bo8:logprob", BestOfN, {"n": 8, "scorer": "logprob"}),
        ("bo8:verifier", BestOfN, {"n": 8, "scorer": "verifier"}),
        ("bo16:verifier,tie_break=vote", BestOfN, {"n": 16, "tie_break": "vote"}),
        ("bo4:sum_logprob,require_answer=false", BestOfN, {"require_answer": False}),
        ("adaptive@16", AdaptiveVote, {"n_max": 16, "rule": "lead", "round_size": 2}),
        (
            "adaptive@12:beta,threshold=0.9,round=4,min=3",
            AdaptiveVote,
            {"n_max": 12, "rule": "beta", "threshold": 0.9, "round_size": 4, "min_samples": 3},
        ),
    ],
)
def test_parse_strategy(spec: str, cls: type, fields: dict[str, object]) -> None:
    s = parse_strategy(spec, extractor="yesno", verifier=arithmetic_verifier)
    assert isinstance(s, cls)
    for k, v in fields.items():
        assert getattr(s, k) == v
    assert isinstance(s.extractor, YesNoExtractor)  # type: ignore[attr-defined]
    again = parse_strategy(s.spec(), extractor="yesno", verifier=arithmetic_verifier)
    assert again == s and again.spec() == s.spec() == str(s)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("vibes@3", "unknown strategy"),
        ("maj@", "bad strategy spec"),
        ("maj@8:", "empty option"),
        ("maj@8:colour=red", "bad options"),
        ("maj@8:uniform,sum_logprob", "unexpected option"),
        ("maj@8:mean_logprob,weighting=uniform", "given twice"),
        ("maj@0", "n must be >= 1"),
        ("greedy@4", "exactly one"),
        ("bo8:verifier", "needs a verifier"),
        ("adaptive@16:beta,threshold=2", "threshold"),
        ("maj@8:a=1,a=2", "repeated"),
    ],
)
def test_parse_strategy_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_strategy(spec)


def test_register_custom_strategy() -> None:
    name = "firstsample"
    if name not in available_strategies():

        @register_strategy(name)
        def _first(args: StrategyArgs) -> MajorityVote:
            return MajorityVote(n=1, extractor=args.extractor)

    assert parse_strategy(name).spec() == "maj@1"
    with pytest.raises(ValueError, match="already registered"):
        register_strategy(name)(lambda a: MajorityVote())
    with pytest.raises(ValueError):
        register_strategy("Bad-Name")
    with pytest.raises(ValueError):
        register_strategy()
    assert {"greedy", "maj", "wmaj", "bo", "adaptive"} <= set(available_strategies())


# --- draw once, evaluate many ----------------------------------------------------------------


def test_plan_draws_shares_one_draw() -> None:
    strategies = [parse_strategy(s, verifier=arithmetic_verifier) for s in ("greedy", "maj@8", "bo8:verifier", "adaptive@16", "wmaj@4")]
    plans = plan_draws(strategies, T07.replace(logprobs=False))
    assert len(plans) == 2
    greedy_plan, sampled = plans
    assert greedy_plan.spec.greedy and greedy_plan.spec.n == 1
    assert sampled.spec.n == 16 and sampled.spec.temperature == 0.7 and sampled.spec.logprobs
    assert [s.spec() for s in sampled.strategies] == ["maj@8", "bo8:verifier", "adaptive@16:lead,round=2,min=1", "wmaj@4:mean_logprob"]
    with pytest.raises(ValueError, match="distinct"):
        plan_draws([MajorityVote(n=8), parse_strategy("maj@8")], T07)


def test_run_shared_draws_once_and_matches_separate_decisions() -> None:
    rng = random.Random(3)
    prompts = [f"q{i}" for i in range(5)]
    pool = {p: [C(f"{a} + {a} = {2 * a + rng.choice([0, 0, 1])}. The answer is {2 * a}.", -rng.random())
                for a in (rng.choice([1, 2, 3]) for _ in range(16))] for p in prompts}
    eng = FakeEngine(pool, greedy={p: C("The answer is 2.") for p in prompts})
    strategies = [parse_strategy(s, verifier=arithmetic_verifier) for s in ("greedy", "maj@8", "bo8:verifier", "adaptive@16", "wmaj@8")]
    run = run_shared(eng, prompts, T07, strategies)
    assert len(eng.calls) == 2  # one greedy draw, one shared n=16 draw
    assert list(run.results) == [s.spec() for s in strategies]
    drawn = run.draws[1]
    assert [len(d) for d in drawn] == [16] * 5
    for s in strategies[1:]:
        assert run.results[s.spec()] == decide_all([s], drawn, prompts)[s.spec()]
    for p, comps in enumerate(drawn):
        assert run.results["maj@8"][p] == MajorityVote(n=8).decide(comps[:8])
        assert run.results["maj@8"][p].samples_spent == 8
        assert run.results["greedy"][p].answer == "2"
    with pytest.raises(ValueError):
        decide_all(strategies, drawn, prompts[:2])
