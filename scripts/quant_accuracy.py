"""Build reports/quant-accuracy.{jsonl,md}: perplexity and task accuracy of every export scheme
for the embedded SmolLM2-135M + demo adapter, with the w4a8kv4 ablations.

    python scripts/quant_accuracy.py                      # run missing rows, then render
    python scripts/quant_accuracy.py --rows bf16,fp8      # only these rows
    python scripts/quant_accuracy.py --render-only        # re-render the .md from the .jsonl

Each row is the real CLI: ``natix-quant export`` (into --work) then ``natix-quant eval --jsonl``,
so the report is what a user gets. Rows already in the JSONL (same label and settings) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = "smollm2-135m"
# label -> (scheme or None for the unquantized baseline, extra export flags)
# rows measured before value rotation became the default keep the head rotations off, so a re-run
# reproduces them
NO_HEAD_ROT = ["--set", "rotate_values=false", "--set", "rotate_keys=false"]
# rows measured before group_fallback="finer" became the default quantized the 576-wide layers per channel
CH = ["--set", "group_fallback=channel"]
# every w4a8kv4 row but "actorder" ran before act_order became the default
AO_OFF = ["--set", "act_order=false"]
ROWS: dict[str, tuple[str | None, list[str]]] = {
    "bf16": (None, []),
    # the first fp8 row was exported before weight_scale existed: absmax, which the flag now spells out
    "fp8": ("fp8", ["--set", "weight_scale=absmax"]),
    "fp8-mse": ("fp8", ["--set", "weight_scale=mse"]),
    "fp8-mse gptq": ("fp8", ["--set", "weight_scale=mse", "--set", "gptq=true"]),
    "fp8-mse down_proj 2,11 bf16": ("fp8", ["--set", "weight_scale=mse", "--set",
                                            'ignore=["lm_head","model.layers.2.mlp.down_proj",'
                                            '"model.layers.11.mlp.down_proj"]']),
    "gptq-g128": ("gptq", ["--group-size", "128", *CH]),
    "gptq-channel": ("gptq", ["--group-size", "-1"]),
    "w4a8kv4-g128": ("w4a8kv4", ["--group-size", "128", *CH, *NO_HEAD_ROT, *AO_OFF]),
    "w4a8kv4-channel": ("w4a8kv4", ["--group-size", "-1", *NO_HEAD_ROT, *AO_OFF]),
    "w4a8kv4-g128 no SmoothAttention": ("w4a8kv4", ["--group-size", "128", "--set", "smooth_attention=false",
                                                    *CH, *NO_HEAD_ROT, *AO_OFF]),
    "w4a8kv4-g128 no rotation": ("w4a8kv4", ["--group-size", "128", "--set", "rotate=false", *CH, *NO_HEAD_ROT, *AO_OFF]),
    "w4a8kv4-g128 no GPTQ (RTN)": ("w4a8kv4", ["--group-size", "128", "--set", "gptq=false", *CH, *NO_HEAD_ROT, *AO_OFF]),
    "w4a8kv4-g128 KV16": ("w4a8kv4", ["--group-size", "128", "--kv", "none", *CH, *NO_HEAD_ROT, *AO_OFF]),
    # the pre-rotation default again, measured with the current eval (hf engine's unquantized prefill
    # attention, reports/kv4-prefill.md): the paired baseline of the rows below
    "w4a8kv4-g128 (re-run)": ("w4a8kv4", ["--group-size", "128", *CH, *NO_HEAD_ROT, *AO_OFF]),
    # the current default (rotate_values on, rotate_keys off)
    "w4a8kv4-g128 vrot": ("w4a8kv4", ["--group-size", "128", "--set", "rotate_values=true",
                                      "--set", "rotate_keys=false", *CH, *AO_OFF]),
    # with rotate_keys (opt-in) too
    "w4a8kv4-g128 kvrot": ("w4a8kv4", ["--group-size", "128", "--set", "rotate_values=true",
                                       "--set", "rotate_keys=true", *CH, *AO_OFF]),
    # group_fallback="finer": the 576-wide layers (q/k/v/o/gate/up) in groups of 64, down_proj (1536) g128
    "w4a8kv4-g128 vrot finer": ("w4a8kv4", ["--group-size", "128", "--set", "group_fallback=finer",
                                            "--set", "rotate_values=true", "--set", "rotate_keys=false", *AO_OFF]),
    "w4a8kv4-g64 vrot": ("w4a8kv4", ["--group-size", "64", "--set", "rotate_values=true",
                                     "--set", "rotate_keys=false", *AO_OFF]),
    "w4a8kv4-g128 vrot finer mse": ("w4a8kv4", ["--group-size", "128", "--set", "group_fallback=finer",
                                                "--set", "rotate_values=true", "--set", "rotate_keys=false",
                                                "--set", "weight_scale=mse", *AO_OFF]),
    "w4a8kv4-g128 vrot finer actorder": ("w4a8kv4", ["--group-size", "128", "--set", "group_fallback=finer",
                                                     "--set", "rotate_values=true", "--set", "rotate_keys=false",
                                                     "--set", "act_order=true"]),
    "w4a8kv4-g32 vrot": ("w4a8kv4", ["--group-size", "32", "--set", "rotate_values=true",
                                     "--set", "rotate_keys=false", *AO_OFF]),
    "gptq-g128 finer": ("gptq", ["--group-size", "128", "--set", "group_fallback=finer"]),
    # today's defaults (g128 where it divides, g64 on the 576-wide layers, act-order, value rotation), no flags:
    # the artifact a user gets, and its KV16 / key-rotation ablations
    "w4a8kv4 default": ("w4a8kv4", []),
    "w4a8kv4 default KV16": ("w4a8kv4", ["--kv", "none"]),
    "w4a8kv4 default kvrot": ("w4a8kv4", ["--set", "rotate_keys=true"]),
    # KV4 channel groups (opt-in): 32 and 16 channels per scale and zero instead of the whole head
    "w4a8kv4 kvg32": ("w4a8kv4", ["--set", "kv_group_size=32"]),
    "w4a8kv4 kvg32 kvrot": ("w4a8kv4", ["--set", "kv_group_size=32", "--set", "rotate_keys=true"]),
    "w4a8kv4 kvg16": ("w4a8kv4", ["--set", "kv_group_size=16"]),
    # keys per channel over blocks of 64 tokens (KIVI's key layout; opt-in, reference path only for now)
    "w4a8kv4 kvblock64": ("w4a8kv4", ["--set", "kv_key_block=64"]),
}
# label -> (row whose artifact it reuses, config fields changed): for options that change no weight
# (rotate_keys, kv_group_size, kv_key_block and kv_cache act at run time), the source row's artifact is copied and
# the fields are set in its manifest and config.json, instead of an export that would write the same
# tensors again
DERIVED: dict[str, tuple[str, dict[str, object]]] = {
    "w4a8kv4-g128 kvrot": ("w4a8kv4-g128 vrot", {"rotate_keys": True}),
    "w4a8kv4 default kvrot": ("w4a8kv4 default", {"rotate_keys": True}),
    # the same weights read with a 16-bit cache: what the KV4 cache alone costs
    "w4a8kv4 default KV16": ("w4a8kv4 default", {"kv_cache": "none"}),
    "w4a8kv4 kvg32": ("w4a8kv4 default", {"kv_group_size": 32}),
    "w4a8kv4 kvg32 kvrot": ("w4a8kv4 default", {"kv_group_size": 32, "rotate_keys": True}),
    "w4a8kv4 kvg16": ("w4a8kv4 default", {"kv_group_size": 16}),
    "w4a8kv4 kvblock64": ("w4a8kv4 default", {"kv_key_block": 64}),
}
KEEP_MARKER = "<!-- sections below are not rendered from the JSONL; --render-only keeps them -->"
GOALS = {"fp8": 0.01, "fp8-mse": 0.01}  # max relative perplexity increase vs bf16
QOQ_ANCHOR = 6.76 / 6.14 - 1  # QoQ W4A8KV4 g128 on Llama-3-8B, WikiText2 (QServe paper)


def _run(cmd: list[str], log) -> float:
    t0 = time.time()
    print("+", " ".join(cmd), file=log, flush=True)
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - t0


def _peak_rss(cmd: list[str], log) -> tuple[float, int | None]:
    """Run ``cmd`` under GNU time when there is one; (seconds, peak RSS bytes or None). The parent
    (this script) never imports torch, so the child's maximum RSS is its own."""
    gnu_time = Path("/usr/bin/time")
    if not gnu_time.exists():
        return _run(cmd, log), None
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as f:
        secs = _run([str(gnu_time), "-f", "%M", "-o", f.name, *cmd], log)
        return secs, int(f.read().split()[-1]) * 1024


def _model_dir(work: Path, label: str) -> Path:
    return work / label.replace(" ", "_").replace("(", "").replace(")", "")


def _derive(work: Path, label: str, log) -> Path:
    """Copy the source row's artifact and set DERIVED[label]'s fields in its manifest and config.json."""
    import shutil

    src_label, fields = DERIVED[label]
    src, out = _model_dir(work, src_label), _model_dir(work, label)
    if not (src / "natix_manifest.json").is_file():
        raise SystemExit(f"{label}: needs {src_label!r}'s artifact in {src} (run that row first, same --work)")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    mpath, cpath = out / "natix_manifest.json", out / "config.json"
    manifest, config = json.loads(mpath.read_text()), json.loads(cpath.read_text())
    manifest["details"]["quant_config"].update(fields)
    # config.json's quantization_config as an export with these fields writes it
    from natix.quant.schemes import config_from_dict

    qc = config["quantization_config"]
    config["quantization_config"] = config_from_dict(manifest["details"]["quant_config"]).hf_quantization_config(
        qc.get("layers"))
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    cpath.write_text(json.dumps(config, indent=2) + "\n")
    print(f"+ derived {out} from {src} with {fields}", file=log, flush=True)
    return out


def run_rows(labels: list[str], args: argparse.Namespace) -> None:
    jsonl = Path(args.jsonl)
    done = set()
    if jsonl.exists():
        done = {json.loads(x)["label"] for x in jsonl.read_text().splitlines() if x.strip()}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "natix.quant.cli"]  # natix-quant, also where it is not installed (the GPU machine)
    device = ["--device", args.device] if args.device else []
    with open(work / "log.txt", "a") as log:
        for label in labels:
            if label in done:
                print(f"{label}: already in {jsonl}")
                continue
            scheme, flags = ROWS[label]
            model = str(_model_dir(work, label))
            peak = None
            if label in DERIVED:
                export_s = None
                _derive(work, label, log)
            elif scheme is None:  # the merged model with bf16 weights: what every artifact starts from
                export_s = _run([*cli, "merge", "--base", BASE, "--adapter", args.adapter,
                                 "--dtype", "bf16", "--out", model, "--force"], log)
            else:
                export_s, peak = _peak_rss([*cli, "export", "--base", BASE, "--adapter",
                                            args.adapter, "--scheme", scheme, *flags, *device, "--calib", args.calib,
                                            "--calib-samples", str(args.calib_samples), "--out", model, "--force"],
                                           log)
            tmp = work / "row.jsonl"
            tmp.unlink(missing_ok=True)
            # ablations get greedy only: perplexity is their measure; maj@8 costs 8x the generation
            strategies = ["--strategy", "greedy"] + ([] if " " in label or args.greedy_only else ["--strategy", "maj@8"])
            task = [] if args.ppl_only else ["--task", "chain_sum", *strategies, "--items", str(args.items),
                                             "--temperature", "0.7"]
            eval_s = _run([*cli, "eval", model, "--ppl", "pydoc", "--ppl-windows",
                           str(args.ppl_windows), *task, *device, "--engine", args.engine, "--label", label,
                           "--jsonl", str(tmp)], log)
            row = json.loads(tmp.read_text())
            row.update({"export_s": export_s, "export_peak_rss_bytes": peak, "eval_s": eval_s, "export_flags": flags,
                        "engine": args.engine,
                        "calib": args.calib,
                        "calib_samples": args.calib_samples})
            if label in DERIVED:
                row["derived_from"] = {"label": DERIVED[label][0], "fields": DERIVED[label][1]}
            row["artifact_bytes"] = sum(f.stat().st_size for f in Path(model).iterdir() if f.is_file())
            if scheme is not None:
                manifest = json.loads((Path(model) / "natix_manifest.json").read_text())
                row["quant_config"] = manifest["details"]["quant_config"]
                row["layers"] = manifest["details"]["layers"]
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            greedy = f"{row['task']['strategies']['greedy']['accuracy']:.1%}" if "task" in row else "not run"
            print(f"{label}: ppl {row['perplexity']['ppl']:.3f}, greedy {greedy} ({export_s or 0:.0f}+{eval_s:.0f} s)")


def render(jsonl: Path) -> str:
    rows = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
    by = {r["label"]: r for r in rows}
    base = by.get("bf16")
    L = ["# Quantization accuracy: SmolLM2-135M-Instruct + demo LoRA (chain_sum)\n"]
    env = rows[0]["env"]
    L.append(f"Rendered from `{jsonl.name}` by `python scripts/quant_accuracy.py --render-only`; each row is "
             "`natix-quant export` then `natix-quant eval` "
             f"({'reference path' if rows[0].get('engine', 'hf') == 'hf' else rows[0].get('engine') + ' engine'}, "
             f"{env.get('device') or 'CPU'}). "
             f"Machine: {env.get('cpu', env.get('device', '?'))}; torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}; git {str(env.get('git_sha'))[:12]}.\n")
    r0 = rows[0]
    L.append(f"Perplexity: held-out half of the `pydoc` corpus (Python's documentation topics; the other half is "
             f"never seen by calibration), {r0['perplexity']['tokens']} tokens in windows of "
             f"{r0['perplexity']['max_length']}. Task: chain_sum eval split, {r0['task']['strategies']['greedy']['items']} "
             f"items, greedy and maj@8 at T=0.7, Wilson 95% intervals. Calibration: `{r0.get('calib') or rows[-1].get('calib')}`, "
             f"{rows[-1].get('calib_samples')} samples.\n")
    L.append("| variant | KV | ppl | Δppl vs bf16 | greedy | maj@8 | Δgreedy vs bf16 (paired) | artifact MiB | export s | "
             "export peak RSS MiB |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ppl = r["perplexity"]["ppl"]
        d = f"{100 * (ppl / base['perplexity']['ppl'] - 1):+.1f}%" if base and r is not base else "—"
        strat = r["task"]["strategies"] if "task" in r else {}  # --ppl-only rows have no task
        g, mj = strat.get("greedy"), strat.get("maj@8")
        acc = lambda c: f"{100 * c['accuracy']:.1f} [{100 * c['ci95'][0]:.0f}, {100 * c['ci95'][1]:.0f}]"  # noqa: E731
        paired = "—"
        if base and r is not base and g:
            from natix.bench.stats import paired_difference

            bg = base["task"]["strategies"]["greedy"]["correct"]
            diff = paired_difference(g["correct"], bg)
            paired = f"{100 * diff[0]:+.1f} [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}]"
        size = f"{r['artifact_bytes'] / 2**20:.1f}" if r.get("artifact_bytes") else "—"
        rss = f"{r['export_peak_rss_bytes'] / 2**20:.0f}" if r.get("export_peak_rss_bytes") else "—"
        greedy = acc(g) if g else "not run"
        exp = f"{r['export_s'] or 0:.0f}" if not r.get("derived_from") else f"({r['derived_from']['label']}'s)"
        kv = r["perplexity"].get("kv_cache", "none")
        if kv == "int4":  # KV4 channel groups (a manifest from before kv_group_size: one scale per head)
            qc = r.get("quant_config") or {}
            gs, kb = qc.get("kv_group_size", -1), qc.get("kv_key_block", 0)
            kv += (f" keys per channel / {kb} tokens, values" if kb else "") + (" per head" if gs == -1 else f" g{gs}")
        L.append(f"| {r['label']} | {kv} | {ppl:.3f} | {d} | {greedy} | "
                 f"{acc(mj) if mj else '—'} | {paired} | {size} | {exp} | {rss} |")
    L.append("")
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated labels (default: all)")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--calib", default="chain_sum")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--adapter", default=str(ROOT / "bench" / "data" / "adapters" / "smollm2-chain-sum-lora"))
    ap.add_argument("--jsonl", default=str(ROOT / "reports" / "quant-accuracy.jsonl"))
    ap.add_argument("--work", default=os.environ.get("NATIX_QA_WORK", "/tmp/natix-quant-accuracy"))
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--device", help="export and eval --device (default: theirs, auto)")
    ap.add_argument("--engine", default="hf", help="eval --engine for task accuracy (default hf, the reference path)")
    ap.add_argument("--greedy-only", action="store_true", help="no maj@8 for the main rows either")
    ap.add_argument("--ppl-only", action="store_true",
                    help="perplexity only, no task accuracy (the row says 'not run'); for when generation is too slow")
    args = ap.parse_args()
    if not args.render_only:
        labels = [x.strip() for x in args.rows.split(",") if x.strip()]
        unknown = [x for x in labels if x not in ROWS]
        if unknown:
            ap.error(f"unknown rows {unknown}; known: {list(ROWS)}")
        run_rows(labels, args)
    md = Path(args.jsonl).with_suffix(".md")
    # sections written by hand below the marker (measured with other settings than the table's) stay
    kept = ""
    if md.exists() and KEEP_MARKER in md.read_text():
        kept = md.read_text()[md.read_text().index(KEEP_MARKER):]
    md.write_text(render(Path(args.jsonl)).rstrip("\n") + "\n\n" + kept if kept else render(Path(args.jsonl)))
    print(md)


if __name__ == "__main__":
    main()
