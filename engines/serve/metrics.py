"""Prometheus metrics for natix-serve, named as vLLM names them, under ``natix:``.

Dashboards for LLM servers are built on vLLM's ``vllm:*`` series; natix-serve exports the same
series, with the same meaning, buckets and ``model_name`` label, as ``natix:*`` (so a dashboard
moves over by renaming the prefix): ``num_requests_running``, ``num_requests_waiting``,
``kv_cache_usage_perc``, ``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``e2e_request_latency_seconds``, ``request_queue_time_seconds``, ``prompt_tokens_total``,
``generation_tokens_total``, ``request_success_total{finished_reason}``,
``num_preemptions_total``. Beyond vLLM's: ``request_rejected_total{reason}`` (429 / 503 / 400
answers) and ``test_time_samples_total`` (samples drawn for the ``natix`` extension).

Latencies are measured in the server, for every engine request (a client that hung up
included): TTFT from the request's submission to its first token leaving the engine; inter-token latency per token after the first
(a delta of k tokens that came t seconds after the previous one counts k tokens of t/k).
With an engine behind the batching adapter (hf, vllm) a sample's tokens arrive all at once, so
its TTFT is its whole generation time and it adds no inter-token samples: that is what a
streaming client of such an engine sees. Queue time is the engine's own report
(``Timing.queue_s``: the adapter's batching window and wait for a free call).

One registry per server (not prometheus-client's global one), so several servers can live in
one process (tests) without colliding.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerMetrics"]

PREFIX = "natix:"

# vLLM's buckets (vllm/v1/metrics/loggers.py), so histograms compare bucket for bucket.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """The server's series; engine gauges are read from ``stats()`` at each scrape."""

    def __init__(self, model_name: str, stats: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._stats = stats  # () -> EngineStats
        label = {"labelnames": ["model_name"], "registry": self.registry}
        m = model_name

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, doc, buckets=buckets, **label).labels(m)

        self.running = Gauge(PREFIX + "num_requests_running", "Requests in the engine's running batch.", **label).labels(m)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.", **label).labels(m)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage_perc", "KV-cache usage, 1 = full (0 for engines "
                              "without a paged cache).", **label).labels(m)
        self.preemptions = Counter(PREFIX + "num_preemptions", "Preemptions by the engine.", **label).labels(m)
        self._preempted_seen = 0
        self.ttft = hist("time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between generated tokens.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token.", REQUEST_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Time waiting before the engine started it.",
                          REQUEST_BUCKETS)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", **label).labels(m)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", **label).labels(m)
        self._success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._rejected = Counter(PREFIX + "request_rejected", "Requests refused before reaching the engine.",
                                 labelnames=["model_name", "reason"], registry=self.registry)
        self.tt_samples = Counter(PREFIX + "test_time_samples", "Samples drawn for the natix extension.",
                                  **label).labels(m)
        self._model = m
        self._live: dict[str, _Live] = {}

    def finished(self, reason: str) -> None:
        self._success.labels(self._model, reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self._model, reason).inc()

    def render(self) -> tuple[bytes, str]:
        """Refresh the engine gauges and return the exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self._stats is not None:
            s = self._stats()
            self.running.set(s.running)
            self.waiting.set(s.waiting)
            self.kv_usage.set(s.kv_cache_usage)
            if s.preemptions > self._preempted_seen:
                self.preemptions.inc(s.preemptions - self._preempted_seen)
                self._preempted_seen = s.preemptions
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


    def observe(self, request_id: str, deltas: Any, submitted: float, n: int, now: float) -> None:
        """One step's deltas for one engine request (called from the engine loop's thread, for
        every request, whether or not a client is still reading it). TTFT and end-to-end
        latency are per engine request from ``submitted``; inter-token latency per sample;
        finish reasons per sample (as vLLM counts each of n samples)."""
        st = self._live.setdefault(request_id, _Live(n))
        for d in deltas:
            k = len(d.token_ids)
            if k:
                self.generation_tokens.inc(k)
                if not st.first:
                    st.first = True
                    self.ttft.observe(now - submitted)
                prev = st.last.get(d.index)
                if prev is not None:
                    for _ in range(k):
                        self.itl.observe((now - prev) / k)
                st.last[d.index] = now
            if d.finished:
                self.finished(d.finish_reason)
                st.open -= 1
                if st.open == 0:
                    del self._live[request_id]
                    self.e2e.observe(now - submitted)
                    timing = d.completion.timing if d.completion is not None else None
                    if timing is not None and timing.queue_s is not None:
                        self.queue.observe(timing.queue_s)


class _Live:
    """Per engine request in flight: first token seen, each sample's last delta time, samples open."""

    def __init__(self, n: int) -> None:
        self.first = False
        self.last: dict[int, float] = {}
        self.open = n
