"""The engine loop: one thread steps a :class:`~natix.engines.streaming.StreamingEngine` and hands
each request its deltas.

Why a thread: ``step()`` is blocking compute (a forward pass, or a whole ``generate`` call through
:class:`~natix.engines.serve.adapter.BatchingAdapter`); run on the event loop it would stall every
connection. The thread sleeps while the engine is idle and wakes when a request arrives.

Consumers: :meth:`EngineLoop.submit` takes a *sink*, a callable the loop thread calls with each
step's deltas for that request. :class:`Submission` is the asyncio consumer (the sink puts deltas
on an ``asyncio.Queue`` through ``call_soon_threadsafe``); :class:`LoopEngine` is the
``Engine.generate`` facade over the loop that the test-time strategies run on, so a maj@8 request
shares the batch with everyone else.

Failure containment: a request that fails inside the engine finishes with ``finish_reason="error"``
(the engine's contract). If ``step()`` itself raises, every request in flight is aborted and
finished with an error, and the loop goes on with the next request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, ClassVar, Sequence

from natix.engines.base import Completion, EngineConfig, SamplingSpec
from natix.engines.streaming import RequestDelta, StreamingEngine, coalesce

__all__ = ["EngineLoop", "Submission", "LoopEngine", "RequestFailed"]

log = logging.getLogger("natix.serve")

Sink = Callable[[list[RequestDelta]], None]
Observer = Callable[[str, list[RequestDelta], float, int, float], None]


class RequestFailed(RuntimeError):
    """A request finished with ``finish_reason`` ``error`` (or was aborted) inside the engine."""


@dataclass
class _Subscriber:
    sink: Sink
    n: int
    lps: bool
    open: set[int]  # sample indices not finished yet
    submitted: float


class EngineLoop:
    """Steps ``engine`` in a background thread; see the module docstring. ``observer(request_id,
    deltas, submitted, n, now)`` sees every request's deltas first, in the loop thread (metrics:
    it counts requests whose client has gone too)."""

    def __init__(self, engine: StreamingEngine, *, observer: Observer | None = None, idle_poll_s: float = 0.05) -> None:
        self.engine = engine
        self._observer = observer
        self._subs: dict[str, _Subscriber] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_poll_s = idle_poll_s
        self._thread = threading.Thread(target=self._run, name="natix-engine-loop", daemon=True)
        self.step_errors = 0

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._subs)

    def submit(self, prompt: str | Sequence[int], spec: SamplingSpec, sink: Sink, request_id: str | None = None) -> str:
        """Add a request; ``sink`` gets its deltas (from the loop thread) until every sample has
        finished. Raises :class:`~natix.engines.streaming.RequestError` as ``add_request`` does."""
        rid = request_id or uuid.uuid4().hex
        with self._lock:  # registered before the loop thread can dispatch anything for it
            self.engine.add_request(prompt, spec, rid)
            self._subs[rid] = _Subscriber(sink, spec.n, spec.logprobs, set(range(spec.n)), time.perf_counter())
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        """Cancel; the request's remaining samples still arrive, with ``finish_reason="abort"``."""
        self.engine.abort(request_id)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(self._idle_poll_s)
                self._wake.clear()
                continue
            try:
                deltas = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the engine broke; fail what is in flight, go on
                self.step_errors += 1
                log.exception("engine step failed; failing %d request(s) in flight", self.in_flight)
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                continue
            if deltas:
                self._dispatch(deltas)

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        by_request: dict[str, list[RequestDelta]] = {}
        for d in deltas:
            by_request.setdefault(d.request_id, []).append(d)
        for rid, ds in by_request.items():
            with self._lock:
                sub = self._subs.get(rid)
                if sub is None:
                    continue
                for d in ds:
                    if d.finished:
                        sub.open.discard(d.index)
                if not sub.open:
                    del self._subs[rid]
            self._deliver(rid, sub, ds)

    def _deliver(self, rid: str, sub: _Subscriber, ds: list[RequestDelta]) -> None:
        if self._observer is not None:
            try:
                self._observer(rid, ds, sub.submitted, sub.n, time.perf_counter())
            except Exception:  # noqa: BLE001 - metrics must not stop the loop
                log.exception("the delta observer failed")
        _call(sub.sink, ds)

    def _fail_all(self, error: str) -> None:
        with self._lock:
            subs, self._subs = self._subs, {}
        for rid, sub in subs.items():
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001
                log.exception("abort of %s after a failed step failed", rid)
            lps = () if sub.lps else None
            done = Completion(text="", token_ids=(), token_logprobs=lps, finish_reason="error")
            self._deliver(rid, sub, [RequestDelta(rid, i, (), lps, "", "error", completion=done, error=error)
                                     for i in sorted(sub.open)])


def _call(sink: Sink, deltas: list[RequestDelta]) -> None:
    try:
        sink(deltas)
    except Exception:  # noqa: BLE001 - a consumer's bug must not stop the loop
        log.exception("a request's delta sink failed")


class Submission:
    """Prompts sharing one spec, in the loop, read from asyncio: ``async for deltas in sub``
    yields each step's deltas for them until every sample finished; ``sub.index[d.request_id]``
    is a delta's prompt. Create it inside the running event loop. If a prompt is refused
    (``RequestError``), the ones already added are aborted and the error propagates."""

    def __init__(self, loop: EngineLoop, prompts: Sequence[str | Sequence[int]], spec: SamplingSpec,
                 request_id: str | None = None) -> None:
        aloop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list[RequestDelta]] = asyncio.Queue()
        self._loop = loop
        self.index: dict[str, int] = {}
        self._open: set[tuple[str, int]] = set()

        def sink(ds: list[RequestDelta]) -> None:
            aloop.call_soon_threadsafe(self._queue.put_nowait, ds)

        for i, p in enumerate(prompts):
            rid = f"{request_id or uuid.uuid4().hex}-{i}"
            try:
                loop.submit(p, spec, sink, rid)
            except Exception:
                self.abort()
                raise
            self.index[rid] = i
            self._open.update((rid, j) for j in range(spec.n))

    @property
    def finished(self) -> bool:
        return not self._open

    async def __aiter__(self) -> AsyncIterator[list[RequestDelta]]:
        """Each iteration: everything the loop delivered since the last one, one delta per sample
        (:func:`~natix.engines.streaming.coalesce`): under load a reader that fell behind catches
        up in one step instead of one per engine step."""
        while self._open:
            ds = list(await self._queue.get())
            while not self._queue.empty():
                ds.extend(self._queue.get_nowait())
            ds = coalesce(ds)
            for d in ds:
                if d.finished:
                    self._open.discard((d.request_id, d.index))
            yield ds

    def abort(self) -> None:
        for rid in {rid for rid, _ in self._open}:
            self._loop.abort(rid)


class LoopEngine:
    """``Engine.generate`` over an :class:`EngineLoop` (blocking; call it from a worker thread).

    Each prompt becomes one request in the loop, so strategies that draw in rounds (adaptive
    voting) batch with the server's other traffic. :meth:`cancel` aborts what is in flight and
    makes later ``generate`` calls raise :class:`RequestFailed` (a client that hung up).
    """

    name: ClassVar[str] = "loop"

    def __init__(self, loop: EngineLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._cancelled = False
        self.samples = 0  # finished samples drawn, and their tokens (usage, metrics)
        self.tokens = 0

    def load(self, cfg: EngineConfig) -> None:  # pragma: no cover - the loop's engine is loaded
        raise RuntimeError("LoopEngine serves an already loaded engine")

    def close(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            ids = list(self._in_flight)
        for rid in ids:
            self._loop.abort(rid)

    def generate(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[Completion]]:
        inbox: queue.Queue[list[RequestDelta]] = queue.Queue()
        ids = []
        with self._lock:
            if self._cancelled:
                raise RequestFailed("request cancelled")
            for p in prompts:
                rid = self._loop.submit(p, spec, inbox.put)
                ids.append(rid)
                self._in_flight.add(rid)
        done: dict[str, dict[int, RequestDelta]] = {rid: {} for rid in ids}
        remaining = len(ids) * spec.n
        try:
            while remaining:
                for d in inbox.get():
                    if d.finished:
                        done[d.request_id][d.index] = d
                        remaining -= 1
        finally:
            with self._lock:
                self._in_flight.difference_update(ids)
        out = []
        for rid in ids:
            per = [done[rid][i] for i in range(spec.n)]
            bad = [d for d in per if d.finish_reason in ("error", "abort")]
            if bad:
                raise RequestFailed(bad[0].error or f"request {bad[0].finish_reason}ed")
            out.append([_completion(d) for d in per])
        self.samples += sum(len(per) for per in out)
        self.tokens += sum(c.num_tokens for per in out for c in per)
        return out


def _completion(d: RequestDelta) -> Completion:
    assert d.completion is not None, "a finished delta carries its completion"
    return d.completion

