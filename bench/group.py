"""Run one draw group (one engine load) and report through ``emit``: its draws, every strategy's
decision on them, and a row per cell. This is what a worker process (:mod:`natix.bench.worker`)
runs; ``natix-quant eval`` and tests may run it in process.

Events (dicts, JSON-able): ``{"event": "phase", "what": ...}`` (export, load), ``{"event":
"progress", "done": k}`` (k more samples generated, or layers exported), ``{"event": "rows",
"rows": [...]}`` (a draw's cells, written by the parent as they come), ``{"event": "log",
"message": ...}``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

Emit = Callable[[dict[str, Any]], None]


def run_group(job: dict[str, Any], emit: Emit) -> None:
    """``job``: ``matrix`` (``Matrix.to_dict()``), ``group`` (its key), ``draws`` (list of
    ``{"temperature": float | None, "labels": [strategy spec as written]}``), ``settings``."""
    from natix.bench import artifacts
    from natix.bench.draw import draw
    from natix.bench.env import environment
    from natix.bench.metrics import cell_metrics, latency
    from natix.bench.matrix import Matrix
    from natix.bench.plan import describe, effective_kv, plan
    from natix.engines.base import EngineConfig, SamplingSpec
    from natix.quant.models import load_tokenizer
    from natix.scaling import decide_all, parse_strategy

    m = Matrix.from_dict(job["matrix"])
    (g,) = [x for x in plan(m).groups if x.key == job["group"]]
    task = m.load_task()
    items = task.items("eval", m.items, seed=m.seed)
    tok = load_tokenizer(m.model)
    shots = task.shots(g.few_shot, seed=m.seed) if g.few_shot else []
    prompts = [task.prompt(tok, it, shots) for it in items]
    by_prompt = {p: it for p, it in zip(prompts, items)}
    prompt_tokens = _prompt_tokens(tok, prompts)

    def verifier(prompt: str, text: str) -> float:
        return float(task.verify(by_prompt[prompt], text))

    load = artifacts.resolve(m, g.variant, g.scheme, g.kv)
    if load.export is not None:
        emit({"event": "phase", "what": f"export {g.scheme.kind} of {g.variant.name} into the artifact cache",
              "unit": "layers"})
        artifacts.run_export(load.export, progress=lambda i, n, name: emit({"event": "progress", "done": 1, "total": n}),
                             say=lambda msg: emit({"event": "log", "message": msg}))
    from natix.quant.loader import quantized_scheme

    weights = quantized_scheme(load.model) or "dense"  # what was loaded (an artifact given as --model too)
    kv = effective_kv(g.scheme, g.kv)
    extra = dict(m.engine_options.get(g.engine, {}))
    if g.engine == "natix":
        if g.kv in ("none", "int4"):
            extra["kv_cache"] = g.kv
        extra.setdefault("max_num_seqs", g.batch_size)  # the batch-size axis (its own default is 256 on CUDA)
    cfg = EngineConfig(model=load.model, adapter=load.adapter, device=m.device, dtype=load.dtype,
                       max_batch_size=g.batch_size, kv_press=kv if kv not in ("none", "int4", "fp8") else None,
                       extra=extra)
    emit({"event": "phase", "what": f"load {g.key}", "unit": None})
    t0 = time.perf_counter()
    engine = _load_engine(m.python_for(g.engine), g.engine, cfg)
    load_s = time.perf_counter() - t0
    max_tokens = g.max_tokens or task.max_tokens
    base_spec = SamplingSpec(n=1, temperature=0.0, max_tokens=max_tokens, seed=m.seed, top_p=m.top_p, top_k=m.top_k)
    try:
        for d in job["draws"]:
            strategies = [(label, parse_strategy(label, extractor=task.extractor,
                                                 verifier=verifier if task.has_verifier else None))
                          for label in d["labels"]]
            temp = d["temperature"]
            n = 1 if temp is None else max(s.budget for _, s in strategies)
            spec = base_spec.replace(n=n, temperature=temp or 0.0)
            emit({"event": "phase", "what": f"{g.key} {'greedy' if temp is None else f'T={temp:g} n={n}'}",
                  "unit": "samples", "total": len(prompts) * n})
            _reset_peak_memory()
            dr = draw(engine, prompts, spec, g.batch_size, lambda k: emit({"event": "progress", "done": k}))
            dr.correct = [sum(task.is_correct(task.extract(x.text), it) for x in comps)
                          for comps, it in zip(dr.completions, items)]
            decided = decide_all([s for _, s in strategies], dr.completions, prompts)
            info = engine.info() if hasattr(engine, "info") else {}
            env = environment(info.get("device"))
            env.update(info.get("worker_versions") or {})  # the engine's venv, when it ran elsewhere
            env["torch_threads"] = _torch_threads()
            shared = latency(dr)
            peak = _peak_memory()
            rows = []
            for label, s in strategies:
                key = f"{g.key}/T={temp or 0.0:g}/{s.spec()}"
                rows.append({"key": key, "status": "ok", "matrix": m.name, "settings": job["settings"], **describe(g, kv),
                             "temperature": temp or 0.0, "strategy": s.spec(), "label": label, "task": task.name,
                             "max_tokens": max_tokens, "weights": weights, **cell_metrics(task, items, decided[s.spec()], dr), **shared,
                             "prompt_tokens_mean": prompt_tokens, "load_s": load_s,
                             "peak_gpu_bytes": peak, "engine_info": _jsonable(info), "env": env,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            emit({"event": "rows", "rows": rows})
    finally:
        engine.close()


def _load_engine(python: str | None, name: str, cfg: Any) -> Any:
    if python:
        from natix.engines.worker import RemoteEngine

        engine = RemoteEngine(python=python, engine=name)
    else:
        from natix.engines.base import create_engine

        engine = create_engine(name)
    try:
        engine.load(cfg)
    except BaseException:
        engine.close()
        raise
    return engine


def _torch_threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _prompt_tokens(tok: Any, prompts: list[str]) -> float:
    return sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts) / len(prompts)


def _reset_peak_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> int | None:
    """Peak CUDA memory of this process during the draw (None on CPU, or when the engine ran in
    another process: its own info() says what it knows)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))
