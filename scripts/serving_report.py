"""Rebuild reports/serving.md: natix-serve under load vs the same engine loop in process.

    python scripts/serving_report.py                       # CPU: SmolLM2-135M + demo adapter, hf engine
    python scripts/serving_report.py --render-only         # re-render the .md from the .jsonl
    python scripts/serving_report.py --engine natix --model <8B artifact> --device cuda --tag h200
    python scripts/serving_report.py --engine natix --dummy-shape llama3-8b --set load_format=dummy-w4a8kv4 \
        --device cuda --threads 8 --tag h200     # random weights at the 8B shape (no checkpoint here)

For each concurrency (1, 8, 32, 128) the same chain_sum prompts (greedy, the task's 96-token
limit) go once through HTTP (a ``natix-serve`` subprocess on loopback, streamed through
``/v1/completions`` by ``natix-bench serve-load``'s client) and once through the server's engine
loop in this process (the same engine and batching adapter, no HTTP). Rows are appended to
reports/serving.jsonl; the Markdown is rendered from all of its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JSONL = ROOT / "reports" / "serving.jsonl"
CONCURRENCY = tuple(int(c) for c in os.environ.get("NATIX_SERVING_CONCURRENCY", "1,8,32,128").split(","))


def requests_for(c: int) -> int:
    return max(16, 2 * c) if c < 128 else c


def start_server(args: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "natix.engines.serve.cli", *args, "--port", "0", "--no-access-log"],
                            stderr=subprocess.PIPE, text=True, env=env)
    url = ""
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        if "listening on http://" in line:
            url = line.rsplit(" ", 1)[-1].strip()
            break
    if not url:
        raise SystemExit("natix-serve did not start")
    threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    return proc, url


def measure_all(a: argparse.Namespace) -> None:
    from natix.bench.serve_load import append_row, http_sender, inprocess_sender, measure, render, task_prompts
    from natix.bench.tasks import get_task
    from natix.engines.base import EngineConfig, SamplingSpec
    from natix.engines.serve.cli import _extra, load_engine
    from natix.engines.serve.loop import EngineLoop
    from natix.quant.models import load_tokenizer

    extra = _extra(tuple(a.set))
    name = a.model
    if a.dummy_shape:
        a.model, a.adapter = make_dummy_dir(a.dummy_shape, a.tokenizer), ""
        name = f"{a.dummy_shape} random weights ({extra.get('load_format', 'dummy')})"
    task = get_task("chain_sum")
    spec = SamplingSpec(temperature=0.0, max_tokens=task.max_tokens, logprobs=False)
    tok = load_tokenizer(a.model)
    prompts = task_prompts(task, tok, max(requests_for(c) for c in CONCURRENCY))
    meta = {"task": task.name, "model": name, "adapter": a.adapter, "engine": a.engine, "tag": a.tag,
            "max_batch_size": a.max_batch_size, "torch_threads": a.threads, "temperature": 0.0, "n": 1, "max_tokens": spec.max_tokens,
            "engine_options": extra, "dummy_shape": a.dummy_shape}

    def run(mode: str, send, c: int, server_e2e=None) -> None:
        send(0)  # warm-up (first-call allocations), not measured
        before = server_e2e() if server_e2e else None
        row = measure(send, requests_for(c), concurrency=c, rate=None, duration_s=1800, seed=0, slo_ms={},
                      meta={**meta, "mode": mode, "load_average": os.getloadavg()[0]}, device=a.device)
        if before is not None:
            # the server's own view of the same requests (submission to last token, in the engine
            # loop): client E2EL minus this is what HTTP, JSON and SSE cost, with engine noise cancelled
            after = server_e2e()
            row["server_e2el_mean_ms"] = 1e3 * (after[0] - before[0]) / max(1, after[1] - before[1])
        append_row(a.jsonl, row)
        print(render(row), flush=True)

    args = ["--model", a.model, "--engine", a.engine, "--device", a.device, "--max-batch-size", str(a.max_batch_size),
            "--max-queue", "256", "--served-model-name", name] + (["--adapter", a.adapter] if a.adapter else []) + [x for kv in a.set for x in ("--set", kv)]
    proc, url = start_server(args, a.threads)
    try:
        for c in CONCURRENCY:
            send, close = http_sender(url + "/v1", None, prompts, spec, c, name)
            try:
                run("http", send, c, server_e2e=lambda: _server_e2e(url))
            finally:
                close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    import torch

    torch.set_num_threads(a.threads)  # as the server's OMP_NUM_THREADS
    cfg = EngineConfig(model=a.model, adapter=a.adapter or None, device=a.device, max_batch_size=a.max_batch_size,
                       extra=extra)
    streaming, tokenizer, loaded, _ = load_engine(a.engine, cfg)
    loop = EngineLoop(streaming).start()
    try:
        for c in CONCURRENCY:
            run("inprocess", inprocess_sender(loop, tokenizer, prompts, spec), c)
    finally:
        loop.stop()
        loaded.close()


# model shapes for --dummy-shape: random weights served through the natix engine's load_format=dummy-*
DUMMY_SHAPES = {"llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                  num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                  tie_word_embeddings=False),
                # a CPU smoke test of this script's dummy path
                "llama-tiny": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)}


def make_dummy_dir(shape: str, tokenizer: str) -> str:
    """A model directory holding only a Llama config.json of ``shape`` and ``tokenizer``'s files; the
    vocabulary is the tokenizer's (SmolLM2's 49,152 tokens by default, not Llama-3's 128,256: the
    lm_head is 0.40 GB instead of 1.05 GB), so every token the random model emits decodes."""
    import tempfile

    from transformers import AutoTokenizer, LlamaConfig

    from natix.quant.models import load_tokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer) if Path(tokenizer).is_dir() else load_tokenizer(tokenizer)
    d = Path(tempfile.mkdtemp(prefix=f"natix-dummy-{shape}-"))
    LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **DUMMY_SHAPES[shape]).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _server_e2e(url: str) -> tuple[float, float]:
    """(sum, count) of natix:e2e_request_latency_seconds from the server's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    got = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in f.samples
           if s.name.startswith("natix:e2e_request_latency_seconds_")}
    return got["natix:e2e_request_latency_seconds_sum"], got["natix:e2e_request_latency_seconds_count"]


def _f(x: float | None, nd: int = 0) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def render_md(rows: list[dict]) -> str:
    out = []
    for tag in dict.fromkeys(r.get("tag", "") for r in rows):
        sel = [r for r in rows if r.get("tag", "") == tag]
        env = sel[0]["env"]
        out.append(f"### {tag}: {sel[0]['model']}" + (f" + {Path(sel[0]['adapter']).name}" if sel[0]["adapter"] else "")
                   + f", engine `{sel[0]['engine']}`, {env.get('gpu') or env.get('cpu')} ({env['cpu_count']} CPUs), "
                   f"torch {env.get('torch')}, git {str(env.get('git_sha'))[:12]}\n")
        out.append("| path | conc. | req | ok | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 ms | ITL p50 ms "
                   "| E2EL p50 / p90 / p99 ms | load avg |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(sel, key=lambda r: (r["concurrency"], r["mode"] != "inprocess")):
            out.append(
                f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['completed']} | {r['request_throughput']:.2f} "
                f"| {r['output_throughput']:.1f} | {_f(r['ttft_ms']['p50'])} / {_f(r['ttft_ms']['p99'])} "
                f"| {_f(r['tpot_ms']['p50'], 1)} | {_f(r['itl_ms']['p50'], 1)} "
                f"| {_f(r['e2el_ms']['p50'])} / {_f(r['e2el_ms']['p90'])} / {_f(r['e2el_ms']['p99'])} "
                f"| {_f(r.get('load_average'), 1)} |")
        out.append("")
        out.append("HTTP overhead. *Same requests*: the client's mean E2EL minus the server's own mean for the same "
                   "requests (`natix:e2e_request_latency_seconds`, submission to last token in the engine loop), so engine "
                   "time and its noise cancel. *Separate runs*: HTTP run minus in-process run, which also carries "
                   "run-to-run noise.\n")
        out.append("| conc. | E2EL mean HTTP ms | server-side mean ms | overhead, same requests ms/req | ms/token "
                   "| E2EL mean in-process ms | overhead, separate runs ms/req | ms/token | throughput HTTP / in-process |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        by = {(r["mode"], r["concurrency"]): r for r in sel}
        for c in sorted({r["concurrency"] for r in sel}):
            h, i = by.get(("http", c)), by.get(("inprocess", c))
            if not (h and i):
                continue
            tokens = h["total_output_tokens"] / max(1, h["completed"])
            d = h["e2el_ms"]["mean"] - i["e2el_ms"]["mean"]
            srv = h.get("server_e2el_mean_ms")
            same = None if srv is None else h["e2el_ms"]["mean"] - srv
            out.append(f"| {c} | {h['e2el_ms']['mean']:.0f} | {_f(srv)} | {_f(same, 1)} | "
                       f"{_f(None if same is None else same / tokens, 2)} | {i['e2el_ms']['mean']:.0f} | {d:+.0f} "
                       f"| {d / tokens:+.2f} | {h['output_throughput'] / i['output_throughput']:.2f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", default=str(ROOT / "bench" / "data" / "adapters" / "smollm2-chain-sum-lora"))
    p.add_argument("--engine", default="hf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the engine, both paths (on a 2-core "
                   "machine 1 leaves a core for the client and HTTP, and avoids OpenMP spin-waits under contention)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="engine option, both paths (natix-serve --set); repeatable")
    p.add_argument("--dummy-shape", choices=sorted(DUMMY_SHAPES), help="serve random weights of this shape "
                   "(with --set load_format=dummy-<scheme>); the model directory is made from --tokenizer")
    p.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer of the --dummy-shape directory (a name "
                   "or a saved tokenizer directory)")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--jsonl", type=Path, default=JSONL, help="rows file (the .md goes beside it)")
    a = p.parse_args()
    if not a.render_only:
        measure_all(a)
    rows = [json.loads(line) for line in a.jsonl.read_text().splitlines() if line.strip()]
    md = a.jsonl.with_suffix(".md")
    text = md.read_text() if md.exists() else ""
    marker = "<!-- rows: rendered by scripts/serving_report.py from serving.jsonl -->"
    head = text.split(marker)[0] if marker in text else "# natix-serve under load\n\n"
    md.write_text(head + marker + "\n\n" + render_md(rows))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
