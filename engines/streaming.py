"""The streaming request interface: add a request, step the engine, read per-token deltas, cancel.

``Engine.generate(prompts, spec)`` is a batch call: it returns when every prompt is done. A server
needs more: requests arrive while others run, tokens go out as they are made, and a client that
hangs up must stop costing GPU time. An engine that can do that implements :class:`StreamingEngine`
(the natix engine does: requests join and leave its continuous batch at every step).

Contract:

- :meth:`StreamingEngine.add_request` validates at once and raises :class:`RequestError` (a
  ``ValueError``) for a request this engine can never run (prompt plus ``max_tokens`` over the
  context, more KV blocks than exist, an empty prompt); nothing is queued then, and other
  requests are untouched. It is safe to call from any thread while another thread steps.
- :meth:`StreamingEngine.step` runs one scheduler step and returns the deltas it produced: for
  each sample of each request that moved, the new token ids (with their raw-model logprobs), the
  new text, and on the sample's last delta its ``finish_reason`` and the whole :class:`Completion`
  (the same object ``generate`` would return for it). Text never contains a stop string: text that
  could still become one is held back until it cannot.
- :meth:`StreamingEngine.abort` (any thread) ends a request: its samples finish with
  ``finish_reason="abort"`` in a later step's deltas and their KV blocks are freed.
- One request's failure (an error inside its own processing) finishes it with
  ``finish_reason="error"`` and ``error`` set; the engine and the other requests go on.

This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from natix.engines.base import Completion, SamplingSpec

FINISH_REASONS = ("stop", "length", "abort", "error")


class RequestError(ValueError):
    """A request the engine refuses (too long for the context, more KV blocks than exist, empty)."""


@dataclass(frozen=True)
class RequestDelta:
    """What one step produced for sample ``index`` of request ``request_id``.

    ``token_ids``/``logprobs``: tokens generated since this sample's previous delta and their
    log-probabilities under the raw model distribution (None when the request asked for no
    logprobs). ``top_logprobs``: per new token, ``{token_id: logprob}`` of the
    ``spec.top_logprobs`` most likely tokens (None when not asked). ``text``: the new text.
    ``finish_reason`` is None while the sample runs; on its last delta it is one of
    :data:`FINISH_REASONS` and ``completion`` holds the finished sample.
    """

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    text: str
    finish_reason: str | None = None
    completion: Completion | None = None
    error: str | None = None
    top_logprobs: tuple[dict[int, float], ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def coalesce(deltas: Sequence[RequestDelta]) -> list[RequestDelta]:
    """Merge each sample's consecutive deltas into one (tokens, logprobs and text concatenated; the
    last one's finish), samples in order of first appearance. A consumer that fell behind the
    engine (a server writing one SSE event per delta under load) then writes one event per sample
    for what is waiting instead of one per step, at no cost in latency: only deltas that were
    already there are merged."""
    merged: dict[tuple[str, int], RequestDelta] = {}
    for d in deltas:
        key = (d.request_id, d.index)
        prev = merged.get(key)
        if prev is None or prev.finished:
            merged[key] = d  # a finished sample gets no later delta; keep the first if it does
            continue
        merged[key] = RequestDelta(
            d.request_id, d.index, prev.token_ids + d.token_ids,
            None if prev.logprobs is None or d.logprobs is None else prev.logprobs + d.logprobs,
            prev.text + d.text, d.finish_reason, d.completion, d.error,
            None if prev.top_logprobs is None or d.top_logprobs is None else prev.top_logprobs + d.top_logprobs)
    return list(merged.values())


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics: requests running and waiting, KV-cache blocks in use (0..1 of the
    cache), the cache's capacity in tokens, and counters since load."""

    running: int
    waiting: int
    kv_cache_usage: float
    kv_capacity_tokens: int
    preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_hit_tokens: int = 0


@runtime_checkable
class StreamingEngine(Protocol):
    """An engine that takes requests one at a time and reports tokens as they are made."""

    def add_request(self, prompt: str | Sequence[int], spec: SamplingSpec, request_id: str | None = None) -> str:
        """Queue a request (a prompt string, tokenized by the engine, or token ids); returns its
        id (``request_id`` or a new unique one). Raises :class:`RequestError` if it can never run."""
        ...

    def step(self) -> list[RequestDelta]:
        """Run one scheduler step (a prefill or a decode of the running batch); [] when idle."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancel a request (unknown or finished ids are ignored)."""
        ...

    def has_unfinished(self) -> bool:
        """Whether any request is waiting, running, or has deltas not yet returned by ``step``."""
        ...

    def stats(self) -> EngineStats: ...
