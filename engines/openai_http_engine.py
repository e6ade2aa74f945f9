"""The ``openai-http`` engine: the Engine protocol over any OpenAI-compatible server.

natix-serve, ``vllm serve``, SGLang's ``launch_server`` and llama.cpp's server all speak
``POST /v1/completions``; this engine sends each prompt there (``n``, ``temperature``,
``top_p``, ``top_k``, ``max_tokens``, ``stop``, ``seed`` and ``logprobs`` passed through),
streams the answer as server-sent events and times it from the stream: TTFT is the first token's
arrival after the request was sent, the per-token decode time is the rest of the stream over
the tokens after the first. Prompts of one ``generate`` call go concurrently (up to
``cfg.max_batch_size`` at a time), so the server can batch them.

Token ids: the engine asks for vLLM's ``return_token_ids`` (natix-serve and vLLM answer with
each choice's ids) and, with logprobs, ``return_tokens_as_token_ids`` (logprob tokens read
``token_id:<id>``). A server that gives neither (SGLang, llama.cpp) yields completions with
their text and logprobs; their ids are then the text re-encoded by a local tokenizer
(``cfg.extra["tokenizer"]``, else ``cfg.model`` when it names a model natix can load), which is
approximate (text need not re-encode to the ids the server sampled), or empty without one.

Robustness: ``429`` and ``503`` (a full queue, a draining server) and refused connections are
retried with exponential backoff and jitter, honouring ``Retry-After`` (tenacity); other errors
raise at once with the server's message. Timeouts: ``extra["timeout"]`` (s, default 600) per
read, 10 s to connect.

Configuration (``cfg.extra``, then the environment): ``endpoint`` (or ``OPENAI_BASE_URL``),
e.g. ``http://127.0.0.1:8000/v1``; ``api_key`` (or ``OPENAI_API_KEY``); ``served_model`` (else
``cfg.model`` if the server lists it, else the server's only model); ``retries`` (default 6);
``timeout``; ``tokenizer``.

``import natix.engines.openai_http_engine`` is cheap: httpx and tenacity load in ``load()``.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from natix.engines.base import Completion, EngineConfig, SamplingSpec, Timing, register_engine

__all__ = ["OpenAIHTTPEngine", "ServerError", "StreamedChoice", "StreamedRequest", "completion_body",
           "stream_completion", "retrying"]


class ServerError(RuntimeError):
    """The server answered an error (after retries, for the retryable ones)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.retry_after = status, retry_after


RETRYABLE_STATUS = (429, 503)


@dataclass
class StreamedChoice:
    """One choice as it streamed: text, token ids/logprobs, and ``(arrival time, tokens)`` per
    chunk that carried tokens."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    chunks: list[tuple[float, int]] = field(default_factory=list)
    ids_known: bool = False


@dataclass
class StreamedRequest:
    """A streamed ``/v1/completions`` answer; times are ``time.perf_counter()`` stamps."""

    sent: float
    first: float | None = None
    end: float = 0.0
    choices: dict[int, StreamedChoice] = field(default_factory=dict)
    usage: dict[str, int] | None = None

    @property
    def output_tokens(self) -> int:
        if self.usage and "completion_tokens" in self.usage:
            return int(self.usage["completion_tokens"])
        return sum(sum(k for _, k in c.chunks) for c in self.choices.values())


def completion_body(model: str, prompt: str, spec: SamplingSpec) -> dict[str, Any]:
    """The ``/v1/completions`` request for ``prompt`` sampled as ``spec`` (streamed, with usage)."""
    body: dict[str, Any] = {
        "model": model, "prompt": prompt, "n": spec.n, "max_tokens": spec.max_tokens,
        "temperature": spec.temperature, "top_p": spec.top_p, "stream": True,
        "stream_options": {"include_usage": True}, "return_token_ids": True,
    }
    if spec.top_k:
        body["top_k"] = spec.top_k
    if spec.stop:
        body["stop"] = list(spec.stop)
    if spec.seed is not None:
        body["seed"] = spec.seed
    if spec.logprobs or spec.top_logprobs:
        body["logprobs"] = spec.top_logprobs
        body["return_tokens_as_token_ids"] = True
    return body


def _token_id(token: str) -> int | None:
    return int(token[9:]) if token.startswith("token_id:") and token[9:].lstrip("-").isdigit() else None


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield data


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw)
        return str(err.get("error", {}).get("message") or err.get("message") or err)
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")[:500]


def retrying(retries: int) -> Any:
    """tenacity policy: retry 429/503 and refused connections, exponential backoff with jitter
    (0.1 s doubling to 5 s), at least the server's ``Retry-After`` (capped at 30 s)."""
    import httpx
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

    backoff = wait_exponential(multiplier=0.1, max=5.0) + wait_random(0, 0.1)

    def retryable(e: BaseException) -> bool:
        return (isinstance(e, ServerError) and e.status in RETRYABLE_STATUS) or isinstance(e, httpx.ConnectError)

    def wait(state: Any) -> float:
        e = state.outcome.exception() if state.outcome is not None else None
        after = getattr(e, "retry_after", None)
        return max(backoff(state), min(30.0, after)) if after else backoff(state)

    return Retrying(retry=retry_if_exception(retryable), wait=wait, stop=stop_after_attempt(retries + 1), reraise=True)


def stream_completion(client: Any, body: dict[str, Any], retries: int = 6) -> StreamedRequest:
    """POST ``body`` to ``/completions`` on ``client`` (an ``httpx.Client`` whose base URL ends
    in ``/v1``) and read the stream; raises :class:`ServerError` on an error answer."""
    for attempt in retrying(retries):
        with attempt:
            out = StreamedRequest(sent=time.perf_counter())
            with client.stream("POST", "/completions", json=body) as r:
                if r.status_code >= 400:
                    raise ServerError(r.status_code, _error_message(r.read()), _retry_after(r.headers))
                for data in _sse_data(r.iter_lines()):
                    _read_chunk(out, json.loads(data), time.perf_counter())
            out.end = time.perf_counter()
    return out


def _read_chunk(out: StreamedRequest, chunk: dict[str, Any], now: float) -> None:
    if "error" in chunk and not chunk.get("choices"):
        raise ServerError(500, str(chunk["error"].get("message", chunk["error"])))
    if chunk.get("usage"):
        out.usage = chunk["usage"]
    for c in chunk.get("choices") or ():
        ch = out.choices.setdefault(int(c.get("index", 0)), StreamedChoice())
        ch.text += c.get("text") or ""
        lp = c.get("logprobs") or {}
        tokens = lp.get("tokens") or []
        ids = c.get("token_ids")
        if ids is None and tokens:
            parsed = [_token_id(t) for t in tokens]
            ids = None if any(i is None for i in parsed) else parsed
        if ids is not None:
            ch.ids_known = True
            ch.token_ids.extend(int(i) for i in ids)
        ch.logprobs.extend(float(x) for x in lp.get("token_logprobs") or [] if x is not None)
        for top in lp.get("top_logprobs") or []:
            ch.top_logprobs.append({i: float(v) for t, v in (top or {}).items() if (i := _token_id(t)) is not None})
        k = len(ids) if ids is not None else (len(tokens) or (1 if c.get("text") else 0))
        if k:
            if out.first is None:
                out.first = now
            ch.chunks.append((now, k))
        if c.get("finish_reason"):
            ch.finish_reason = c["finish_reason"]


@register_engine("openai-http")
class OpenAIHTTPEngine:
    """See the module docstring. Beyond the protocol: :meth:`info`."""

    def __init__(self) -> None:
        self.client: Any = None
        self.model = ""
        self.endpoint = ""
        self.cfg: EngineConfig | None = None
        self._tokenizer: Any = None

    def load(self, cfg: EngineConfig) -> None:
        import httpx

        if cfg.adapter:
            raise ValueError("openai-http generates with what the server loaded: give the adapter to the server "
                             "(natix-serve --adapter), not to this engine")
        endpoint = cfg.extra.get("endpoint") or os.environ.get("OPENAI_BASE_URL")
        if not endpoint:
            raise ValueError("openai-http needs an endpoint: cfg.extra['endpoint'] or OPENAI_BASE_URL "
                             "(e.g. http://127.0.0.1:8000/v1)")
        endpoint = str(endpoint).rstrip("/")
        self.endpoint = endpoint if endpoint.endswith("/v1") else endpoint + "/v1"
        key = cfg.extra.get("api_key") or os.environ.get("OPENAI_API_KEY")
        self.retries = int(cfg.extra.get("retries", 6))
        timeout = float(cfg.extra.get("timeout", 600.0))
        self.concurrency = max(1, cfg.max_batch_size)
        self.client = httpx.Client(
            base_url=self.endpoint, headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))
        self.cfg = cfg
        served = self._models()
        wanted = cfg.extra.get("served_model")
        if wanted:
            if wanted not in served:
                raise ValueError(f"{self.endpoint} does not serve {wanted!r}; it serves {served}")
            self.model = wanted
        elif cfg.model in served:
            self.model = cfg.model
        elif len(served) == 1:
            self.model = served[0]
        else:
            raise ValueError(f"{self.endpoint} serves {served}: say which with cfg.extra['served_model']")

    def _models(self) -> list[str]:
        for attempt in retrying(self.retries):
            with attempt:
                r = self.client.get("/models")
                if r.status_code >= 400:
                    raise ServerError(r.status_code, _error_message(r.content), _retry_after(r.headers))
        return [m["id"] for m in r.json().get("data", [])]

    def _fallback_tokenizer(self) -> Any:
        """For servers that return no token ids (loaded on first need; None if none loads)."""
        if self._tokenizer is None and self.cfg is not None:
            from natix.quant.models import load_tokenizer

            spec = str(self.cfg.extra.get("tokenizer") or self.cfg.model)
            try:
                self._tokenizer = load_tokenizer(spec)
            except Exception:  # noqa: BLE001 - a served name, not a local model: no ids then
                self._tokenizer = False
        return self._tokenizer or None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def info(self) -> dict[str, Any]:
        return {"engine": "openai-http", "endpoint": self.endpoint, "model": self.model, "device": None}

    def generate(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[Completion]]:
        if self.client is None:
            raise RuntimeError("OpenAIHTTPEngine.generate called before load()")
        if isinstance(prompts, str):
            raise TypeError("generate takes a sequence of prompts, not a single string")
        bodies = [completion_body(self.model, p, spec) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(bodies)))) as pool:
            streamed = list(pool.map(lambda b: stream_completion(self.client, b, self.retries), bodies))
        return [self._completions(s, spec) for s in streamed]

    def _completions(self, s: StreamedRequest, spec: SamplingSpec) -> list[Completion]:
        if sorted(s.choices) != list(range(spec.n)):
            raise ServerError(502, f"the server sent choices {sorted(s.choices)} for n={spec.n}")
        longest = max(sum(k for _, k in c.chunks) for c in s.choices.values())
        last = max((c.chunks[-1][0] for c in s.choices.values() if c.chunks), default=s.end)
        first = s.first if s.first is not None else s.end
        timing = Timing(ttft_s=first - s.sent, decode_s_per_token=(last - first) / (longest - 1) if longest > 1 else 0.0,
                        total_s=s.end - s.sent)
        out = []
        for i in range(spec.n):
            c = s.choices[i]
            ids = c.token_ids
            if not c.ids_known and (tok := self._fallback_tokenizer()) is not None:
                ids = tok(c.text, add_special_tokens=False).input_ids
            out.append(Completion(
                text=c.text, token_ids=tuple(ids),
                token_logprobs=tuple(c.logprobs) if spec.logprobs else None,
                finish_reason="length" if c.finish_reason == "length" else "stop", timing=timing,
                top_logprobs=tuple(c.top_logprobs) if spec.top_logprobs and c.top_logprobs else None))
        return out
