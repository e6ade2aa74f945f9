"""A :class:`~natix.engines.streaming.StreamingEngine` over any batch ``Engine.generate``.

The hf and vLLM engines (and :class:`~natix.engines.worker.RemoteEngine`) only have
``generate(prompts, spec)``: a call that returns when every prompt is done. natix-serve drives
the streaming interface, so this adapter gives those engines one:

- ``add_request`` queues; ``step`` waits a short *batching window* (from the oldest queued
  request's arrival), takes the queued requests that share the oldest one's
  :class:`~natix.engines.base.SamplingSpec` (up to ``max_batch_rows`` samples), runs them as
  one ``generate`` call and returns each sample's tokens as one delta. Requests that arrive
  while a call runs queue up and go together in the next one, so under load batches fill by
  themselves.
- A request with a ``seed`` runs alone: the hf engine draws a whole batch from one generator,
  so only a batch of one makes a seeded request reproducible whatever else is in flight.
- ``abort`` drops a queued request at once (its abort deltas come with the next ``step``); a
  running one's result is discarded when its call returns (a batch call cannot be cut short).
- If a batch call raises, its requests are retried one by one, so a request that fails only
  fails itself (``finish_reason="error"``), and the adapter goes on.

Thread safety: ``add_request``, ``abort``, ``has_unfinished`` and ``stats`` may be called from
any thread while one thread calls ``step``.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from natix.engines.base import Completion, Engine, SamplingSpec
from natix.engines.streaming import EngineStats, RequestDelta, RequestError

__all__ = ["BatchingAdapter"]


@dataclass
class _Queued:
    id: str
    prompt: str
    spec: SamplingSpec
    added: float
    aborted: bool = False


class BatchingAdapter:
    """``StreamingEngine`` over ``engine.generate`` with a batching window of ``window_s``.

    ``max_batch_rows``: most samples (sum of ``spec.n``) per ``generate`` call; a single
    request larger than that still runs (alone). ``tokenizer``: only needed to accept prompts
    given as token ids (they are decoded to text, which the engine tokenizes again).
    """

    def __init__(self, engine: Engine, *, window_s: float = 0.005, max_batch_rows: int = 64,
                 tokenizer: Any = None) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.engine = engine
        self.window_s = window_s
        self.max_batch_rows = max_batch_rows
        self.tokenizer = tokenizer
        self._cv = threading.Condition()
        self._waiting: OrderedDict[str, _Queued] = OrderedDict()
        self._running: dict[str, _Queued] = {}
        self._ready: list[RequestDelta] = []  # abort deltas of requests dropped from the queue
        self._ids = itertools.count()
        self._generation_tokens = 0
        self.batches = 0  # generate calls made (for tests and logs)

    # ------------------------------------------------------------------ StreamingEngine
    def add_request(self, prompt: str | Sequence[int], spec: SamplingSpec, request_id: str | None = None) -> str:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty")
            text = prompt
        else:
            ids = [int(t) for t in prompt]
            if not ids:
                raise RequestError("the prompt is empty")
            if self.tokenizer is None:
                raise RequestError(f"engine {getattr(self.engine, 'name', '?')!r} takes prompt text, not token ids")
            text = self.tokenizer.decode(ids)
        with self._cv:
            rid = request_id if request_id is not None else f"adapter-{next(self._ids)}"
            if rid in self._waiting or rid in self._running:
                raise RequestError(f"request id {rid!r} is already in use")
            self._waiting[rid] = _Queued(rid, text, spec, time.perf_counter())
            self._cv.notify_all()
        return rid

    def abort(self, request_id: str) -> None:
        with self._cv:
            queued = self._waiting.pop(request_id, None)
            if queued is not None:
                self._ready.extend(_finished(queued, "abort"))
                self._cv.notify_all()
            elif request_id in self._running:
                self._running[request_id].aborted = True

    def has_unfinished(self) -> bool:
        with self._cv:
            return bool(self._waiting or self._running or self._ready)

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(running=len(self._running), waiting=len(self._waiting), kv_cache_usage=0.0,
                               kv_capacity_tokens=0, generation_tokens=self._generation_tokens)

    def step(self) -> list[RequestDelta]:
        with self._cv:
            batch = self._wait_for_batch()
            if not batch:
                out, self._ready = self._ready, []
                return out
            for q in batch:
                del self._waiting[q.id]
                self._running[q.id] = q
        started = time.perf_counter()
        results = self._generate(batch)
        with self._cv:
            out = []
            for q, res in zip(batch, results):
                del self._running[q.id]
                if q.aborted:
                    out.extend(_finished(q, "abort"))
                elif isinstance(res, Exception):
                    out.extend(_finished(q, "error", f"{type(res).__name__}: {res}"))
                else:
                    out.extend(self._deltas(q, res, queue_s=started - q.added))
            out.extend(self._ready)
            self._ready = []
        return out

    # ------------------------------------------------------------------ internals
    def _pick(self) -> list[_Queued]:
        """The oldest request and the queued ones that can share its generate call."""
        first = next(iter(self._waiting.values()))
        if first.spec.seed is not None:
            return [first]
        batch, rows = [first], first.spec.n
        for q in itertools.islice(self._waiting.values(), 1, None):
            if q.spec == first.spec and rows + q.spec.n <= self.max_batch_rows:
                batch.append(q)
                rows += q.spec.n
        return batch

    def _wait_for_batch(self) -> list[_Queued]:
        """Called with the lock held: wait out the window (or until the batch is full)."""
        while self._waiting:
            batch = self._pick()
            deadline = batch[0].added + self.window_s
            now = time.perf_counter()
            full = sum(q.spec.n for q in batch) >= self.max_batch_rows or batch[0].spec.seed is not None
            if full or now >= deadline:
                return batch
            self._cv.wait(deadline - now)
        return []

    def _generate(self, batch: list[_Queued]) -> list[list[Completion] | Exception]:
        spec = batch[0].spec
        self.batches += 1
        try:
            res = self.engine.generate([q.prompt for q in batch], spec)
            if len(res) != len(batch) or any(len(r) != spec.n for r in res):
                raise RuntimeError(f"engine returned {[len(r) for r in res]} completions for "
                                   f"{len(batch)} prompts of n={spec.n}")
            return list(res)
        except Exception as e:  # noqa: BLE001 - isolate the failing request below
            if len(batch) == 1:
                return [e]
        return [self._generate([q])[0] for q in batch]

    def _deltas(self, q: _Queued, completions: list[Completion], queue_s: float) -> list[RequestDelta]:
        out = []
        for i, c in enumerate(completions):
            if c.timing is not None:
                c = dataclasses.replace(c, timing=dataclasses.replace(c.timing, queue_s=queue_s))
            self._generation_tokens += c.num_tokens
            out.append(RequestDelta(q.id, i, c.token_ids, c.token_logprobs, c.text, c.finish_reason,
                                    completion=c, top_logprobs=c.top_logprobs))
        return out


def _finished(q: _Queued, reason: str, error: str | None = None) -> list[RequestDelta]:
    """Empty last deltas for every sample of ``q`` (aborted or failed before any token)."""
    lps = () if q.spec.logprobs else None
    done = Completion(text="", token_ids=(), token_logprobs=lps, finish_reason=reason)
    return [RequestDelta(q.id, i, (), lps, "", reason, completion=done, error=error) for i in range(q.spec.n)]
