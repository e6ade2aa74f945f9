"""The reference engine: transformers forward passes in our own decode loop.

Why not ``model.generate``: we need raw-model logprobs of the chosen tokens, stop strings,
per-request TTFT / decode timing, and a kvpress press applied to the prefill forward only. A
short loop over ``model(...)`` with a ``DynamicCache`` gives all of that exactly.

Batching is static: the n samples of every prompt are expanded into rows, rows are cut into
batches of at most ``max_batch_size``, left-padded, and each batch is prefilled and decoded to
completion before the next starts. With a kv press every batch holds copies of a single prompt
(no padding): a press scores and prunes cache positions per row, and pruned padding would leave
the attention mask and the cache out of step.

``import natix.engines.hf_engine`` is cheap: torch/transformers load in :meth:`HFEngine.load`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from natix.engines.base import Completion, EngineConfig, SamplingSpec, Timing, register_engine, release_memory
from natix.engines.kv_cache import cache_argument, preallocate
from natix.engines.kv_compression import PressSpec, build_press, cache_lengths, parse_press_spec

if TYPE_CHECKING:  # pragma: no cover
    import torch


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is passed through."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def merge_adapter_into(model: Any, adapter_dir: str) -> tuple[Any, dict[str, Any]]:
    """Merge a PEFT adapter into ``model`` with natix.quant.adapters (validated against the
    base, merge parity checked); returns ``(merged_model, report as a dict)``."""
    from natix.quant.adapters import merge_adapter

    merged, report = merge_adapter(model, adapter_dir)
    return merged, report.to_dict()


@dataclass
class _Row:
    """One sequence being generated: prompt ``prompt`` sample ``sample``."""

    prompt: int
    sample: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)  # per token, when spec.top_logprobs
    finish: str | None = None


@dataclass(frozen=True)
class _BatchClock:
    """perf_counter stamps of one batch: start, first token sampled, end; decode steps run."""

    start: float
    first: float
    end: float
    steps: int  # generated positions, including the first (prefill) token


@register_engine("hf")
class HFEngine:
    """transformers model + optional merged adapter + optional kvpress press.

    Conventions: ``token_ids`` include the final EOS or the token that completed a stop
    string (their logprobs are evidence too); ``text`` excludes EOS and is cut before the
    earliest stop string. Prompts are tokenized without special tokens (they are already
    chat-formatted; set ``cfg.extra["add_special_tokens"] = True`` for raw text that needs
    BOS). Beyond the protocol: :meth:`info` reports what is loaded and the cache lengths the
    last call's prefills kept (the press's effect).
    """

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.cfg: EngineConfig | None = None
        self.device: str = "cpu"
        self.press_spec: PressSpec | None = None
        self.merge_report: dict[str, Any] | None = None
        self._press: Any = None
        self._eos: set[int] = set()
        self._cache_kw = "past_key_values"
        # per batch of the last generate: prompt length, kept cache length (mean/min/max over layers)
        self.last_prefill: list[dict[str, float]] = []
        self._prefill_attention = "unquantized"  # what a quantized KV cache's prefill attention reads
        #: called with k as k more rows (samples) finish, so a caller can show progress per sample
        self.progress: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ load / close
    def load(self, cfg: EngineConfig) -> None:
        from natix.quant.models import load_base

        from natix.quant.kv_quant import PREFILL_MODES

        self._prefill_attention = cfg.extra.get("prefill_attention", "unquantized")
        if self._prefill_attention not in PREFILL_MODES:
            raise ValueError(f"prefill_attention must be one of {', '.join(PREFILL_MODES)}, got "
                             f"{self._prefill_attention!r}")
        # Parse and build the press before the (slow) model load so a bad spec fails fast.
        self.press_spec = parse_press_spec(cfg.kv_press) if cfg.kv_press else None
        self._press = build_press(self.press_spec) if self.press_spec else None
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        model, tok = load_base(cfg.model, dtype=cfg.dtype, device=self.device)
        if cfg.adapter:
            model, self.merge_report = merge_adapter_into(model, cfg.adapter)
        if self.press_spec is not None and self.press_spec.info.needs_eager:
            # only eager attention returns the attention weights such presses score with
            model.set_attn_implementation("eager")
        self.model = model.eval()
        self.tokenizer = tok
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self._eos = _eos_ids(model, tok)
        self._cache_kw = cache_argument(model)

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        self._press = None
        release_memory()

    def info(self) -> dict[str, Any]:
        """What is loaded, and the last generate call's prefill cache lengths (press effect)."""
        cfg = self.cfg
        return {
            "engine": "hf",
            "model": cfg.model if cfg else None,
            "adapter": cfg.adapter if cfg else None,
            "device": self.device,
            "dtype": str(getattr(self.model, "dtype", None)),
            "kv_press": str(self.press_spec) if self.press_spec else None,
            "kv_cache": getattr(self.model, "natix_kv_cache", "none") or "none",
            "kv_group_size": getattr(self.model, "natix_kv_group_size", -1),
            "kv_key_block": getattr(self.model, "natix_kv_key_block", 0),
            "prefill_attention": self._prefill_attention,
            "attn_implementation": getattr(getattr(self.model, "config", None), "_attn_implementation", None),
            "merge_report": self.merge_report,
            "last_prefill": list(self.last_prefill),
        }

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[Completion]]:
        import torch

        if self.model is None:
            raise RuntimeError("HFEngine.generate called before load()")
        if isinstance(prompts, str):
            raise TypeError("generate takes a sequence of prompts, not a single string")
        assert self.cfg is not None
        add_special = bool(self.cfg.extra.get("add_special_tokens", False))
        encoded = [self.tokenizer(p, add_special_tokens=add_special).input_ids for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {i} is empty after tokenization")
        rows = [_Row(p, s) for p in range(len(prompts)) for s in range(spec.n)]
        generator = None
        if spec.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(spec.seed)
        self.last_prefill = []
        clocks: dict[int, list[_BatchClock]] = {p: [] for p in range(len(prompts))}
        with torch.inference_mode():
            for batch in self._plan(rows):
                clock = self._run_batch([encoded[r.prompt] for r in batch], batch, spec, generator)
                for p in sorted({r.prompt for r in batch}):
                    clocks[p].append(clock)
        out: list[list[Completion]] = [[] for _ in prompts]
        for r in rows:
            text = self._text(r.token_ids, spec.stop)
            assert r.finish is not None
            out[r.prompt].append(
                Completion(
                    text=text,
                    token_ids=tuple(r.token_ids),
                    token_logprobs=tuple(r.logprobs) if spec.logprobs else None,
                    finish_reason=r.finish,
                    timing=_request_timing(clocks[r.prompt]),
                    top_logprobs=tuple(r.top) if spec.top_logprobs else None,
                )
            )
        return out

    def _plan(self, rows: list[_Row]) -> list[list[_Row]]:
        """Cut rows into batches of <= max_batch_size; with a press, one prompt per batch."""
        assert self.cfg is not None
        size = max(1, self.cfg.max_batch_size)
        if self._press is None:
            return [rows[i : i + size] for i in range(0, len(rows), size)]
        batches: list[list[_Row]] = []
        for r in rows:
            if batches and batches[-1][0].prompt == r.prompt and len(batches[-1]) < size:
                batches[-1].append(r)
            else:
                batches.append([r])
        return batches

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        from natix.quant.kv_quant import new_cache

        # a quantized artifact's KV cache (model.natix_kv_cache, set by the natix loader): keys and
        # values are quantized as they are written; prefill attention reads them as the natix
        # engine's option of the same name says (default: the prompt's 16-bit keys/values)
        quantized = new_cache(self.model, prefill=self._prefill_attention)
        if quantized is not None:
            return quantized
        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older signature without config
            return DynamicCache()

    def _forward(
        self, ids: "torch.Tensor", mask: "torch.Tensor | None", pos: "torch.Tensor", cache: Any
    ) -> "torch.Tensor":
        """One forward; returns the last position's logits, (B, V)."""
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1, :]

    def _run_batch(
        self, prompt_ids: list[list[int]], rows: list[_Row], spec: SamplingSpec, generator: Any
    ) -> _BatchClock:
        """Prefill + decode one batch in place into ``rows``.

        Shapes: input_ids/mask (B, L) left-padded; position_ids count real tokens only, so a
        padded row sees the same positions as it would alone.
        """
        import torch

        dev = self.device
        # Prefill each distinct prompt once, then fan its cache out to its n sample rows: the
        # n copies would otherwise cost n identical prefills (16x the prompt FLOPs at n=16).
        first_row: dict[int, int] = {}  # prompt -> its first row in this batch
        for i, r in enumerate(rows):
            first_row.setdefault(r.prompt, i)
        uniq = {p: k for k, p in enumerate(first_row)}  # prompt -> its prefill row
        src = [prompt_ids[i] for i in first_row.values()]
        width = max(len(p) for p in src)
        pad = self.tokenizer.pad_token_id
        start = time.perf_counter()
        ids = torch.full((len(src), width), pad, dtype=torch.long)
        mask = torch.zeros((len(src), width), dtype=torch.long)
        for i, p in enumerate(src):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        press_ctx = self._press(self.model) if self._press is not None else contextlib.nullcontext()
        try:
            with press_ctx:
                logits = self._forward(ids, mask, pos, cache)
        except Exception as e:
            if self._press is None:
                raise
            raise RuntimeError(f"kv press {self.press_spec} failed on a {width}-token prompt: {e}") from e
        kept = cache_lengths(cache)
        self.last_prefill.append({"prompt_tokens": width, "cache_tokens": round(sum(kept) / len(kept), 2),
                                  "cache_tokens_min": min(kept), "cache_tokens_max": max(kept)})
        fan = torch.tensor([uniq[r.prompt] for r in rows], dtype=torch.long, device=dev)
        if len(src) != len(rows):
            cache.reorder_cache(fan)
        preallocate(cache, spec.max_tokens)
        logits, mask, pos = logits[fan], mask[fan], pos[fan]
        # With a press the cache no longer lines up with a padded mask; press batches hold one
        # prompt (no padding), so decode without a mask (all kept positions are visible).
        use_mask = self._press is None
        next_pos = pos[:, -1:] + 1  # (B, 1)
        max_stop = max((len(s) for s in spec.stop), default=0)
        first = end = start
        steps = 0
        live = list(rows)  # rows still decoding, in batch order
        for step in range(spec.max_tokens):
            if step > 0:
                feed = torch.tensor([r.token_ids[-1] for r in live], dtype=torch.long, device=dev).unsqueeze(-1)
                if use_mask:
                    mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=dev)], dim=-1)
                logits = self._forward(feed, mask if use_mask else None, next_pos, cache)
                next_pos = next_pos + 1
            tokens, logprobs = _sample(logits, spec, generator)
            if spec.top_logprobs:
                for r, top in zip(live, _top_logprobs(logits, spec.top_logprobs)):
                    r.top.append(top)
            steps += 1
            end = time.perf_counter()  # .tolist() in _sample synchronised with the device
            if step == 0:
                first = end
            for r, tok, lp in zip(live, tokens, logprobs):
                self._append(r, tok, lp, spec, max_stop)
            keep = [i for i, r in enumerate(live) if r.finish is None]
            if self.progress is not None and len(keep) < len(live):
                self.progress(len(live) - len(keep))
            if not keep:
                break
            if len(keep) < len(live):
                # Drop finished rows from the batch: later steps cost what the live rows need.
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                cache.reorder_cache(idx)
                mask, next_pos = mask[idx], next_pos[idx]
                live = [live[i] for i in keep]
        unfinished = [r for r in rows if r.finish is None]
        for r in unfinished:
            r.finish = "length"
        if self.progress is not None and unfinished:
            self.progress(len(unfinished))
        return _BatchClock(start, first, end, steps)

    def _append(self, r: _Row, tok: int, lp: float, spec: SamplingSpec, max_stop: int) -> None:
        r.token_ids.append(tok)
        r.logprobs.append(lp)
        if tok in self._eos:
            r.finish = "stop"
        elif spec.stop and self._hit_stop(r.token_ids, spec.stop, max_stop):
            r.finish = "stop"
        elif len(r.token_ids) >= spec.max_tokens:
            r.finish = "length"

    def _hit_stop(self, token_ids: list[int], stops: tuple[str, ...], max_stop: int) -> bool:
        # A stop string completed by the newest token lies in the last few tokens; decode only
        # that window each step, and confirm on the full text (window decoding may differ at
        # its left edge).
        window = self.tokenizer.decode(token_ids[-(max_stop + 16) :], skip_special_tokens=True)
        if not any(s in window for s in stops):
            return False
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return any(s in full for s in stops)

    def _text(self, token_ids: list[int], stops: tuple[str, ...]) -> str:
        """Decoded completion without EOS, cut before the earliest stop string."""
        ids = token_ids[:-1] if token_ids and token_ids[-1] in self._eos else token_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        return text[: min(cuts)] if cuts else text


def _sample(logits: "torch.Tensor", spec: SamplingSpec, generator: Any) -> tuple[list[int], list[float]]:
    from natix.engines.sampler import sample_next

    tokens, logprobs = sample_next(logits, spec, generator)
    return tokens.tolist(), logprobs.tolist()


def _top_logprobs(logits: "torch.Tensor", k: int) -> list[dict[int, float]]:
    """Per row, ``{token_id: logprob}`` of the k most likely tokens under the raw model (the
    distribution ``token_logprobs`` uses)."""
    import torch

    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def _eos_ids(model: Any, tok: Any) -> set[int]:
    """EOS ids: the tokenizer's, plus every id the generation config lists (chat models often
    end turns with a token other than the tokenizer's eos)."""
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return ids


def _request_timing(clocks: list[_BatchClock]) -> Timing:
    """One request's timing from the batches its samples ran in (in order).

    Measured from the start of its first batch (time queued behind earlier batches of the same
    call is not counted): TTFT = that batch's prefill + first sample; decode = decode time per
    generated token after the first, over all its batches; total = to the end of its last batch.
    """
    first = clocks[0]
    decode_time = sum(c.end - c.first for c in clocks)
    decode_steps = sum(c.steps - 1 for c in clocks)
    return Timing(
        ttft_s=first.first - first.start,
        decode_s_per_token=decode_time / decode_steps if decode_steps else 0.0,
        total_s=clocks[-1].end - first.start,
    )
