"""Render reports/engine.md from the JSONL that scripts/bench_engine.py and scripts/bench_peers.py wrote.

    python scripts/render_engine_report.py reports/engine.jsonl > reports/engine.md

One section per run label (``env.run``, one device call); a ratio never divides numbers of two runs.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import Any

GOAL_B1, GOAL_B64, GOAL_QSERVE, GOAL_MAJ = 400.0, 8000.0, 1.5, 1.3


def med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "—"
    return f"{x:,.{nd}f}" if isinstance(x, float) else str(x)


def mark(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def sch(r: dict) -> str:
    """The scheme label, marked where the row ran with async scheduling (the engine's CUDA default)."""
    return r["scheme"] + (" · async" if r.get("async_scheduling") else "")


def render_run(label: str, rows: list[dict]) -> list[str]:
    env = rows[0]["env"]
    cmds = sorted({r["env"].get("command", "") for r in rows})
    out = [f"## {env.get('gpu')} — run `{label}`", "",
           f"Card **{env.get('gpu')}**, driver {env.get('driver')}, torch {env.get('torch')}, triton {env.get('triton')}, "
           f"CUDA {env.get('cuda')}; git {env.get('git_sha')}; {min(r['env'].get('time', '') for r in rows)}. "
           f"Copy bandwidth measured in this run: **{f(next((r['env'].get('copy_gbps') for r in rows if r['env'].get('copy_gbps')), None), 0)} GB/s**.",
           "", "Commands (one device call, in this order): " + "; ".join(f"`{c}`" for c in cmds), ""]
    eng = [r for r in rows if r["kind"] == "engine" and "error" not in r]
    peers = [r for r in rows if r["kind"] == "peer" and "error" not in r]
    by = defaultdict(list)
    for r in eng:
        by[(sch(r), r["batch"])].append(r)
    if eng:
        gen, pl = eng[0]["gen"], eng[0]["prompt_len"]
        out += [f"### Decode: Llama-3-8B shape, random weights, {pl} prompt tokens, {gen} new tokens, greedy", "",
                "natix rows: medians over repetitions, every repetition with fresh prompts; W4A8 weights are "
                "round-to-nearest quantized random weights in the artifact layout; lm_head bf16 as in real artifacts. "
                "*decode tok/s* = tokens of decode steps / their time; *output tok/s* includes the prefill.", "",
                "| engine | scheme | B | decode tok/s | ms / step p50 | TTFT p50 / p99 ms | ITL p50 / p99 ms | output tok/s |",
                "|---|---|---|---|---|---|---|---|"]
        for (scheme, b), rs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            out.append(f"| natix | {scheme} | {b} | {f(med(rs, 'decode_tok_per_s'))} | {f(med(rs, 'decode_step_ms_p50'), 2)} | "
                       f"{f(med(rs, 'ttft_ms_p50'))} / {f(med(rs, 'ttft_ms_p99'))} | {f(med(rs, 'itl_ms_p50'), 2)} / "
                       f"{f(med(rs, 'itl_ms_p99'), 2)} | {f(med(rs, 'output_tok_per_s'))} |")
        for p in sorted(peers, key=lambda r: (r["batch"], r["peer"], r["scheme"])):
            step = p.get("decode_step_ms") or p.get("step_ms_incl_prefill")
            out.append(f"| {p['peer']} | {p['scheme']} | {p['batch']} | {f(p.get('decode_tok_per_s'))} | {f(step, 2)} | — | — | "
                       f"{f(p.get('output_tok_per_s'))} |")
        failed = [r for r in rows if r["kind"] == "peer" and "error" in r]
        if failed:
            out += ["", "Peers that did not run in this call: " + "; ".join(
                f"{r['peer']} B={r['batch']}: `{r['error'][:120]}`" for r in failed) + "."]
        notes = sorted({p["note"] for p in peers if p.get("note")})
        if notes:
            out += ["", "Peers: " + "; ".join(notes) + ". transformers' row times whole `generate` calls (prefill included), "
                    "so its *ms / step* is wall / new tokens."]
        out.append("")
    q = [r for r in rows if r["kind"] == "qserve" and "error" not in r]
    if q:
        out += [f"### Throughput at QServe's setting: 1024 in / {q[0]['gen']} out, as many sequences as a "
                f"{f(q[0]['kv_cache_gb'], 0)} GiB KV cache holds", "",
                "| scheme | KV tokens held | concurrent sequences | output tok/s (incl. prefill) | decode tok/s | × bf16 (output) | preemptions |",
                "|---|---|---|---|---|---|---|"]
        for r in q:
            base = next((x for x in q if x["scheme"] == "bf16" and sch(x) == sch(r).replace(r["scheme"], "bf16")), None)
            ratio = r["output_tok_per_s"] / base["output_tok_per_s"] if base else None
            out.append(f"| {sch(r)} | {r['kv_capacity_tokens']:,} | {r['max_running']} | {f(r['output_tok_per_s'])} | "
                       f"{f(r['decode_tok_per_s'])} | {f(ratio, 2)} | {r['preemptions']} |")
        out.append("")
    m = [r for r in rows if r["kind"] == "maj8" and "error" not in r]
    if m:
        out += ["### maj@8 of one 512-token prompt, 256 new tokens (n=8, T=0.7) vs greedy", "",
                "| scheme | greedy wall s | maj@8 wall s | ratio | KV pages used | bound: prompt + 8 × generated |",
                "|---|---|---|---|---|---|"]
        for r in m:
            out.append(f"| {r['scheme']} | {f(r['greedy']['wall_s'], 3)} | {f(r['maj8']['wall_s'], 3)} | "
                       f"{f(r['latency_ratio'], 3)} | {r['kv_pages_used']} | {r['kv_pages_bound_prompt_plus_8x_gen']} |")
        out.append("")
    pc = [r for r in rows if r["kind"] == "prefix_cache"]
    if pc:
        out += ["### Prefix caching: the same 1024-token prompt twice", "", "| scheme | TTFT cold ms | TTFT warm ms |",
                "|---|---|---|"] + [f"| {r['scheme']} | {f(r['ttft_ms_cold'])} | {f(r['ttft_ms_warm'])} |" for r in pc] + [""]
    prof = [r for r in rows if r["kind"] == "profile" and "error" not in r]
    if prof:
        out += ["### Where a decode step goes (torch.profiler over 20 graph replays)", "",
                "| scheme | B | step wall ms (profiled) | GPU kernel time µs / step | kernels / step | top kernels (µs / step) |",
                "|---|---|---|---|---|---|"]
        for r in prof:
            top = ", ".join(f"{t['kernel'].split('(')[0][:32]} {t['us_per_step']:.0f}" for t in r["top"][:6])
            out.append(f"| {sch(r)} | {r['batch']} | {f(r['step_wall_ms'], 2)} | {f(r['gpu_us_per_step'])} | "
                       f"{f(r['kernels_per_step'])} | {top} |")
        out.append("")
    cs = [r for r in rows if r["kind"] == "coldstart" and "error" not in r]
    if cs:
        out += ["### Cold start: a fresh process and Triton cache, the engine as natix-serve makes it (async on)", "",
                "*warm-up* is the engine option (`none`: kernels compile and graphs are captured by the first steps "
                "that need them). Requests: 16 new tokens each; *first* = the first requests of that shape, *again* = the same shape once more.", "",
                "| scheme | warm-up | load s (prefill JIT s + graphs s, count) | 1×1024 TTFT ms first / again | "
                "8×128 wall s first / again | 32×512 wall s first / again | memory reserved GB |",
                "|---|---|---|---|---|---|---|"]
        for r in cs:
            w = r.get("warmup_info") or {}
            parts = (f" ({f(w.get('prefill_s'))} + {f(w.get('graphs_s'))}, {w.get('graphs')})" if w else "")
            out.append(f"| {r['scheme']} | {r['warmup']} | {f(r['load_s'])}{parts} | "
                       f"{f(r['1x1024_first']['ttft_ms_p50'])} / {f(r['1x1024_again']['ttft_ms_p50'])} | "
                       f"{f(r['8x128_first']['wall_s'], 2)} / {f(r['8x128_again']['wall_s'], 2)} | "
                       f"{f(r['32x512_first']['wall_s'], 2)} / {f(r['32x512_again']['wall_s'], 2)} | "
                       f"{f(r['reserved_gb_after_load'])} |")
        out.append("")
    hc = [r for r in rows if r["kind"] == "host_cost" and "error" not in r]
    if hc:
        out += ["### Host cost per call outside CUDA graphs (µs; a loop of launches without syncs)", "",
                "| op | host µs / call | GPU µs / call |", "|---|---|---|"]
        out += [f"| {r['op']} | {f(r['host_us'])} | {f(r['gpu_us'])} |" for r in hc] + [""]
    # goals
    g = []
    w4 = "w4a8kv4-chan · async" if ("w4a8kv4-chan · async", 1) in by else "w4a8kv4-chan"
    b1 = med(by.get((w4, 1), []), "decode_tok_per_s")
    b64 = med(by.get((w4, 64), []), "output_tok_per_s")
    if b1 is not None:
        g.append(f"| B=1 decode ≥ {GOAL_B1:.0f} tok/s (w4a8kv4) | {f(b1)} | {mark(b1 >= GOAL_B1)} |")
    if b64 is not None:
        g.append(f"| B=64 ≥ {GOAL_B64:,.0f} tok/s, 128 in / 128 out, prefill included (w4a8kv4) | {f(b64)} | {mark(b64 >= GOAL_B64)} |")
    if q:
        asy = any(r.get("async_scheduling") for r in q)
        base = next((r for r in q if r["scheme"] == "bf16" and bool(r.get("async_scheduling")) == asy), None)
        w = next((r for r in q if r["scheme"] == "w4a8kv4-chan" and bool(r.get("async_scheduling")) == asy), None)
        if base and w:
            ratio = w["output_tok_per_s"] / base["output_tok_per_s"]
            cap = w["kv_capacity_tokens"] / base["kv_capacity_tokens"]
            g.append(f"| QServe setting: w4a8kv4 ≥ {GOAL_QSERVE}× bf16 | {ratio:.2f}× (batch {w['max_running']} vs "
                     f"{base['max_running']}) | {mark(ratio >= GOAL_QSERVE)} |")
            g.append(f"| KV4 holds ≥ 3.5× the tokens of bf16 in equal memory | {cap:.2f}× | {mark(cap >= 3.5)} |")
    wm = next((r for r in m if r["scheme"] == "w4a8kv4-chan"), None)
    if wm:
        g.append(f"| maj@8 latency ≤ {GOAL_MAJ}× greedy (w4a8kv4) | {wm['latency_ratio']:.3f}× | {mark(wm['latency_ratio'] <= GOAL_MAJ)} |")
        g.append(f"| maj@8 KV ≤ prompt + 8 × generated | {wm['kv_pages_used']} ≤ {wm['kv_pages_bound_prompt_plus_8x_gen']} pages | "
                 f"{mark(wm['kv_pages_used'] <= wm['kv_pages_bound_prompt_plus_8x_gen'])} |")
    if g:
        out = out[:6] + ["### Goals (issue 8)", "", "| goal | measured | |", "|---|---|---|"] + g + [""] + out[6:]
    return out


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    runs: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        runs[r["env"].get("run") or "unlabelled"].append(r)
    lines = ["# The natix engine: tokens per second on our kernels", "",
             f"Rendered by `scripts/render_engine_report.py` from `{sys.argv[1]}` (written by `scripts/bench_engine.py` "
             "and `scripts/bench_peers.py`). Notes, what each number means and what is left: `reports/engine_notes.md`.", ""]
    for label, rs in runs.items():
        lines += render_run(label, rs)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
