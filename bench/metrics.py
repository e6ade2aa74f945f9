"""A cell's metrics from its draw and its strategy's decisions.

Accuracy (95% Wilson interval), coverage (pass@k, unbiased from every sample drawn), samples and
tokens the strategy spent, latency of the draw's requests (TTFT, TPOT, ITL where the engine
streams, end to end: p50/p90/p99), request and token throughput, and the cost per correct answer:
tokens per correct item (exact: the tokens of the samples the strategy read) and device-seconds per
correct item (the draw's wall time, attributed to the strategy by its share of the draw's tokens,
since strategies sharing a draw are measured once). For yes/no tasks also calibration: Brier score
and expected calibration error of the strategy's P(yes) (:func:`p_yes`).
"""

from __future__ import annotations

from typing import Any, Sequence

from natix.bench.stats import brier_score, expected_calibration_error, percentile, wilson_interval


def _dist(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "mean": sum(values) / len(values)}


def p_yes(result: Any) -> float:
    """The strategy's probability of "yes": the share of its consumed samples' vote weight that went
    to yes among those that answered yes or no (greedy: 1 or 0), 0.5 when none answered."""
    yes, no = result.votes.get("yes", 0.0), result.votes.get("no", 0.0)
    return yes / (yes + no) if yes + no > 0 else 0.5


def latency(draw: Any) -> dict[str, Any]:
    """What the draw's requests measured (shared by every strategy deciding on it)."""
    timings = [c[0].timing for c in draw.completions if c and c[0].timing]
    tokens = sum(x.num_tokens for comps in draw.completions for x in comps)
    n = len(draw.completions)
    wall = draw.wall_s
    return {
        "latency_s": _dist([t.total_s for t in timings]),
        "ttft_s": _dist([t.ttft_s for t in timings]),
        "tpot_s": _dist([t.decode_s_per_token for t in timings if t.decode_s_per_token > 0]),
        "itl_s": _dist(draw.itl_s) if draw.itl_s else None,
        "queue_s": _dist([t.queue_s for t in timings if t.queue_s is not None]) if any(
            t.queue_s is not None for t in timings) else None,
        "draw": {"n": len(draw.completions[0]) if draw.completions else 0, "requests": n, "wall_s": wall,
                 "tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else None,
                 "requests_per_s": n / wall if wall > 0 else None},
    }


def cell_metrics(task: Any, items: Sequence[Any], results: Sequence[Any], draw: Any) -> dict[str, Any]:
    from natix.scaling import pass_at_k

    correct = [task.is_correct(r.answer, it) for r, it in zip(results, items)]
    k = max(1, results[0].budget)
    cov = [pass_at_k(len(comps), c, min(k, len(comps))) for comps, c in zip(draw.completions, draw.correct)]
    spent = [r.samples_spent for r in results]
    # the tokens this strategy consumed: the samples it read, in order
    tokens = [sum(x.num_tokens for x in comps[: r.samples_spent]) for r, comps in zip(results, draw.completions)]
    draw_tokens = sum(x.num_tokens for comps in draw.completions for x in comps)
    n, right = len(items), sum(correct)
    lo, hi = wilson_interval(right, n)
    share = sum(tokens) / draw_tokens if draw_tokens else 1.0
    row: dict[str, Any] = {
        "n_items": n,
        "accuracy": right / n, "ci95": [lo, hi],
        "coverage": sum(cov) / n, "coverage_k": k,
        "samples_spent_mean": sum(spent) / n, "budget": k,
        "samples_saved_mean": k - sum(spent) / n,
        "tokens_spent_mean": sum(tokens) / n,
        "answered": sum(r.answer is not None for r in results) / n,
        "cost": {"tokens_per_correct": sum(tokens) / right if right else None,
                 "device_s": draw.wall_s * share,
                 "device_s_per_correct": draw.wall_s * share / right if right else None},
        "per_item": {"ids": [it.id for it in items], "correct": correct, "answers": [r.answer for r in results]},
    }
    if task.extractor == "yesno":
        probs = [p_yes(r) for r in results]
        gold = [task.gold_label(it) == "yes" for it in items]
        row["calibration"] = {"brier": brier_score(probs, gold), "ece": expected_calibration_error(probs, gold),
                              "bins": 10}
        row["per_item"]["p_yes"] = probs
    return row
