"""Render a benchmark's Markdown report from its JSONL rows (and the run's matrix.json), nothing else.

Because the report is a pure function of ``cells.jsonl``, it can always be rebuilt
(``natix-bench report DIR``) and two runs can be compared row by row (``natix-bench compare``).
The tables are built once as data (:func:`tables`) and rendered here as Markdown and by
:mod:`natix.bench.html_report` as HTML. Rows keep the matrix's order; durations carry units.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from natix.bench.stats import paired_difference


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def dur(s: float | None) -> str:
    """A duration with its unit: ``840 ms``, ``4.2 s``, ``7m42s``, ``1h05m``."""
    if s is None or s != s:
        return "–"
    if s < 1:
        return f"{1e3 * s:.0f} ms" if s >= 0.01 else f"{1e3 * s:.1f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _num(x: float | None, fmt: str = ".0f") -> str:
    return "–" if x is None else format(x, fmt)


def ok_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status", "ok") == "ok"]


def _scheme(r: dict[str, Any]) -> str:
    """The scheme's name; a model given as an artifact (``--model fp8/``) shows as ``fp8 (artifact)``."""
    s, w = r.get("scheme", "none"), r.get("weights")
    return f"{w} (artifact)" if s == "none" and w not in (None, "dense") else s


def _draw_key(r: dict[str, Any]) -> tuple:
    return (r["variant"], _scheme(r), r["engine"], r.get("kv", r.get("kv_press", "none")), r.get("batch_size"),
            r.get("max_tokens"), r.get("few_shot", 0))


def vs_greedy(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float, float] | None]:
    """Paired accuracy difference of each cell against greedy in the same draw group, on the same
    items: key -> (mean, lo, hi), or None where no greedy cell matches."""
    greedy = {_draw_key(r): r for r in ok_rows(rows) if r["strategy"] == "greedy"}
    out: dict[str, tuple[float, float, float] | None] = {}
    for r in ok_rows(rows):
        g = greedy.get(_draw_key(r))
        out[r["key"]] = _paired(r, g) if g is not None and g is not r else None
    return out


def baseline(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant, the reference cell: greedy on the first unquantized scheme (the matrix's
    order), its first engine and batch size, KV auto/none -- "the greedy bf16 cell"."""
    out: dict[str, dict[str, Any]] = {}
    for r in ok_rows(rows):
        if (r["strategy"] == "greedy" and r.get("scheme_kind", "none") in ("none", "bf16", "fp16", "fp32")
                and r.get("kv_effective", "none") == "none" and r["variant"] not in out):
            out[r["variant"]] = r
    return out


def vs_baseline(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float, float] | None]:
    base = baseline(rows)
    return {r["key"]: (_paired(r, base[r["variant"]]) if r["variant"] in base and base[r["variant"]] is not r else None)
            for r in ok_rows(rows)}


def _paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, float] | None:
    """a - b on the items both scored (same ids)."""
    bi = dict(zip(b["per_item"]["ids"], b["per_item"]["correct"]))
    pairs = [(c, bi[i]) for i, c in zip(a["per_item"]["ids"], a["per_item"]["correct"]) if i in bi]
    if not pairs:
        return None
    return paired_difference([x for x, _ in pairs], [y for _, y in pairs])


def diff(d: tuple[float, float, float] | None) -> str:
    if d is None:
        return ""
    mean, lo, hi = d
    tag = " **better**" if lo > 0 else (" **worse**" if hi < 0 else "")
    return f"{'+' if mean >= 0 else '−'}{abs(100 * mean):.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{tag}"


def per_second(r: dict[str, Any]) -> float | None:
    """Correct answers per device-second of the cell (the inverse of its cost per correct)."""
    c = (r.get("cost") or {}).get("device_s_per_correct")
    return 1 / c if c else None


def cell_name(r: dict[str, Any], multi: dict[str, bool]) -> str:
    """``fp8 × maj@8 on natix`` with only the axes that vary in this run."""
    parts = [_scheme(r) if multi.get("scheme") else None, r.get("label") or r["strategy"]]
    name = " × ".join(p for p in parts if p)
    extra = [f"on {r['engine']}" if multi.get("engine") else None,
             f"KV {r.get('kv_effective')}" if multi.get("kv") else None,
             f"batch {r.get('batch_size')}" if multi.get("batch_size") else None,
             f"{r.get('few_shot', 0)}-shot" if multi.get("few_shot") else None,
             f"T={r['temperature']:g}" if multi.get("temperature") and r["temperature"] else None,
             f"({r['variant']})" if multi.get("variant") else None]
    return " ".join([name, *[e for e in extra if e]])


def varying(rows: Sequence[dict[str, Any]]) -> dict[str, bool]:
    axes = {"scheme": _scheme, "engine": lambda r: r["engine"], "kv": lambda r: r.get("kv_effective"),
            "batch_size": lambda r: r.get("batch_size"), "few_shot": lambda r: r.get("few_shot", 0),
            "temperature": lambda r: r["temperature"] or None,
            "variant": lambda r: r["variant"]}
    return {a: len({f(r) for r in rows} - {None}) > 1 for a, f in axes.items()}


def answer(rows: Sequence[dict[str, Any]]) -> str:
    """The one-line answer: which cell gives the most correct answers per second, and which is
    the most accurate (with what it costs)."""
    ok = [r for r in ok_rows(rows) if per_second(r)]
    if not any(r.get("cost") for r in ok_rows(rows)):
        return "These rows carry no cost per correct answer (an earlier natix-bench wrote them)."
    if not ok:
        return "No cell answered any item correctly, so no cost per correct answer can be given."
    multi = varying(ok_rows(rows))
    fast = max(ok, key=lambda r: (per_second(r), r["accuracy"]))
    best = max(ok, key=lambda r: (r["accuracy"], per_second(r)))
    line = (f"Most correct answers per second here: **{cell_name(fast, multi)}** ({per_second(fast):.3g}/s, accuracy "
            f"{pct(fast['accuracy'])})")
    if best is fast:
        return line + "; it is also the most accurate cell."
    return (line + f"; the most accurate: **{cell_name(best, multi)}** ({pct(best['accuracy'])}, "
            f"{per_second(best):.3g}/s, {dur(best['cost']['device_s_per_correct'])} per correct answer).")


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def _kv(r: dict[str, Any]) -> str:
    kv, eff = r.get("kv", "none"), r.get("kv_effective", r.get("kv_press", "none"))
    return eff if kv in ("auto", eff) else f"{kv} ({eff})"


def tables(rows: Sequence[dict[str, Any]]) -> list[Table]:
    ok = ok_rows(rows)
    if not ok:
        return []
    g, b = vs_greedy(rows), vs_baseline(rows)
    bases = baseline(rows)
    out: list[Table] = []
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    for v in variants:
        vr = [r for r in ok if r["variant"] == v]
        adapter = vr[0].get("adapter")
        base = bases.get(v)
        base_name = f"{_scheme(base)} greedy on {base['engine']}" if base else None
        acc = Table(
            f"{v}" + (f" (adapter `{adapter}`)" if adapter else "") + ": accuracy and cost",
            ["scheme", "engine", "KV", "batch", "strategy", "T", "accuracy [95% CI]", "vs greedy (pp)",
             f"vs {base_name} (pp)" if base_name else "vs baseline (pp)", "coverage", "samples", "tokens/item",
             "tokens/correct", "time/correct"],
            [[_scheme(r), r["engine"], _kv(r), str(r.get("batch_size", "–")), r.get("label") or r["strategy"],
              f"{r['temperature']:g}", f"{pct(r['accuracy'])} [{pct(r['ci95'][0])}, {pct(r['ci95'][1])}]",
              diff(g.get(r["key"])), diff(b.get(r["key"])), f"{pct(r['coverage'])} @{r['coverage_k']}",
              f"{r['samples_spent_mean']:.1f}/{r['budget']}", f"{r['tokens_spent_mean']:.0f}",
              _num((r.get("cost") or {}).get("tokens_per_correct")),
              dur((r.get("cost") or {}).get("device_s_per_correct"))] for r in vr])
        out.append(acc)
        draws: dict[tuple, dict[str, Any]] = {}
        for r in vr:
            draws.setdefault((*_draw_key(r), r["temperature"]), r)
        out.append(Table(
            f"{v}: latency and throughput (per draw; the strategies of a draw share it)",
            ["scheme", "engine", "KV", "batch", "draw", "requests", "prompt tokens", "end-to-end p50 / p90 / p99",
             "TTFT p50 / p99",
             "TPOT p50", "ITL p50 / p99", "req/s", "tok/s", "KV capacity (tokens)", "peak GPU memory"],
            [[_scheme(r), r["engine"], _kv(r), str(r.get("batch_size", "–")),
              "greedy" if not r["temperature"] else f"T={r['temperature']:g}, n={r['draw']['n']}",
              str(r["draw"].get("requests", r["n_items"])), _num(r.get("prompt_tokens_mean")), " / ".join(dur(_p(r, "latency_s", q)) for q in ("p50", "p90", "p99")),
              " / ".join(dur(_p(r, "ttft_s", q)) for q in ("p50", "p99")), dur(_p(r, "tpot_s", "p50")),
              " / ".join(dur(_p(r, "itl_s", q)) for q in ("p50", "p99")) if r.get("itl_s") else "–",
              _num(r["draw"].get("requests_per_s"), ".2f"), _num(r["draw"].get("tokens_per_s")),
              _num((r.get("engine_info") or {}).get("kv_capacity_tokens"), ","),
              _mib(r.get("peak_gpu_bytes"))] for r in draws.values()],
            "ITL is measured where the engine streams tokens (natix); the hf engine reports TPOT per request."))
        cal = [r for r in vr if r.get("calibration")]
        if cal:
            out.append(Table(f"{v}: calibration of P(yes) (yes/no task)",
                             ["scheme", "engine", "strategy", "T", "accuracy", "Brier", "ECE (10 bins)"],
                             [[_scheme(r), r["engine"], r.get("label") or r["strategy"], f"{r['temperature']:g}",
                               pct(r["accuracy"]), f"{r['calibration']['brier']:.3f}", f"{r['calibration']['ece']:.3f}"]
                              for r in cal],
                             "P(yes) is the strategy's vote share of yes among its samples (greedy: 0 or 1); "
                             "Brier 0.25 is what always answering 0.5 scores."))
    return out


def _p(r: dict[str, Any], key: str, q: str) -> float | None:
    v = r.get(key)
    if isinstance(v, dict):
        return v.get(q)
    return v if q == "p50" else None  # rows written before percentiles were kept


def _mib(b: int | None) -> str:
    return "–" if not b else f"{b / 2**20:,.0f} MiB"


def exclusions(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(group or cell, reason) of every exclusion: a whole engine load once, a single cell by its key."""
    seen: dict[str, str] = {}
    for r in rows:
        if r.get("status") == "excluded":
            seen.setdefault(r["key"] if r.get("excluded") == "cell" else r["key"].rsplit("/T=", 1)[0], r["reason"])
    return list(seen.items())


def errors(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["key"], f"{r.get('error_type', 'error')}: {r.get('error', '')}") for r in rows if r.get("status") == "error"]


def intro(rows: Sequence[dict[str, Any]], matrix: dict[str, Any] | None) -> list[str]:
    first = (ok_rows(rows) or list(rows))[0]
    env = first.get("env", {})
    s = first["settings"]
    lines = [f"Task **{first['task']}**, {first.get('n_items', s.get('items'))} evaluation items, model "
             f"`{s['model']}`, seed {s['seed']}."]
    demo = any(r.get("adapter") == "demo" for r in rows)
    if demo and first["task"] == "chain_sum":
        lines.append("chain_sum's evaluation items are disjoint from the demo adapter's training data by construction "
                     "(a hash of the problem text decides the split).")
    if env:
        dev = env.get("gpu") or env.get("cpu") or env.get("device")
        lines.append(f"Environment: {env.get('device')} ({dev}), {env.get('cpu_count')} CPUs, torch {env.get('torch')}, "
                     f"transformers {env.get('transformers')}, natix {env.get('natix')}, git `{env.get('git_sha')}`.")
    shas = Counter(str(sha)[:12] for r in ok_rows(rows) if (sha := (r.get("env") or {}).get("git_sha")))
    if len(shas) > 1:  # a resumed run whose cells were measured at different commits
        lines.append("Cells measured at " + str(len(shas)) + " commits: "
                     + ", ".join(f"`{sha}` ({n} cells)" for sha, n in shas.items()) + ".")
    if matrix and matrix.get("command"):
        lines.append(f"Reproduce: `{matrix['command']}`")
    return lines


_EXPLAIN = (
    "Accuracy has a 95% Wilson interval. *vs greedy* is the paired difference against greedy in the same draw "
    "group and *vs baseline* against the variant's unquantized greedy cell, on the same items (percentage points, "
    "95% interval; **better**/**worse**: the interval excludes zero). *coverage* is pass@k for the strategy's "
    "budget k, estimated without bias from every sample drawn (Chen et al. 2021): what a perfect selector could "
    "reach. Sampled strategies share one draw per temperature, so they are compared on the same samples. "
    "*time/correct* is the draw's wall time attributed to the strategy by its share of the draw's tokens, divided "
    "by its correct items (device-seconds per correct answer; on CPU, wall seconds); *tokens/correct* is exact.")


def _md_table(t: Table) -> list[str]:
    out = [f"## {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
    if t.note:
        out += ["", t.note]
    return out + [""]


def canonical_specs(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, canonical spec) where the strategy was written in short form."""
    seen = {}
    for r in rows:
        if r.get("label") and r["label"] != r["strategy"]:
            seen[r["label"]] = r["strategy"]
    return list(seen.items())


def render(rows: Iterable[dict[str, Any]], title: str = "natix-bench report",
           matrix: dict[str, Any] | None = None) -> str:
    rows = list(rows)
    if not rows:
        return f"# {title}\n\nNo cells yet.\n"
    lines = [f"# {title}", "", *intro(rows, matrix), "", answer(rows), "", _EXPLAIN, ""]
    for t in tables(rows):
        lines += _md_table(t)
    specs = canonical_specs(rows)
    if specs:
        lines += ["Strategy specs in full: " + "; ".join(f"`{a}` = `{b}`" for a, b in specs) + ".", ""]
    ex = exclusions(rows)
    if ex:
        lines += ["## Cells that cannot exist", ""] + [f"- `{k}`: {why}" for k, why in ex] + [""]
    err = errors(rows)
    if err:
        lines += ["## Cells that failed (rerun the same command to retry them)", ""]
        lines += [f"- `{k}`: {why}" for k, why in err] + [""]
    return "\n".join(lines)


def summary(rows: Sequence[dict[str, Any]]) -> str:
    """The one-line answer and a compact table (a row per engine load, a column per strategy:
    accuracy and time per correct answer), in Markdown: what README's results section shows."""
    ok = ok_rows(rows)
    if not ok:
        return "No finished cells."
    labels = list(dict.fromkeys(r.get("label") or r["strategy"] for r in ok))
    loads = list(dict.fromkeys((r["variant"], _scheme(r), r["engine"], _kv(r), r.get("batch_size")) for r in ok))
    multi = varying(ok)
    head = (["variant"] if multi["variant"] else []) + ["scheme", "engine"] + (["KV"] if multi["kv"] else []) + \
        (["batch"] if multi["batch_size"] else []) + labels
    lines = [answer(rows), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, sch, eng, kv, b in loads:
        cells = {r.get("label") or r["strategy"]: r for r in ok
                 if (r["variant"], _scheme(r), r["engine"], _kv(r), r.get("batch_size")) == (v, sch, eng, kv, b)}
        vals = [f"{pct(c['accuracy'])} ({dur((c.get('cost') or {}).get('device_s_per_correct'))})" if c else "–"
                for c in (cells.get(x) for x in labels)]
        lines.append("| " + " | ".join(([v] if multi["variant"] else []) + [sch, eng] + ([kv] if multi["kv"] else [])
                                       + ([str(b)] if multi["batch_size"] else []) + vals) + " |")
    ex = exclusions(rows)
    if ex:
        lines += ["", "Not run: " + "; ".join(f"`{k}` ({why})" for k, why in ex) + "."]
    return "\n".join(lines)


def write_report(out: Path, rows: Iterable[dict[str, Any]], title: str | None = None,
                 matrix: dict[str, Any] | None = None, html: bool = True) -> Path:
    """Write ``report.md`` (and ``report.html``, with plots) into ``out``; returns the Markdown's path."""
    from natix.quant.artifact import write_text_atomic

    rows = list(rows)
    title = title or f"natix-bench: {out.name}"
    path = out / "report.md"
    write_text_atomic(path, render(rows, title, matrix))
    if html:
        from natix.bench.html_report import render_html

        write_text_atomic(out / "report.html", render_html(rows, title, matrix))
    return path
