"""The Engine protocol every backend implements, and the value types it speaks.

An engine turns prompts into completions. Everything above it (strategies, the benchmark
harness, the server) talks only to this protocol, so backends are swappable. Concrete engines
import their frameworks inside ``load()``; importing this module costs nothing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. ``temperature == 0`` means greedy (then ``n`` must be 1 to be useful).

    ``seed`` makes sampling reproducible for a given engine, batch shape and device (the natix
    engine: for any batch it runs in). ``top_logprobs``: engines that report alternatives (the
    streaming interface's deltas) give that many per token.
    ``stop`` strings end a completion; the stop string itself is not part of ``text``.
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True
    top_logprobs: int = 0  # per token, the logprobs of this many most likely tokens (0 = off)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingSpec.n must be >= 1, got {self.n}")
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise ValueError(f"SamplingSpec.temperature and top_p must be finite, got {self.temperature}, {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"SamplingSpec.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingSpec.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"SamplingSpec.top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingSpec.max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):  # a lone string is a common slip: make it a 1-tuple
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes: Any) -> "SamplingSpec":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Timing:
    """Wall-clock timing of one request (one prompt, all its n completions), in seconds.

    ``ttft_s``: time to the first generated token of the request. ``decode_s_per_token``: mean
    time per generated token after the first (per decode step of the batch the request ran in).
    ``total_s``: from submission to the last token. ``queue_s``: time the request waited before
    the engine started on it, where the engine knows (a server's batching window, a scheduler's
    waiting queue); None where it does not.
    """

    ttft_s: float
    decode_s_per_token: float
    total_s: float
    queue_s: float | None = None


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt.

    ``token_logprobs[i]`` is the log-probability, under the sampling distribution's underlying
    model (temperature 1, before top-p/top-k), of ``token_ids[i]``. ``finish_reason`` is
    ``"stop"`` (EOS or a stop string) or ``"length"`` (hit ``max_tokens``).
    ``top_logprobs[i]``: ``{token_id: logprob}`` of the ``spec.top_logprobs`` most likely tokens
    at position i (same distribution as ``token_logprobs``); None when not asked for.
    """

    text: str
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...] | None
    finish_reason: str
    timing: Timing | None = None
    top_logprobs: tuple[dict[int, float], ...] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def sum_logprob(self) -> float:
        if self.token_logprobs is None:
            raise ValueError("this completion was generated without logprobs")
        return float(sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        if self.token_logprobs is None:
            raise ValueError("this completion was generated without logprobs")
        return self.sum_logprob / max(1, len(self.token_logprobs))


@dataclass(frozen=True)
class EngineConfig:
    """What to load and how. ``model``: a model directory, GGUF file, natix artifact or the
    name of an embedded model; ``adapter``: optional PEFT adapter directory (merged on load);
    ``kv_press``: KV-cache compression as ``"name:ratio"`` (engines that support it)."""

    model: str
    adapter: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 64
    kv_press: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A loaded model that generates. ``generate`` returns, for each prompt, ``spec.n``
    completions in a list (so ``result[i][j]`` is prompt i's j-th sample)."""

    name: ClassVar[str]

    def load(self, cfg: EngineConfig) -> None: ...

    def generate(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[Completion]]: ...

    def close(self) -> None: ...


_ENGINES: dict[str, Callable[[], type]] = {}


def release_memory() -> None:
    """After an engine dropped its model: collect garbage and return cached CUDA blocks (a no-op
    without torch or CUDA), so the next engine in the same process starts from free memory."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover - engines always have torch
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def register_engine(name: str) -> Callable[[type], type]:
    """Class decorator: make an engine available to :func:`create_engine` under ``name``."""

    def deco(cls: type) -> type:
        cls.name = name
        _ENGINES[name] = lambda: cls
        return cls

    return deco


# Engines register on import; importing them is cheap (frameworks load in ``load()``),
# but we still import lazily so an engine module with a broken optional dependency does not
# break the others.
_BUILTIN_MODULES = {
    "hf": "natix.engines.hf_engine",
    "vllm": "natix.engines.vllm_engine",
    "natix": "natix.engines.natix.engine",
    "openai-http": "natix.engines.openai_http_engine",
}


def available_engines() -> list[str]:
    return sorted(set(_ENGINES) | set(_BUILTIN_MODULES))


def create_engine(name: str) -> Engine:
    """Instantiate (not load) the engine registered as ``name``."""
    if name not in _ENGINES and name in _BUILTIN_MODULES:
        import importlib

        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(available_engines())}")
    return _ENGINES[name]()()
