"""The OpenAI wire format: request models (pydantic), the error body, response and chunk objects.

Requests are parsed by pydantic, so a wrong type or a value out of range is a 400 whose error
body names the field (``param``), as OpenAI's does. Unknown fields are ignored (clients such as
LangChain send extras; vLLM ignores them too). Extensions beyond OpenAI's API, each optional:

- ``top_k`` (vLLM's; 0 or -1 = off);
- ``return_token_ids`` (vLLM's): each choice carries ``token_ids``, the response
  ``prompt_token_ids``;
- ``return_tokens_as_token_ids`` (vLLM's): logprob tokens are ``"token_id:<id>"``, so token
  identity survives text that does not decode token by token;
- ``natix``: test-time compute in the same call (:mod:`natix.engines.serve.voting`).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["APIError", "CompletionRequest", "ChatCompletionRequest", "ChatMessage", "NatixOptions",
           "TokenizeRequest", "DetokenizeRequest", "error_body"]


class APIError(Exception):
    """An error answered as OpenAI does: ``status`` and ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 504: "timeout"}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class NatixOptions(BaseModel):
    """``"natix": {"strategy": "maj@8", "task": "chain_sum"}``: draw the strategy's samples and
    answer with its choice. ``extractor`` overrides the task's answer extractor (default: the
    task's kind, or ``number`` without a task)."""

    model_config = ConfigDict(extra="forbid")
    strategy: str = Field(min_length=1, max_length=200)
    task: str | None = None
    extractor: str | None = None


class _Sampling(_Request):
    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    natix: NatixOptions | None = None
    # OpenAI fields natix-serve does not implement: refused (400 naming the field) when set to
    # anything but their no-op default, rather than silently ignored
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None

    def unsupported(self) -> str | None:
        """The first field set to something natix-serve cannot do, or None."""
        if self.presence_penalty:
            return "presence_penalty"
        if self.frequency_penalty:
            return "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice"
        if self.response_format not in (None, {"type": "text"}):
            return "response_format"
        return None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, token ids, or a list of
    token-id lists; choice ``index`` is ``prompt_index * n + sample``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions`` (``max_tokens`` is the deprecated name of
    ``max_completion_tokens``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize``: ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------- responses
def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[str], lps: list[float], tops: list[dict[str, float]] | None,
                        offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: tokens, their logprobs, per-token top
    alternatives and character offsets (from ``offset``, the length of any echoed prompt)."""
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokens: list[str], lps: list[float], tops: list[list[tuple[str, float]]] | None) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for i, (t, lp) in enumerate(zip(tokens, lps)):
        alts = [{"token": a, "logprob": v, "bytes": list(a.encode())} for a, v in (tops[i] if tops else [])]
        content.append({"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": alts})
    return {"content": content}
