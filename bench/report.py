"""Render a benchmark's Markdown report from its JSONL rows, and nothing else.

Because the report is a pure function of ``cells.jsonl``, it can always be rebuilt
(``natix-bench report DIR``) and two runs can be compared row by row.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from natix.bench.stats import paired_difference


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    if x is None or x != x:  # NaN
        return "–"
    return f"{1e3 * x:.0f}"


def _group_key(r: dict[str, Any]) -> tuple[str, str, str]:
    return (r["variant"], r["engine"], r["kv_press"])


def vs_greedy(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float, float] | None]:
    """Paired accuracy difference of each cell against greedy on the same variant/engine/press
    and the same items: key -> (mean, lo, hi), or None where no greedy cell matches."""
    greedy = {_group_key(r): r for r in rows if r["strategy"] == "greedy"}
    out: dict[str, tuple[float, float, float] | None] = {}
    for r in rows:
        g = greedy.get(_group_key(r))
        if g is None or r is g or g["per_item"]["ids"] != r["per_item"]["ids"]:
            out[r["key"]] = None
            continue
        out[r["key"]] = paired_difference(r["per_item"]["correct"], g["per_item"]["correct"])
    return out


def _diff(diff: tuple[float, float, float]) -> str:
    mean, lo, hi = diff
    return f"{'+' if mean >= 0 else '−'}{abs(100 * mean):.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def verdict(diff: tuple[float, float, float] | None) -> str:
    if diff is None:
        return ""
    _, lo, hi = diff
    tag = " **beats greedy**" if lo > 0 else (" **worse than greedy**" if hi < 0 else "")
    return _diff(diff) + tag


def render(rows: Iterable[dict[str, Any]], title: str = "natix-bench report") -> str:
    rows = list(rows)
    if not rows:
        return f"# {title}\n\nNo cells yet.\n"
    diffs = vs_greedy(rows)
    first = rows[0]
    env = first.get("env", {})
    lines = [f"# {title}", ""]
    lines.append(
        f"Task **{first['task']}**, {first['n_items']} evaluation items (disjoint from the demo adapter's "
        f"training data by construction), model `{first['settings']['model']}`, seed {first['settings']['seed']}."
    )
    dev = env.get("gpu") or env.get("cpu") or env.get("device")
    lines.append(
        f"Environment: {env.get('device')} ({dev}), {env.get('cpu_count')} CPUs, torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}, git `{env.get('git_sha')}`."
    )
    lines += [
        "",
        "Accuracy has a 95% Wilson interval. *vs greedy* is the paired difference on the same items "
        "(percentage points, 95% interval); **beats greedy** means the interval excludes zero. "
        "*coverage* is pass@k for the strategy's budget k, estimated without bias from every sample "
        "drawn (Chen et al. 2021): what a perfect selector could reach. Sampled strategies share one "
        "draw per temperature (maj@8 and best-of-8 read its first 8 samples, adaptive reads on until "
        "it stops), so they are compared on the same samples; latency and tokens/s are those of that "
        "draw, and a strategy's own cost is its samples and tokens spent.",
        "",
    ]
    by_group: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_group[_group_key(r)].append(r)
    header = ("| strategy | T | accuracy [95% CI] | vs greedy (pp) | coverage | samples | tokens "
              "| latency p50 / p90 (ms) | TTFT p50 (ms) | decode (ms/tok) | tok/s |")
    sep = "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"
    for (variant, engine, kv), group in by_group.items():
        adapter = group[0].get("adapter")
        genv = group[0].get("env", {})
        other = [f"{k} {genv.get(k)}" for k in ("torch", "transformers", "kvpress") if genv.get(k) != env.get(k)]
        lines.append(f"## {variant} — engine `{engine}`, KV press `{kv}`" + (f", adapter `{adapter}`" if adapter else "")
                     + (f" (ran with {', '.join(other)})" if other else ""))
        lines += ["", header, sep]
        for r in sorted(group, key=lambda r: (r["temperature"], r["budget"], r["strategy"])):
            lo, hi = r["ci95"]
            samples = f"{r['samples_spent_mean']:.1f}/{r['budget']}"
            lines.append(
                f"| {r['strategy']} | {r['temperature']:g} | {_pct(r['accuracy'])} [{_pct(lo)}, {_pct(hi)}] "
                f"| {verdict(diffs.get(r['key']))} | {_pct(r['coverage'])} @{r['coverage_k']} | {samples} "
                f"| {r['tokens_spent_mean']:.0f} | {_ms(r['latency_s']['p50'])} / {_ms(r['latency_s']['p90'])} "
                f"| {_ms(r['ttft_s_p50'])} | {r['decode_ms_per_token_p50']:.1f} "
                f"| {r['draw']['tokens_per_s']:.0f} |"
            )
        lines.append("")
    winners = [r for r in rows if (d := diffs.get(r["key"])) and d[1] > 0]
    lines.append("## Summary")
    lines.append("")
    if winners:
        for r in winners:
            lines.append(f"- `{r['variant']}` {r['strategy']} (T={r['temperature']:g}) beats greedy by "
                         f"{_diff(diffs[r['key']])} pp (accuracy {_pct(r['accuracy'])}, coverage "
                         f"{_pct(r['coverage'])} @{r['coverage_k']}, {r['samples_spent_mean']:.1f} samples).")
    else:
        lines.append("- No strategy beats greedy beyond its 95% interval in this run.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: Iterable[dict[str, Any]], title: str | None = None) -> Path:
    from natix.quant.artifact import write_text_atomic

    path = out / "report.md"
    write_text_atomic(path, render(rows, title or f"natix-bench: {out.name}"))
    return path
