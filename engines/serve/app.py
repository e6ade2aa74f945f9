"""The HTTP layer: FastAPI routes over an :class:`~natix.engines.serve.loop.EngineLoop`.

A request is parsed (pydantic), checked (model, limits, context), admitted (a bounded number in
flight: past it ``429`` with ``Retry-After``; while draining ``503``), handed to the engine loop,
and answered whole or streamed as server-sent events. Its deltas feed the Prometheus series on
the way out. A client that hangs up aborts its request in the engine; a request past the
timeout is aborted and answered ``504`` (or an error event, when streaming). Any exception in a
request's own handling is a ``500`` for that request alone.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``POST /tokenize``, ``POST /detokenize`` (these need the API key when one is set),
``GET /health``, ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from natix.engines.base import SamplingSpec
from natix.engines.serve.loop import EngineLoop, LoopEngine, RequestFailed, Submission
from natix.engines.serve.metrics import ServerMetrics
from natix.engines.serve.prompts import Tokens
from natix.engines.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    now,
    usage,
)
from natix.engines.serve.voting import plan_strategy, summary
from natix.engines.streaming import RequestDelta, RequestError, StreamingEngine

__all__ = ["ServerConfig", "build_app"]

log = logging.getLogger("natix.serve")
access_log = logging.getLogger("natix.serve.access")


@dataclass(frozen=True)
class ServerConfig:
    """Limits and identity. ``max_running + max_queue`` engine requests (prompts) may be in
    flight; ``max_tokens_limit``/``max_n`` cap each request; prompts plus ``max_tokens`` must
    fit ``max_model_len``."""

    model_name: str
    max_model_len: int
    max_tokens_limit: int = 4096
    max_n: int = 16
    max_running: int = 64
    max_queue: int = 64
    request_timeout_s: float = 600.0
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    retry_after_s: int = 1
    engine: str = "?"


@dataclass
class _State:
    loop: EngineLoop
    tokens: Tokens
    metrics: ServerMetrics
    cfg: ServerConfig
    voting_pool: ThreadPoolExecutor
    in_flight: int = 0
    draining: bool = False
    on_close: list[Callable[[], None]] = field(default_factory=list)

    def admit(self, k: int) -> None:
        cfg = self.cfg
        retry = {"Retry-After": str(cfg.retry_after_s)}
        if self.draining:
            self.metrics.rejected("draining")
            raise APIError(503, "the server is shutting down; retry on another replica", headers=retry)
        if self.in_flight + k > cfg.max_running + cfg.max_queue:
            self.metrics.rejected("queue_full")
            raise APIError(429, f"the server is at capacity ({self.in_flight} requests in flight, "
                           f"{cfg.max_running} running + {cfg.max_queue} queued); retry later",
                           code="queue_full", headers=retry)
        self.in_flight += k


def build_app(engine: StreamingEngine, tokenizer: Any, cfg: ServerConfig,
              on_close: Callable[[], None] | None = None) -> FastAPI:
    """The natix-serve app over ``engine`` (any StreamingEngine; wrap batch engines in
    :class:`~natix.engines.serve.adapter.BatchingAdapter`). The engine loop starts with the app
    and stops with it; ``on_close`` (e.g. closing the engine) runs after."""
    metrics = ServerMetrics(cfg.model_name, engine.stats)
    loop = EngineLoop(engine, observer=metrics.observe)
    state = _State(loop, Tokens(tokenizer, cfg.max_model_len), metrics, cfg,
                   ThreadPoolExecutor(max_workers=max(2, cfg.max_running), thread_name_prefix="natix-vote"))
    if on_close is not None:
        state.on_close.append(on_close)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:
            loop.stop()
            state.voting_pool.shutdown(wait=False, cancel_futures=True)
            for fn in state.on_close:
                fn()

    app = FastAPI(title="natix-serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.natix = state
    app.add_middleware(_AccessLog)
    _install_error_handlers(app, state)

    async def authorized(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: constant time in the key, so timing does not leak how much matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def body_size(request: Request) -> None:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {length} bytes is over this server's {cfg.max_body_bytes}")

    guarded = [Depends(authorized), Depends(body_size)]

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "in_flight": state.in_flight})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": cfg.model_name, "object": "model", "created": now(), "owned_by": "natix",
            "max_model_len": cfg.max_model_len, "engine": cfg.engine}]}

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        _check_model(cfg, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of 'prompt' and 'messages'", param="prompt")
        text = req.prompt if req.prompt is not None else state.tokens.chat_prompt(req.messages or [])
        ids = await asyncio.to_thread(
            lambda: state.tokens.tokenizer(text, add_special_tokens=req.add_special_tokens).input_ids)
        return {"count": len(ids), "max_model_len": cfg.max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        _check_model(cfg, req.model)
        vocab = len(state.tokens.tokenizer)
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": state.tokens.decode(req.tokens)}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        _check(cfg, req)
        prompts = _prompt_list(req.prompt)
        if len(prompts) > cfg.max_running:
            raise APIError(400, f"{len(prompts)} prompts in one request; at most {cfg.max_running}", param="prompt")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs needs prompt logprobs, which natix-serve does not compute",
                           param="echo")
        ids = await asyncio.to_thread(lambda: [state.tokens.checked_prompt(p, "prompt") for p in prompts])
        call = _Call(request, "completion", cfg, state.tokens, req, len(prompts))
        spec = _spec(req, _max_tokens(cfg, req.max_tokens, ids, "max_tokens"),
                     logprobs=req.logprobs is not None, top=req.logprobs or 0, cfg=cfg)
        texts = [p if isinstance(p, str) else state.tokens.decode(p) for p in prompts]
        call.echo = texts if req.echo else None
        if req.natix is not None:
            if len(prompts) != 1:
                raise APIError(400, "the natix extension takes one prompt", param="prompt")
            return await _vote(state, call, request, texts[0], ids[0], spec)
        return await _serve(state, call, request, prompts, ids, spec)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        _check(cfg, req)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        prompt = state.tokens.chat_prompt(req.messages)
        ids = await asyncio.to_thread(state.tokens.checked_prompt, prompt, "messages")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = _max_tokens(cfg, req.max_completion_tokens or req.max_tokens, [ids], param)
        call = _Call(request, "chat", cfg, state.tokens, req, 1)
        spec = _spec(req, max_tokens, logprobs=req.logprobs, top=req.top_logprobs or 0, cfg=cfg)
        if req.natix is not None:
            return await _vote(state, call, request, prompt, ids, spec)
        return await _serve(state, call, request, [prompt], [ids], spec)

    return app


# ---------------------------------------------------------------------- request handling
def _check(cfg: ServerConfig, req: Any) -> None:
    """The model name, and no field natix-serve cannot honour."""
    _check_model(cfg, req.model)
    field_ = req.unsupported()
    if field_ is not None:
        raise APIError(400, f"{field_} is not supported by natix-serve", param=field_, code="unsupported")


def _check_model(cfg: ServerConfig, model: str | None) -> None:
    if model is not None and model != cfg.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {cfg.model_name!r}",
                       param="model", code="model_not_found")


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def _max_tokens(cfg: ServerConfig, asked: int | None, ids: Sequence[Sequence[int]], param: str) -> int:
    longest = max(len(i) for i in ids)
    room = cfg.max_model_len - longest
    if asked is None:
        return max(1, min(cfg.max_tokens_limit, room))
    if asked > cfg.max_tokens_limit:
        raise APIError(400, f"{param}={asked} is over this server's limit of {cfg.max_tokens_limit}", param=param)
    if asked > room:
        raise APIError(400, f"this model's context is {cfg.max_model_len} tokens; the prompt has {longest} and "
                       f"{param} asks for {asked} more", param=param, code="context_length_exceeded")
    return asked


def _spec(req: Any, max_tokens: int, *, logprobs: bool, top: int, cfg: ServerConfig) -> SamplingSpec:
    if req.n > cfg.max_n:
        raise APIError(400, f"n={req.n} is over this server's limit of {cfg.max_n}", param="n")
    return SamplingSpec(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k),
                        max_tokens=max_tokens, stop=req.stop_strings(), seed=req.seed, logprobs=logprobs,
                        top_logprobs=top)


@dataclass
class _Sample:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[dict[int, float]] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None

    def add(self, d: RequestDelta) -> None:
        self.text += d.text
        self.token_ids.extend(d.token_ids)
        self.logprobs.extend(d.logprobs or ())
        self.tops.extend(d.top_logprobs or ())
        if d.finished:
            self.finish, self.error = d.finish_reason, d.error


class _Call:
    """One HTTP request's identity and output format (completion or chat)."""

    def __init__(self, request: Request, kind: str, cfg: ServerConfig, tokens: Tokens, req: Any, prompts: int) -> None:
        self.id = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
        self.kind, self.cfg, self.tokens, self.req = kind, cfg, tokens, req
        self.t0 = time.perf_counter()
        self.created = now()
        self.prompts, self.n = prompts, req.n
        self.echo: list[str] | None = None
        self.object = "text_completion" if kind == "completion" else "chat.completion"
        self.prefix = "cmpl-" if kind == "completion" else "chatcmpl-"

    @property
    def want_logprobs(self) -> bool:
        return self.req.logprobs is not None if self.kind == "completion" else bool(self.req.logprobs)

    def _logprobs(self, ids: Sequence[int], lps: Sequence[float], tops: Sequence[dict[int, float]],
                  offset: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        as_ids = self.req.return_tokens_as_token_ids
        texts = self.tokens.token_texts(ids, as_ids)
        pairs = [list(zip(self.tokens.token_texts(list(t), as_ids, special=True), t.values())) for t in tops] if tops else None
        if self.kind == "completion":
            return completion_logprobs(texts, list(lps), [dict(p) for p in pairs] if pairs else None, offset)
        return chat_logprobs(texts, list(lps), pairs)

    def choice(self, index: int, s: _Sample, prompt: int) -> dict[str, Any]:
        echo = self.echo[prompt] if self.echo else ""
        out: dict[str, Any] = {"index": index}
        if self.kind == "completion":
            out["text"] = echo + s.text
        else:
            out["message"] = {"role": "assistant", "content": s.text}
        out["logprobs"] = self._logprobs(s.token_ids, s.logprobs, s.tops, len(echo))
        out["finish_reason"] = s.finish
        if self.req.return_token_ids:
            out["token_ids"] = list(s.token_ids)
        return out

    def response(self, choices: list[dict[str, Any]], prompt_ids: list[list[int]], completion_tokens: int) -> dict[str, Any]:
        body = {"id": self.prefix + self.id, "object": self.object, "created": self.created,
                "model": self.cfg.model_name, "choices": choices,
                "usage": usage(sum(len(i) for i in prompt_ids), completion_tokens)}
        if self.req.return_token_ids:
            body["prompt_token_ids"] = prompt_ids if len(prompt_ids) > 1 else prompt_ids[0]
        return body

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        body = {"id": self.prefix + self.id, "object": obj, "created": self.created,
                "model": self.cfg.model_name, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def delta_chunks(self, index: int, d: RequestDelta, first: bool, prompt: int) -> list[str]:
        """SSE events for one delta of choice ``index``."""
        out = []
        lps = self._logprobs(d.token_ids, d.logprobs or (), d.top_logprobs or (),
                             len(self.echo[prompt]) if (self.echo and first) else 0)
        if self.kind == "completion":
            text = (self.echo[prompt] if self.echo and first else "") + d.text
            if text or d.token_ids or d.finished:
                c: dict[str, Any] = {"index": index, "text": text, "logprobs": lps,
                                     "finish_reason": d.finish_reason if d.finished else None}
                if self.req.return_token_ids:
                    c["token_ids"] = list(d.token_ids)
                out.append(self.chunk([c]))
            return out
        if d.text or d.token_ids:
            c = {"index": index, "delta": {"content": d.text}, "logprobs": lps, "finish_reason": None}
            if self.req.return_token_ids:
                c["token_ids"] = list(d.token_ids)
            out.append(self.chunk([c]))
        if d.finished:
            out.append(self.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason}]))
        return out


async def _until_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the ASGI server's ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _submit(state: _State, prompts: Sequence[Any], ids: list[list[int]], spec: SamplingSpec, call: _Call) -> Submission:
    state.admit(len(prompts))
    try:
        sub = Submission(state.loop, prompts, spec, call.id)
        state.metrics.prompt_tokens.inc(sum(len(i) for i in ids))
        return sub
    except RequestError as e:
        state.in_flight -= len(prompts)
        raise APIError(400, str(e), param="prompt" if call.kind == "completion" else "messages") from e
    except BaseException:
        state.in_flight -= len(prompts)
        raise


async def _serve(state: _State, call: _Call, request: Request, prompts: Sequence[Any],
                 ids: list[list[int]], spec: SamplingSpec) -> Response:
    sub = _submit(state, prompts, ids, spec, call)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            sub.abort()  # no-op once every sample finished
            state.in_flight -= len(prompts)

    if call.req.stream:
        return StreamingResponse(_stream(state, call, request, sub, ids, release),
                                 media_type="text/event-stream", background=BackgroundTask(release))
    samples: dict[tuple[int, int], _Sample] = {}
    try:
        async def collect() -> None:
            async for ds in sub:
                for d in ds:
                    samples.setdefault((sub.index[d.request_id], d.index), _Sample()).add(d)

        await _race(collect(), request, state.cfg.request_timeout_s)
    finally:
        release()
    failed = [s for s in samples.values() if s.finish == "error"]
    if failed:
        raise APIError(500, f"generation failed: {failed[0].error}", code="generation_failed")
    choices = [call.choice(p * spec.n + j, samples[(p, j)], p) for p in range(len(prompts)) for j in range(spec.n)]
    body = call.response(choices, ids, sum(len(s.token_ids) for s in samples.values()))
    return JSONResponse(body)


async def _race(work: Any, request: Request, timeout_s: float) -> Any:
    """Run ``work`` unless the client hangs up (-> :class:`_Disconnected`) or it takes longer
    than ``timeout_s`` (-> 504); either way ``work`` is cancelled."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    if watch in done:
        raise _Disconnected()
    raise APIError(504, f"the request did not finish within {timeout_s:g} s", code="timeout")


class _Disconnected(Exception):
    """The client hung up; nobody is left to answer."""


async def _stream(state: _State, call: _Call, request: Request, sub: Submission, ids: list[list[int]],
                  release: Callable[[], None]) -> AsyncIterator[str]:
    n = call.n
    started: set[int] = set()
    generated = 0
    try:
        if call.kind == "chat":
            for i in range(call.prompts * n):
                yield call.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}])
        deadline = call.t0 + state.cfg.request_timeout_s
        # a client that hangs up aborts the request at once, even between deltas
        watch = asyncio.ensure_future(_until_disconnect(request))
        watch.add_done_callback(lambda t: None if t.cancelled() else sub.abort())
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + (deadline - time.perf_counter())):
                async for ds in sub:
                    for d in ds:
                        index = sub.index[d.request_id] * n + d.index
                        generated += len(d.token_ids)
                        if d.finish_reason == "error":
                            yield f"data: {json.dumps(error_body(f'generation failed: {d.error}', 'server_error'))}\n\n"
                            continue
                        for event in call.delta_chunks(index, d, index not in started, sub.index[d.request_id]):
                            yield event
                        started.add(index)
        finally:
            watch.cancel()
        if call.req.include_usage:
            yield call.chunk([], usage=usage(sum(len(i) for i in ids), generated))
    except TimeoutError:
        msg = f"the request did not finish within {state.cfg.request_timeout_s:g} s"
        yield f"data: {json.dumps(error_body(msg, 'timeout', code='timeout'))}\n\n"
    finally:
        release()
    yield "data: [DONE]\n\n"


async def _vote(state: _State, call: _Call, request: Request, prompt: str, ids: list[int], spec: SamplingSpec) -> Response:
    req = call.req
    if req.stream:
        raise APIError(400, "the natix extension answers once the strategy has decided: set stream=false",
                       param="stream")
    if req.n != 1:
        raise APIError(400, "with the natix extension the strategy sets the number of samples: leave n at 1",
                       param="n")
    strategy = plan_strategy(req.natix, prompt, spec, state.cfg.max_n)
    state.admit(1)
    engine = LoopEngine(state.loop)
    aloop = asyncio.get_running_loop()
    try:
        fut = aloop.run_in_executor(state.voting_pool, lambda: strategy.run(engine, [prompt], spec)[0])
        try:
            result = await _race(asyncio.shield(fut), request, state.cfg.request_timeout_s)
        except BaseException:
            engine.cancel()
            raise
    except RequestFailed as e:
        raise APIError(500, f"generation failed: {e}", code="generation_failed") from e
    finally:
        state.in_flight -= 1
        state.metrics.tt_samples.inc(engine.samples)
    state.metrics.prompt_tokens.inc(len(ids))
    c = result.completion
    s = _Sample()
    if c is not None:
        s.text, s.token_ids, s.finish = c.text, list(c.token_ids), c.finish_reason
        s.logprobs, s.tops = list(c.token_logprobs or ()), list(c.top_logprobs or ())
    else:
        s.finish = "stop"
    body = call.response([call.choice(0, s, 0)], [ids], engine.tokens)
    body["natix"] = summary(strategy, result, req.natix.task)
    return JSONResponse(body)


# ---------------------------------------------------------------------- errors and logs
def _param(loc: Sequence[Any]) -> str | None:
    """pydantic's error location -> OpenAI's ``param`` (``messages[0].content``), without the
    union-member tags pydantic adds (``str``, ``list[int]``)."""
    parts: list[str] = []
    for x in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(x, int):
            if not parts:
                break
            parts[-1] += f"[{x}]"
        elif isinstance(x, str) and not ("[" in x or x in ("str", "int", "float", "bool")):
            parts.append(x)
        else:
            break
    return ".".join(parts) or None


def _install_error_handlers(app: FastAPI, state: _State) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        if e.status >= 500:
            log.error("request %s failed: %s", request.url.path, e.message)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        state.metrics.rejected("invalid")
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                           "invalid_request_error", None, "invalid_json"), status_code=400)
        param = _param(first.get("loc", ()))
        msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(_Disconnected)
    async def gone(request: Request, e: _Disconnected) -> Response:
        state.metrics.rejected("client_disconnected")
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> Response:
        log.exception("unhandled error in %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)


class _AccessLog:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer streams and hide disconnects): one
    JSON access line per request, and an ``x-request-id`` (the client's, or a new one) that is
    also the response ``id``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = [0]

        async def send_logged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except BaseException:
            status[0] = status[0] or 500  # the error middleware outside this one answers 500
            raise
        finally:
            client = scope.get("client")
            access_log.info(json.dumps({
                "event": "access", "request_id": rid, "method": scope.get("method"), "path": scope.get("path"),
                "status": status[0], "duration_ms": round(1e3 * (time.perf_counter() - t0), 2),
                "client": f"{client[0]}:{client[1]}" if client else None}))
