"""Render reports/kernels.md from the JSONL written by scripts/bench_kernels.py (nothing else).

    python scripts/render_kernels_report.py reports/kernels-s21-h200.jsonl reports/kernels.jsonl \
        [--resources reports/kernels_resources.jsonl] [--notes reports/kernels_notes.md] > reports/kernels.md

Each card (``env.gpu``) gets its own section, the newest card first; the register report (an sm_90 compile, the same
for every Hopper card) closes the last.

The JSONL may hold several runs (one run = one device call; records carry ``env.run``, records written before the
bench wrote that label belong to ``LEGACY_RUN``). Each part of the report comes from the newest run that measured it:
the GEMM section (our kernels and the bf16/fp8/int8 baselines, all from one run), the RMSNorm and KV4 sections, and
each GemLite (shape, M, kernel, mode) cell on its own. A ratio only ever divides numbers of the same run: "best
GemLite ÷ chan" is computed per run (that run's GemLite over that run's chan time) and the smallest is shown.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def fmt_ratio(x):
    """Two decimals, three near 1 (so that 0.998 does not print as a met 1.00)."""
    return f"{x:.3f}" if 0.99 <= x < 1.01 else f"{x:.2f}"


LEGACY_RUN = "h100-pass3"  # the pass-3 device call, written before bench_kernels.py recorded env.run
SHAPE_ORDER = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def run_of(r) -> str:
    return (r.get("env") or {}).get("run") or LEGACY_RUN


def newest_run(recs, pred):
    """Label of the last run (in file order) holding a record that satisfies pred, or None."""
    found = None
    for r in recs:
        if pred(r):
            found = run_of(r)
    return found


def render(recs, resources, card: str) -> str:
    runs = list(dict.fromkeys(run_of(r) for r in recs))
    by_run = {u: [r for r in recs if run_of(r) == u] for u in runs}
    is_gl = lambda r: r["kind"] == "gemm" and "gemlite" in r.get("impl", "")  # noqa: E731
    gemm_run = newest_run(recs, lambda r: r["kind"] == "gemm" and r.get("impl") == "w4a8_channel" and "us" in r)
    norm_run = newest_run(recs, lambda r: r["kind"] == "rmsnorm_quant")
    kv_run = newest_run(recs, lambda r: r["kind"] in ("kv4_decode", "kv4_tune", "kv4_write"))
    gl_runs = [u for u in runs if any(is_gl(r) and "us" in r for r in by_run[u])]
    mark = {u: "‡" * (i + 1) for i, u in enumerate([u for u in runs if u != gemm_run])}
    mark[gemm_run] = ""
    sections = defaultdict(list)
    for name, u in (("W4A8 GEMM + bf16/fp8/int8 baselines", gemm_run), ("RMSNorm + INT8", norm_run), ("KV4 decode", kv_run)):
        if u:
            sections[u].append(name)
    for u in gl_runs:
        sections[u].append("GemLite cells" + (f" marked {mark[u]}" if mark[u] else ""))
    L = []
    L.append(f"# natix kernels on the {card}: W4A8 GEMM, RMSNorm + INT8 quant, KV4 decode attention, FP8\n")
    if len(runs) > 1:
        gpus = sorted({r["env"]["gpu"] for r in recs if "env" in r})
        L.append(f"Measured in {len(runs)} runs (device calls) on " + (f"the same card model ({gpus[0]})" if len(gpus) == 1 else
                 "different cards (" + ", ".join(gpus) + ")") + ". Every section below comes from "
                 "one run, named here; the GEMM tables take our kernels and the bf16/fp8/int8 baselines from the newest "
                 "run and each GemLite cell from the newest run that measured it; a ratio never divides numbers of "
                 "two runs.\n")
    for u in runs:
        rr = by_run[u]
        env = rr[0]["env"]
        copy_bw = next((r["gbps"] for r in rr if r["kind"] == "copy"), None)
        cmds = list(dict.fromkeys(r["env"]["command"] for r in rr if "env" in r))
        times = sorted({r["env"]["time"] for r in rr})
        head = f"**Run `{u}`**" + (f" ({', '.join(sections[u])})" if sections[u] else " (superseded: nothing rendered from it)") + ": " \
            if len(runs) > 1 else ""
        L.append(head + f"card **{env['gpu']}**, driver {env['driver']}, torch {env['torch']}, triton {env['triton']}, "
                 f"CUDA {env.get('cuda')}, {env.get('sms')} SMs; git {env['git_sha'][:20]}; measured {times[0]}"
                 + (f" – {times[-1]}" if len(times) > 1 else "") + ".  ")
        L.append("Command" + ("s (one run, one machine, in this order)" if len(cmds) > 1 else "") + ": "
                 + "; ".join(f"`{c}`" for c in cmds) + "  ")
        L.append(f"Copy bandwidth measured in this run: **{fmt(copy_bw, 0)} GB/s** (read + write, 1 GiB `copy_`).\n")
    L.append("Times are medians (`triton.testing.do_bench`) of CUDA-graph replays over rotated input/weight sets "
             "(≥ 200 MB touched per replay, so weights come from HBM, not L2), per call, in µs. "
             "Rendered by `scripts/render_kernels_report.py` from `reports/kernels.jsonl`.\n")

    # ---------------------------------------------------------------- GEMM
    gemm = defaultdict(dict)  # (n, k, m) -> impl -> record: ours/baselines of gemm_run, GemLite newest per cell
    gl_by_run = defaultdict(dict)  # (n, k, m) -> run -> impl -> us (every GemLite number of every run)
    for r in recs:
        if r["kind"] != "gemm" or "m" not in r or "us" not in r:
            continue
        key = (r["n"], r["k"], r["m"])
        if is_gl(r):
            gemm[key][r["impl"]] = r
            gl_by_run[key].setdefault(run_of(r), {})[r["impl"]] = r["us"]
        elif run_of(r) == gemm_run:
            gemm[key][r["impl"]] = r
    chan_by_run = {(run_of(r), r["n"], r["k"], r["m"]): r["us"] for r in recs
                   if r["kind"] == "gemm" and r.get("impl") == "w4a8_channel" and "us" in r}
    g128_by_run = {(run_of(r), r["n"], r["k"], r["m"]): r["us"] for r in recs
                   if r["kind"] == "gemm" and r.get("impl") == "w4a8_g128" and "us" in r}
    tuned_here = any(r["kind"] == "tune" for r in by_run.get(gemm_run, []))
    L.append("## W4A8 GEMM (g128 progressive and per-channel) vs baselines\n")
    L.append("`w4a8_*` = the GEMM on already-quantized activations (what replaces the bf16 GEMM; the INT8 quantization is "
             "fused into the preceding RMSNorm); `+quant` adds a separate per-token quantization launch. "
             "Speed-ups are bf16 time / our time. GemLite columns: fp16, group 128 (A8W4 = its FP8-activation dynamic "
             "kernel); `(autotuned)` = its bundled configs dropped (`reset_config`) and re-autotuned on this card with "
             "`set_autotune('fast', use_cuda_graph=True)` (its CUDA-graph candidate timing); "
             + ("`(bundled)` = GemLite as shipped, with its own `configs/h100.json` (entries for all four shapes at every "
                "M bucket for the fp16-activation kernel); " if any("[bundled-config]" in r.get("impl", "") and "us" in r
                                                                   for r in recs) else "")
             + "its weights were not rotated, which can only flatter it on the shapes whose packed weights fit L2. "
             + ("Our W4A8 configs were tuned in the same run, each candidate timed as CUDA-graph replays over rotated "
                "weight sets." if tuned_here else
                "Our W4A8 kernels ran with the config table in the tree (`kernels/configs/w4a8_gemm.json`, this card's "
                "entries, tuned by earlier runs with CUDA-graph timing over rotated weight sets), not re-tuned in this "
                "run.") + "\n")
    impls = ["w4a8_g128", "w4a8_g128+quant", "w4a8_g128-inloop", "w4a8_g128-expand", "w4a8_channel", "w4a8_channel+quant", "bf16 cublas", "fp8 _scaled_mm",
             "int8 _int_mm",
             "gemlite A16W4 [autotune-fast-graph]", "gemlite A8W4-fp8 [autotune-fast-graph]",
             "gemlite A16W4 [autotune-fast]", "gemlite A8W4-fp8 [autotune-fast]",
             "gemlite A16W4 [bundled-config]", "gemlite A8W4-fp8 [bundled-config]"]
    shapes = sorted({(n, k) for n, k, _ in gemm}, key=lambda s: SHAPE_ORDER.index(s) if s in SHAPE_ORDER else 9)
    present = [i for i in impls if any(i in v for v in gemm.values())]
    short = {"w4a8_g128": "g128", "w4a8_g128+quant": "g128+q", "w4a8_g128-inloop": "g128 level 1 in loop ⁴",
             "w4a8_g128-expand": "g128 expanded ⁴", "w4a8_channel": "chan", "w4a8_channel+quant": "chan+q",
             "bf16 cublas": "bf16", "fp8 _scaled_mm": "fp8", "int8 _int_mm": "int8",
             "gemlite A16W4 [bundled-config]": "GL A16W4 (bundled)", "gemlite A8W4-fp8 [bundled-config]": "GL A8W4 (bundled mode ³)",
             "gemlite A16W4 [autotune-fast]": "GL A16W4 (tuned)", "gemlite A8W4-fp8 [autotune-fast]": "GL A8W4 (tuned)",
             "gemlite A16W4 [autotune-fast-graph]": "GL A16W4 (autotuned)",
             "gemlite A8W4-fp8 [autotune-fast-graph]": "GL A8W4 (autotuned)"}
    goal_rows = []
    for n, k in shapes:
        L.append(f"### N × K = {n} × {k}\n")
        L.append("| M | " + " | ".join(short[i] for i in present) + " | g128 × bf16 | chan × bf16 | best GemLite ÷ chan | rel err (g128 / chan) | int32 exact |")
        L.append("|---" * (len(present) + 6) + "|")
        for m in sorted({m for nn, kk, m in gemm if (nn, kk) == (n, k)}):
            row = gemm[(n, k, m)]
            us = {i: row[i]["us"] for i in present if i in row}
            bf = us.get("bf16 cublas")
            sg = bf / us["w4a8_g128"] if bf and "w4a8_g128" in us else None
            sc = bf / us["w4a8_channel"] if bf and "w4a8_channel" in us else None
            # best GemLite over our chan time, per run (newest run first); the goal uses the smallest
            per_run = [(min(v.values()) / chan_by_run[(u, n, k, m)], u) for u, v in gl_by_run[(n, k, m)].items()
                       if (u, n, k, m) in chan_by_run]
            per_run.sort(key=lambda t: -runs.index(t[1]))
            glr, glu = min(per_run) if per_run else (None, None)
            ex = [row[i].get("int_exact") for i in ("w4a8_g128", "w4a8_channel") if i in row]
            exs = "—" if all(e is None for e in ex) else ("yes" if all(e for e in ex if e is not None) else "**NO**")
            errs = " / ".join(f"{row[i]['rel_err']:.1e}" for i in ("w4a8_g128", "w4a8_channel") if i in row)
            note = " ¹" if any((row[i].get("note") or "").startswith("M padded") for i in row) else ""
            cells = [fmt(us.get(i)) + (mark[run_of(row[i])] if i in row and i.startswith("gemlite") else "") for i in present]
            glc = " / ".join(fmt_ratio(x) + (f"{mark[u]} (vs {chan_by_run[(u, n, k, m)]:.1f})" if mark[u] else "")
                             for x, u in per_run) or "—"
            L.append(f"| {m}{note} | " + " | ".join(cells) + f" | {fmt(sg, 2)}× | {fmt(sc, 2)}× | {glc} | {errs} | {exs} |")
            per_run_g = [(min(v.values()) / g128_by_run[(u, n, k, m)], u) for u, v in gl_by_run[(n, k, m)].items()
                         if (u, n, k, m) in g128_by_run]
            per_run_g.sort(key=lambda t: -runs.index(t[1]))
            f8 = us["fp8 _scaled_mm"] / us["w4a8_channel"] if "fp8 _scaled_mm" in us and "w4a8_channel" in us else None
            goal_rows.append((n, k, m, sg, sc, f8, glr, " / ".join(fmt_ratio(x) + mark[u] for x, u in per_run),
                              " / ".join(fmt_ratio(x) + mark[u] for x, u in per_run_g) or "—"))
        L.append("")
    L.append("¹ `torch._int_mm` needs M > 16: timed at M = 17.  int32 exact: the raw int32 accumulator equals an exact "
             "float64 GEMM of the integer operands (checked where M·N·K ≤ 2³⁶; the CPU/GPU tests check it on every shape they run).")
    for u in runs:
        if mark[u] and u in gl_runs:
            L.append(f"{mark[u]} GemLite number from run `{u}` (not re-measured in run `{gemm_run}`); its "
                     f"\"best GemLite ÷ chan\" uses our chan time of run `{u}` (in parentheses), not the one in this row.")
    if any(i.startswith("gemlite A8W4-fp8 [bundled-config]") for i in present):
        L.append("³ GemLite's `h100.json` has no entry for the FP8-activation 4-bit kernel (its type id 304; the records' "
                 "`bundled_entries` list only `GEMM:104`, the fp16-activation one), so in bundled-config mode GemLite "
                 "autotuned this kernel itself on its first call, with its default `fast` search and non-graph timing.")
    L.append("")
    # GemLite cells skipped in some run and measured in none. A skip record names one kernel ("gemlite A16W4 [mode]")
    # or all ("gemlite [mode]"), and one M, a list "ms", or (older records) the whole shape.
    have = [(r["n"], r["k"], r["m"], r["impl"]) for r in recs if is_gl(r) and "us" in r]
    missing = set()
    for r in recs:
        if not (is_gl(r) and "error" in r and "n" in r and r["error"].startswith("skipped")):
            continue
        imp = r["impl"]
        suffix = imp.split(" ", 1)[1] if not imp.startswith("gemlite [") else imp[len("gemlite "):]
        for m in ([r["m"]] if "m" in r else r.get("ms") or ["all"]):
            if not any((n, k) == (r["n"], r["k"]) and (m == "all" or mm == m) and h.endswith(suffix) for n, k, mm, h in have):
                missing.add((imp, r["n"], r["k"], m))
    missing = sorted(missing, key=str)
    if missing:
        L.append("GemLite cells measured in no run (out of device time): " +
                 "; ".join(f"{i} {n}×{k} M={m}" for i, n, k, m in missing) + "\n")

    # goal table
    if any(i in present for i in ("w4a8_g128-inloop", "w4a8_g128-expand")):
        L.append("⁴ the g128 GEMM on the other side of the INT8 expansion threshold (`natix.kernels.w4a8_expand`: at "
                 "M ≥ 1024 the g128 column expands the weights to INT8 first, timed with the expansion; below it "
                 "level 1 is applied in the GEMM's main loop).\n")
    L.append("### GEMM goals (issue 9)\n")
    L.append("Per channel: ≥ 3.5× bf16 at M ≤ 16 on the two large shapes, ≥ 2.5× on the 4096-wide ones; ≥ fp8 "
             "`_scaled_mm` at M ≥ 64 (*chan vs fp8* = fp8 time ÷ ours); ≥ 1.3× bf16 at M = 256 and 1024. g128: "
             "≥ 1.0× bf16 at every M. Prefill (M ≥ 2048): ≥ 1.4× bf16, both variants (the engine fuses the "
             "quantization into RMSNorm / SiLU·mul, so the plain GEMM column is the one that counts).\n")
    L.append("| N × K | M | chan × bf16 | chan vs fp8 | g128 × bf16 | goals missed |")
    L.append("|---|---|---|---|---|---|")
    for n, k, m, sg, sc, f8, *_ in goal_rows:
        missed = []
        if m <= 16 and sc is not None:
            need = 3.5 if n * k > 4096 * 6144 else 2.5
            if sc < need:
                missed.append(f"chan ≥ {need}× bf16")
        if m >= 64 and f8 is not None and f8 < 1:
            missed.append("chan ≥ fp8")
        if m in (256, 1024) and sc is not None and sc < 1.3:
            missed.append("chan ≥ 1.3× bf16")
        if sg is not None and sg < 1.0:
            missed.append("g128 ≥ 1.0× bf16")
        if m >= 2048 and any(x is not None and x < 1.4 for x in (sg, sc)):
            missed.append("prefill ≥ 1.4× bf16")
        L.append(f"| {n}×{k} | {m} | {fmt(sc, 2)}× | {fmt(f8, 2)}× | {fmt(sg, 2)}× | "
                 + ("; ".join(missed) if missed else "none ✅") + " |")
    L.append("")

    # ---------------------------------------------------------------- norm
    L.append("## Fused RMSNorm + per-token INT8 quantization (H = 4096, bf16 in)\n")
    L.append("Bytes = read x (2 B/elem) + write codes (1 B/elem) + scales/sums. Goal: ≥ 70% of copy bandwidth.\n")
    L.append("| M | triton µs | GB/s | % of copy | torch eager µs | codes ≠ reference (fraction, max diff) |")
    L.append("|---|---|---|---|---|---|")
    norm = defaultdict(dict)
    for r in by_run.get(norm_run, []):
        if r["kind"] == "rmsnorm_quant":
            norm[r["m"]][r["impl"]] = r
    for m in sorted(norm):
        t = norm[m].get("triton fused", {})
        e = norm[m].get("torch eager reference", {})
        L.append(f"| {m} | {fmt(t.get('us'))} | {fmt(t.get('gbps'), 0)} | {fmt(100 * t['frac_copy'] if 'frac_copy' in t else None, 0)}% | "
                 f"{fmt(e.get('us'))} | {t.get('code_mismatch', 0):.1e}, {t.get('code_maxdiff')} |")
    L.append("")

    # ---------------------------------------------------------------- KV4
    L.append("## KV4 decode attention (paged, page 64; 32 q heads / 8 KV heads, d = 128)\n")
    L.append("Bytes = codes (d/2 B per token per head, K and V) + fp16 scale and zero per token per head, + q/out. "
             "SDPA = `scaled_dot_product_attention(enable_gqa=True)` over a contiguous bf16 cache. "
             "Goals (B = 64, T = 4096): ≥ 2.5× SDPA and ≥ 60% of copy bandwidth.\n")
    L.append("| batch | context | KV4 µs | settings (layout, splits, block, stages, warps) | KV4 GB/s | % copy | SDPA bf16 µs | SDPA GB/s | speed-up | rel err | rows layout µs ² |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    kv = defaultdict(dict)
    for r in by_run.get(kv_run, []):
        if r["kind"] == "kv4_decode":
            if r["impl"] in ("kv4 triton", "kv4 triton (default)"):
                kv[(r["batch"], r["ctx"])]["ours"] = r
            elif r["impl"].startswith("torch SDPA"):
                kv[(r["batch"], r["ctx"])]["sdpa"] = r
        elif r["kind"] == "kv4_tune":
            rows = [t for t in r["tried"] if t[1].get("swap") is False and t[2] < 2e-2]
            if rows:
                kv[(r["batch"], r["ctx"])]["rows"] = min(rows, key=lambda t: t[0])
    for key in kv:
        o, s = kv[key].get("ours", {}), kv[key].get("sdpa", {})
        st = o.get("settings") or {}
        lay = "swap-AB" if st.get("swap", True) else "rows"
        sp = s["us"] / o["us"] if o.get("us") and s.get("us") else None
        rows = kv[key].get("rows")
        rs = f"{rows[0]:.1f} ({rows[1]['num_splits']} splits)" if rows else "—"
        L.append(f"| {key[0]} | {key[1]} | {fmt(o.get('us'))} | {lay}, {st.get('num_splits', 'auto')}, {st.get('block_t', 64)}, {st.get('num_stages', 3)}, {st.get('num_warps', 4)} | "
                 f"{fmt(o.get('gbps'), 0)} | {fmt(100 * o['frac_copy'] if 'frac_copy' in o else None, 0)}% | {fmt(s.get('us'))} | "
                 f"{fmt(s.get('gbps'), 0)} | {fmt(sp, 2)}× | {o.get('rel_err', 0):.1e} | {rs} |")
    L.append("\n² best setting of the previous layout (query heads padded to 16 MMA rows), same run, from the setting search "
             "(CUDA-graph timing, shorter repetition than the main column). `settings` `auto` = the launcher's default "
             "(swap-AB, `default_splits`, block 64, 3 stages, 4 warps), which won that case's search.")
    L.append("\n`ragged64`: 64 rows with lengths drawn uniformly from 1…4096 (SDPA runs them padded to the longest).")
    w = [r for r in by_run.get(kv_run, []) if r["kind"] == "kv4_write"]
    if w:
        L.append(f"KV4 quantize-on-write of one decode step (64 tokens × 8 heads, K and V): {fmt(w[0]['us'])} µs.\n")

    # ---------------------------------------------------------------- resources
    if resources:
        L.append("## Register / shared-memory report\n")
        L.append("| kernel | config | registers | stack (spill) bytes | LDL / STL in SASS | tensor-core instrs |")
        L.append("|---|---|---|---|---|---|")
        for r in resources:
            c = r["sass_counts"]
            tc = ", ".join(f"{k}×{v}" for k, v in c.items() if k in ("IGMMA", "HGMMA", "IMMA", "HMMA") and v)
            L.append(f"| {r['kernel']} | {r['config']} | {r['regs']} | {r['stack_bytes']} | {c['LDL']} / {c['STL']} | {tc} |")
        L.append(f"\n({resources[0]['how']}.)\n")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--resources", default=None)
    ap.add_argument("--notes", default=None, help="markdown appended verbatim (analysis of shortfalls)")
    a = ap.parse_args()
    cards: dict[str, list] = {}
    for path in a.jsonl:
        recs = load(path)
        first = next((r["env"]["gpu"] for r in recs if "env" in r), "unknown card")
        for r in recs:
            cards.setdefault((r.get("env") or {}).get("gpu", first), []).append(r)
    newest = sorted(cards, key=lambda c: max((r["env"]["time"] for r in cards[c] if "env" in r), default=""), reverse=True)
    resources = load(a.resources) if a.resources else []
    text = "\n\n".join(render(cards[c], resources if i == len(newest) - 1 else [], c) for i, c in enumerate(newest))
    if a.notes:
        text += "\n" + open(a.notes).read()
    print(text)


if __name__ == "__main__":
    main()
