"""What the natix engine runs (:class:`ModelSpec`, read from a transformers config) and how
(:class:`EngineOptions`, from ``EngineConfig.extra``).

The runner implements the Llama family's decoder itself (Llama, Mistral, Qwen2: pre-norm RMSNorm,
rotary attention with GQA, SwiGLU MLP). Anything else is refused at load with the reason, never run
on a slower fallback.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("llama", "mistral", "qwen2")
KV_CACHES = ("auto", "int4", "none")
PREFILL_ATTENTION = ("unquantized", "quantized")
# load_format: "auto" reads the model's tensors; "dummy-<scheme>" builds random weights of the config's
# shape in that scheme's served layout (vLLM's --load-format dummy, for benchmarks at shapes we have no
# checkpoint of): the directory needs only config.json (and a tokenizer, for text prompts)
LOAD_FORMATS = {"auto": None, "dummy": ("dense", -1), "dummy-fp8": ("fp8", -1), "dummy-w4a8kv4": ("w4a8kv4", -1),
                "dummy-w4a8kv4-g128": ("w4a8kv4", 128)}


class EngineLoadError(ValueError):
    """The model or its options cannot be run by the natix engine (the message says why)."""


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and constants of a Llama-family decoder."""

    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    max_positions: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelSpec":
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        arch = getattr(cfg, "model_type", None)
        if arch not in ARCHITECTURES:
            raise EngineLoadError(f"the natix engine runs the Llama family ({', '.join(ARCHITECTURES)}); "
                                  f"this model is {arch!r}: serve it with the hf or vllm engine")
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise EngineLoadError(f"the natix engine's MLP is SwiGLU (silu); this model's activation is {act!r}")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        partial = getattr(cfg, "partial_rotary_factor", 1.0)
        if partial not in (None, 1.0):
            raise EngineLoadError(f"partial rotary embeddings (factor {partial}) are not supported")
        window = getattr(cfg, "sliding_window", None)
        if arch == "qwen2" and not getattr(cfg, "use_sliding_window", False):
            window = None
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            arch=arch, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
            intermediate=cfg.intermediate_size, vocab=cfg.vocab_size, rms_eps=float(cfg.rms_norm_eps),
            max_positions=int(getattr(cfg, "max_position_embeddings", 4096) or 4096),
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else attn_bias, o_bias=attn_bias and arch != "qwen2",
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)), sliding_window=window,
        )


def rope_tables(model: Any) -> tuple[Any, float]:
    """(inv_freq [head_dim/2] float32, attention scaling) from the model's own rotary module, so
    every rope type transformers knows (default, llama3, yarn, ...) is computed by transformers."""
    rot = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise EngineLoadError(f"{type(model).__name__} has no rotary_emb module with inv_freq: not a Llama-family model")
    return rot.inv_freq.detach().float().cpu(), float(getattr(rot, "attention_scaling", 1.0))


@dataclass(frozen=True)
class EngineOptions:
    """The natix engine's knobs (``EngineConfig.extra`` keys of the same names).

    ``page_size``: tokens per KV page (power of two; 64 lets decode read one page per block).
    ``max_num_seqs``: sequences in one decode batch (samples count one each).
    ``max_num_batched_tokens``: prompt tokens in one prefill step (a longer single prompt still
    runs, alone). ``max_model_len``: prompt + generated tokens of one sequence.
    ``num_kv_pages`` or ``kv_cache_memory_gb`` size the cache (else ``gpu_memory_utilization`` of
    the card, minus weights and an activation reserve; on CPU 0.5 GB).
    ``kv_cache``: ``auto`` (the artifact's choice: UINT4 for w4a8kv4, else 16-bit), ``int4``, ``none``.
    ``prefill_attention``: ``unquantized`` (prompt tokens attend to each other's 16-bit K/V, as
    QServe's kernels do; the cache still stores them quantized) or ``quantized`` (they attend to
    the stored K/V, the reference path's semantics). ``cuda_graphs``: capture decode per batch
    bucket. ``enable_prefix_caching``: reuse full KV pages of identical prompt prefixes.
    ``async_scheduling`` (default on CUDA): launch decode step N+1 before reading step N's tokens,
    so the host's per-step work overlaps the GPU's; a sequence that stops costs one wasted token.
    ``warmup`` (CUDA): at load, compile the prefill kernels (a prefill of each GEMM M bucket, on the
    scratch page) and capture the decode graphs of every batch bucket and context class for the
    listed sampling modes (comma-separated ``greedy``, ``sample``, ``filter``), or ``none``: what
    is not captured at load is captured by the first step that needs it.
    ``load_format``: ``auto``, or ``dummy`` / ``dummy-fp8`` / ``dummy-w4a8kv4`` /
    ``dummy-w4a8kv4-g128``: random weights of the model directory's config.json shape (benchmarks).
    """

    page_size: int = 64
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    num_kv_pages: int | None = None
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache: str = "auto"
    prefill_attention: str = "unquantized"
    cuda_graphs: bool = True
    enable_prefix_caching: bool = True
    async_scheduling: bool | None = None  # None: on for CUDA, off elsewhere (resolved at load)
    warmup: str = "greedy,sample"
    load_format: str = "auto"

    def __post_init__(self) -> None:
        def _int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise EngineLoadError(f"natix engine option {name} must be an integer >= {lo}, got {v!r}")

        _int("page_size", 1)
        if self.page_size & (self.page_size - 1):
            raise EngineLoadError(f"natix engine option page_size must be a power of two, got {self.page_size}")
        _int("max_num_seqs", 1)
        _int("max_num_batched_tokens", 1)
        if self.max_model_len is not None:
            _int("max_model_len", 2)
        if self.num_kv_pages is not None:
            _int("num_kv_pages", 2)
        if self.kv_cache_memory_gb is not None and not (isinstance(self.kv_cache_memory_gb, (int, float))
                                                         and self.kv_cache_memory_gb > 0):
            raise EngineLoadError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise EngineLoadError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.kv_cache not in KV_CACHES:
            raise EngineLoadError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        if self.prefill_attention not in PREFILL_ATTENTION:
            raise EngineLoadError(f"prefill_attention must be one of {', '.join(PREFILL_ATTENTION)}, "
                                  f"got {self.prefill_attention!r}")
        modes = [m.strip() for m in self.warmup.split(",")] if isinstance(self.warmup, str) else [None]
        if modes != ["none"] and not all(m in ("greedy", "sample", "filter") for m in modes):
            raise EngineLoadError(f"warmup must be 'none' or a comma-separated list of greedy, sample, filter; "
                                  f"got {self.warmup!r}")
        if self.load_format not in LOAD_FORMATS:
            raise EngineLoadError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")

    @classmethod
    def from_extra(cls, extra: dict[str, Any], **defaults: Any) -> "EngineOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in extra.items() if k in names}
        return cls(**{**defaults, **known})
