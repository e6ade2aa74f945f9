"""One draw: every prompt through a loaded engine, with progress per generated sample.

How progress is counted depends on what the engine offers, never on a guess:

- an engine with the streaming interface (``add_request`` / ``step``, the natix engine) runs all
  prompts at once in its continuous batch and reports each sample as it finishes; the token
  arrival times also give the real inter-token latencies (ITL);
- an engine with a ``progress`` hook (the hf engine) calls it as rows finish inside its batches;
- any other engine (vllm, openai-http, a worker process) is called in chunks of ``batch_size``
  rows, the batch it would run anyway, and progress moves per chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class Draw:
    """One engine call's output for all items, with timing."""

    completions: list[list[Any]]  # [item][sample] Completion
    wall_s: float
    itl_s: list[float] = field(default_factory=list)  # inter-token gaps where the engine streams
    correct: list[int] = field(default_factory=list)  # [item] right samples, graded once per draw


def _streaming(engine: Any) -> bool:
    return callable(getattr(engine, "add_request", None)) and callable(getattr(engine, "step", None))


def draw(engine: Any, prompts: Sequence[str], spec: Any, batch_size: int, advance: Callable[[int], None]) -> Draw:
    """Generate ``spec.n`` samples per prompt; ``advance(k)`` after each k finished samples."""
    t0 = time.perf_counter()
    if _streaming(engine):
        comps, itl = _stream(engine, prompts, spec, advance)
        return Draw(comps, time.perf_counter() - t0, itl)
    if hasattr(engine, "progress"):
        engine.progress = advance
        try:
            out = engine.generate(list(prompts), spec)
        finally:
            engine.progress = None
        return Draw(out, time.perf_counter() - t0)
    out: list[list[Any]] = []
    chunk = max(1, batch_size // spec.n)
    for i in range(0, len(prompts), chunk):
        part = list(prompts[i:i + chunk])
        out.extend(engine.generate(part, spec))
        advance(len(part) * spec.n)
    return Draw(out, time.perf_counter() - t0)


def _stream(engine: Any, prompts: Sequence[str], spec: Any, advance: Callable[[int], None]) -> tuple[list, list]:
    """All prompts into the engine's batch, step until done; per sample its token arrival times."""
    ids: list[str] = []
    try:
        for i, p in enumerate(prompts):
            try:
                ids.append(engine.add_request(p, spec))
            except ValueError as e:  # RequestError: this prompt can never run here
                raise ValueError(f"prompt {i}: {e}") from e
        index = {rid: i for i, rid in enumerate(ids)}
        done: dict[tuple[int, int], Any] = {}
        last: dict[tuple[int, int], float] = {}
        itl: list[float] = []
        while len(done) < len(ids) * spec.n:
            if not engine.has_unfinished():  # pragma: no cover - would be an engine bug
                raise RuntimeError(f"{type(engine).__name__}: requests were lost (nothing left to run)")
            deltas = engine.step()
            now = time.perf_counter()
            finished = 0
            for d in deltas:
                if d.request_id not in index:
                    continue
                k = (index[d.request_id], d.index)
                if d.token_ids:
                    if k in last:  # gaps after the first token; a delta of m tokens counts m gaps
                        itl.extend([(now - last[k]) / len(d.token_ids)] * len(d.token_ids))
                    last[k] = now
                if d.finish_reason == "error":
                    raise RuntimeError(f"generation failed: {d.error or 'unknown error'}")
                if d.completion is not None and k not in done:
                    done[k] = d.completion
                    finished += 1
            if finished:
                advance(finished)
    except BaseException:
        for rid in ids:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        raise
    return [[done[(i, j)] for j in range(spec.n)] for i in range(len(ids))], itl
