"""``natix-bench serve-load``: load an OpenAI-compatible server (or the same engine loop in
process) and report what ``vllm bench serve`` reports, so the numbers compare.

Load: ``--concurrency C`` keeps C requests in flight; ``--rate R`` sends R requests/s with
Poisson arrivals (seeded), at most ``--concurrency`` in flight if both are given. Bounded:
``--requests`` in all, and ``--duration`` seconds (requests not started by then are not sent).
Prompts are the task's held-out items, chat-formatted with the model's tokenizer as
``natix-bench run`` formats them, sent to ``/v1/completions`` with streaming.

Per request (from the stream): TTFT (send to first token), TPOT ((end-to-end - TTFT) / (output
tokens - 1)), ITL (gap between chunks, per token: a chunk of k tokens after t seconds counts k
gaps of t/k), E2EL (send to last byte). Per run: completed/failed, duration, request and
token throughput, mean/median/p90/p99 of each latency, and goodput (completed requests per
second that met every SLO given).

``--in-process`` runs the same requests through the server's engine loop in this process
(engine, batching adapter, no HTTP), which is what the HTTP overhead is measured against.
Each run appends one JSON row (with the environment) to ``--out``.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import click

__all__ = ["serve_load", "RequestRecord", "summarize", "run_load", "measure", "task_prompts", "http_sender",
           "inprocess_sender", "append_row"]


@dataclass
class RequestRecord:
    ok: bool
    start: float
    end: float
    ttft: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _itl(chunks: Sequence[tuple[float, int]]) -> list[float]:
    """One sample's inter-token latencies from its ``(arrival, tokens)`` chunks, in order."""
    out: list[float] = []
    for (t0, _), (t1, k) in zip(chunks, chunks[1:]):
        out.extend([(t1 - t0) / k] * k)
    return out


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    from natix.bench.stats import percentile

    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ms = [1e3 * v for v in values]
    return {"mean": sum(ms) / len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99)}


def summarize(records: Sequence[RequestRecord], duration: float, slo_ms: dict[str, float]) -> dict[str, Any]:
    """vllm bench serve's metrics over ``records`` (one run of ``duration`` seconds). ``slo_ms``:
    any of ``ttft``, ``tpot``, ``e2el`` in milliseconds, for goodput."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def meets(r: RequestRecord) -> bool:
        got = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2e}
        return all(got[k] is not None and 1e3 * got[k] <= v for k, v in slo_ms.items())

    good = [r for r in ok if meets(r)]
    return {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
        "errors": sorted({r.error for r in records if r.error})[:5],
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2el_ms": _stats([r.e2e for r in ok]),
        "slo_ms": slo_ms, "goodput": len(good) / duration if duration > 0 else 0.0,
    }


def run_load(send: Callable[[int], RequestRecord], n: int, *, concurrency: int | None, rate: float | None,
             duration_s: float, seed: int = 0) -> tuple[list[RequestRecord], float]:
    """Call ``send(i)`` for i < n from worker threads under the given load shape; returns the
    records and the wall time from the first send to the last answer."""
    workers = concurrency or n
    todo: queue.Queue[int | None] = queue.Queue()
    records: list[RequestRecord] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + duration_s

    def worker() -> None:
        while (i := todo.get()) is not None:
            if time.perf_counter() > deadline:
                continue
            r = send(i)
            with lock:
                records.append(r)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    rng = random.Random(seed)
    for i in range(n):
        if rate:
            time.sleep(rng.expovariate(rate))
            if time.perf_counter() > deadline:
                break
        todo.put(i)
    for _ in threads:
        todo.put(None)
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def http_sender(endpoint: str, api_key: str | None, prompts: list[str], spec: Any, concurrency: int,
                model: str = "") -> tuple[Callable[[int], RequestRecord], Callable[[], None]]:
    """``send(i)`` streams prompt ``i`` to ``endpoint`` through the openai-http engine's client
    (the served model: ``model`` if the server lists it, else its only one); no retries, so a
    429 counts as a failed request."""
    from natix.engines.base import EngineConfig
    from natix.engines.openai_http_engine import OpenAIHTTPEngine, completion_body, stream_completion

    eng = OpenAIHTTPEngine()
    eng.load(EngineConfig(model=model, max_batch_size=concurrency,
                          extra={"endpoint": endpoint, "api_key": api_key, "retries": 0}))

    def send(i: int) -> RequestRecord:
        body = completion_body(eng.model, prompts[i % len(prompts)], spec)
        t = time.perf_counter()
        try:
            s = stream_completion(eng.client, body, retries=0)
        except Exception as e:  # noqa: BLE001 - a failed request is a data point
            return RequestRecord(False, t, time.perf_counter(), error=f"{type(e).__name__}: {e}"[:200])
        first = s.first if s.first is not None else s.end
        return RequestRecord(True, s.sent, s.end, ttft=first - s.sent, output_tokens=s.output_tokens,
                             prompt_tokens=int((s.usage or {}).get("prompt_tokens", 0)),
                             itl=[x for ch in s.choices.values() for x in _itl(ch.chunks)])

    return send, eng.close


def inprocess_sender(loop: Any, tokenizer: Any, prompts: list[str], spec: Any) -> Callable[[int], RequestRecord]:
    def send(i: int) -> RequestRecord:
        prompt = prompts[i % len(prompts)]
        inbox: queue.Queue = queue.Queue()
        t = time.perf_counter()
        try:
            loop.submit(prompt, spec, lambda ds: inbox.put((time.perf_counter(), ds)))
        except ValueError as e:  # RequestError
            return RequestRecord(False, t, time.perf_counter(), error=str(e))
        first, tokens, left, error = None, 0, spec.n, None
        chunks: dict[int, list[tuple[float, int]]] = {}
        while left:
            now, ds = inbox.get()
            for d in ds:
                if d.token_ids:
                    first = first if first is not None else now
                    chunks.setdefault(d.index, []).append((now, len(d.token_ids)))
                    tokens += len(d.token_ids)
                if d.finished:
                    left -= 1
                    error = error or (d.error if d.finish_reason == "error" else None)
        end = time.perf_counter()
        if error:
            return RequestRecord(False, t, end, error=error)
        first = first if first is not None else end
        return RequestRecord(True, t, end, ttft=first - t, output_tokens=tokens,
                             prompt_tokens=len(tokenizer(prompt, add_special_tokens=False).input_ids),
                             itl=[x for cs in chunks.values() for x in _itl(cs)])

    return send


@click.command("serve-load")
@click.option("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (or --in-process).")
@click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer key for the endpoint (env OPENAI_API_KEY).")
@click.option("--in-process", is_flag=True, help="Run the engine loop here instead of sending HTTP.")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Tokenizer for the prompts' chat format; with --in-process, the model to load.")
@click.option("--adapter", help="With --in-process: adapter to merge (the server's --adapter).")
@click.option("--engine", default="hf", show_default=True, help="With --in-process: the engine.")
@click.option("--max-batch-size", default=64, show_default=True, type=int, help="With --in-process: as natix-serve's.")
@click.option("--batch-window-ms", default=5.0, show_default=True, type=float, help="With --in-process: as natix-serve's.")
@click.option("--task", default="chain_sum", show_default=True, help="Prompts: this task's held-out items.")
@click.option("--requests", "n_requests", default=64, show_default=True, type=int, help="Requests in all.")
@click.option("--concurrency", type=int, help="Requests in flight at most (default: all, or unbounded with --rate).")
@click.option("--rate", type=float, help="Requests per second, Poisson arrivals (default: as fast as concurrency allows).")
@click.option("--duration", "duration_s", default=600.0, show_default=True, type=float, help="Stop sending after this many seconds.")
@click.option("--max-tokens", type=int, help="Per request (default: the task's).")
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--n", "n_samples", default=1, show_default=True, type=int, help="Samples per request.")
@click.option("--seed", default=0, show_default=True, type=int, help="Arrival times and item draw.")
@click.option("--slo-ttft-ms", type=float)
@click.option("--slo-tpot-ms", type=float)
@click.option("--slo-e2el-ms", type=float)
@click.option("--label", default="", help="Free text stored in the row (e.g. the server's settings).")
@click.option("--out", type=click.Path(dir_okay=False), help="Append the run's JSON row here.")
def serve_load(endpoint: str | None, api_key: str | None, in_process: bool, model: str, adapter: str | None,
               engine: str, max_batch_size: int, batch_window_ms: float, task: str, n_requests: int,
               concurrency: int | None, rate: float | None, duration_s: float, max_tokens: int | None,
               temperature: float, n_samples: int, seed: int, slo_ttft_ms: float | None, slo_tpot_ms: float | None,
               slo_e2el_ms: float | None, label: str, out: str | None) -> None:
    """Load a server (or the in-process engine loop) and report TTFT/TPOT/ITL/E2EL, throughput, goodput."""
    from natix.bench.tasks import get_task
    from natix.engines.base import EngineConfig, SamplingSpec
    from natix.quant.models import load_tokenizer

    if bool(endpoint) == in_process:
        raise click.UsageError("give exactly one of --endpoint URL and --in-process")
    for name, value in (("--requests", n_requests), ("--concurrency", concurrency or 1), ("--n", n_samples)):
        if value < 1:
            raise click.BadParameter(f"must be >= 1, got {value}", param_hint=name)
    if rate is not None and rate <= 0:
        raise click.BadParameter(f"must be > 0, got {rate}", param_hint="--rate")
    try:
        t = get_task(task)
        spec = SamplingSpec(n=n_samples, temperature=temperature, max_tokens=max_tokens or t.max_tokens,
                            logprobs=False, seed=None)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    closers: list[Callable[[], None]] = []
    info: dict[str, Any] = {}
    if in_process:
        from natix.engines.serve.cli import load_engine
        from natix.engines.serve.loop import EngineLoop

        cfg = EngineConfig(model=model, adapter=adapter, device="auto", max_batch_size=max_batch_size)
        streaming, tokenizer, loaded, _ = load_engine(engine, cfg, window_s=batch_window_ms / 1e3)
        loop = EngineLoop(streaming).start()
        closers += [loaded.close, loop.stop]
        send = inprocess_sender(loop, tokenizer, task_prompts(t, tokenizer, n_requests, seed), spec)
        info = loaded.info() if hasattr(loaded, "info") else {}
    else:
        prompts = task_prompts(t, load_tokenizer(model), n_requests, seed)
        try:
            send, close = http_sender(str(endpoint), api_key, prompts, spec, concurrency or n_requests, model)
        except Exception as e:  # noqa: BLE001 - say which endpoint did not answer
            raise click.ClickException(f"cannot reach {endpoint}: {e}") from e
        closers.append(close)
    slo = {k: v for k, v in (("ttft", slo_ttft_ms), ("tpot", slo_tpot_ms), ("e2el", slo_e2el_ms)) if v is not None}
    meta = {"mode": "inprocess" if in_process else "http", "endpoint": endpoint, "label": label, "task": task,
            "model": model, "adapter": adapter, "engine": engine if in_process else None,
            "temperature": temperature, "n": n_samples, "max_tokens": spec.max_tokens}
    try:
        row = measure(send, n_requests, concurrency=concurrency, rate=rate, duration_s=duration_s, seed=seed,
                      slo_ms=slo, meta=meta, device=info.get("device"))
    finally:
        for close in reversed(closers):
            close()
    if out:
        append_row(out, row)
    click.echo(render(row))


def task_prompts(task: Any, tokenizer: Any, n: int, seed: int = 0) -> list[str]:
    """Up to 200 held-out items of ``task``, chat-formatted as natix-bench formats them."""
    from natix.engines.chat import apply_chat

    return [apply_chat(tokenizer, task.user_text(it), system=task.system)
            for it in task.items("eval", min(n, 200), seed=seed)]


def measure(send: Callable[[int], RequestRecord], n: int, *, concurrency: int | None, rate: float | None,
            duration_s: float, seed: int, slo_ms: dict[str, float], meta: dict[str, Any],
            device: str | None = None) -> dict[str, Any]:
    """One load run: ``meta`` + the load shape + :func:`summarize` + the environment."""
    from natix.bench.env import environment

    records, wall = run_load(send, n, concurrency=concurrency, rate=rate, duration_s=duration_s, seed=seed)
    return {**meta, "requests": n, "concurrency": concurrency, "rate": rate, **summarize(records, wall, slo_ms),
            "env": environment(device), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def render(row: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.1f}"

    lines = [f"{row['mode']} {row.get('label', '')}: {row['completed']} ok, {row['failed']} failed in {row['duration_s']:.1f} s; "
             f"{row['request_throughput']:.2f} req/s, {row['output_throughput']:.1f} output tok/s, "
             f"goodput {row['goodput']:.2f} req/s"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = row[key]
        lines.append(f"  {key:8s} mean {f(s['mean'])}  p50 {f(s['p50'])}  p90 {f(s['p90'])}  p99 {f(s['p99'])}")
    return "\n".join(lines)
