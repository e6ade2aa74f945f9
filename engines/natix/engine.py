"""The ``natix`` engine: natix's own decoder and kernels behind the Engine protocol and the streaming
request interface (:mod:`natix.engines.streaming`).

``load`` reads a base model (+ adapter, merged), or an fp8 / w4a8kv4 artifact, through natix's own
loaders, then moves its tensors into the runner's layout (:mod:`natix.engines.natix.weights`).
``add_request`` validates and queues; ``step`` schedules (:mod:`~natix.engines.natix.scheduler`),
runs one prefill or decode (:mod:`~natix.engines.natix.model_runner`), samples, and turns new
tokens into :class:`~natix.engines.streaming.RequestDelta` objects. ``generate`` is a loop over
``step`` until its requests finish, so the benchmark harness, ``natix-quant eval`` and every
test-time strategy run on this engine unchanged.

Conventions follow the hf engine: ``token_ids`` include the final EOS or the token that completed a
stop string, ``text`` excludes EOS and is cut before the earliest stop string, logprobs are of the
raw model distribution, prompts are tokenized without special tokens (``extra["add_special_tokens"]``).
"""
from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
import uuid
from typing import Any, Optional, Sequence

from natix.engines.base import Completion, EngineConfig, SamplingSpec, Timing, register_engine, release_memory
from natix.engines.natix.sequence import Request, Sequence as Seq, Status
from natix.engines.natix.spec import EngineLoadError, EngineOptions
from natix.engines.streaming import EngineStats, RequestDelta, RequestError

log = logging.getLogger("natix.engines.natix")


@register_engine("natix")
class NatixEngine:
    """See the module docstring. Beyond the protocols: :meth:`info`, :meth:`load_weights` (run a
    :class:`~natix.engines.natix.weights.ModelWeights` built in code, e.g. random weights for
    speed measurements) and ``runner`` (the model runner, for warm-up and measurements)."""

    def __init__(self) -> None:
        self.cfg: Optional[EngineConfig] = None
        self.runner: Any = None
        self.scheduler: Any = None
        self.tokenizer: Any = None
        self.options: Optional[EngineOptions] = None
        self._eos: set[int] = set()
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._requests: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._load_info: dict[str, Any] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0
        #: what the last step ran: {"prefill": bool, "seqs": rows computed, "tokens": tokens computed}
        #: (with async scheduling, the decode step whose tokens this step returned)
        self.last_step: dict[str, Any] = {}
        self._pending: Any = None  # a decode step launched, not yet collected (async scheduling)
        self.steps_ahead = 0  # decode steps launched before the previous one was read

    # ------------------------------------------------------------------------------ load / close
    def load(self, cfg: EngineConfig) -> None:
        import torch

        from natix.engines.hf_engine import _eos_ids, merge_adapter_into, resolve_device
        from natix.engines.natix.weights import from_hf_model
        from natix.quant.loader import load_artifact, quantized_scheme
        from natix.quant.models import load_base, resolve_dtype

        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        options = self._options(cfg, device)  # bad options fail before the slow load
        if options.load_format != "auto":
            self._load_dummy(cfg, options, device, dtype)
            return
        scheme = quantized_scheme(cfg.model)
        info: dict[str, Any] = {"source_scheme": scheme or "none"}
        if scheme is not None:
            if scheme not in ("fp8", "w4a8kv4"):
                raise EngineLoadError(f"the natix engine runs bf16 models and fp8 / w4a8kv4 artifacts; {cfg.model} is a "
                                      f"{scheme!r} artifact (serve gptq with the vllm engine)")
            if cfg.adapter:
                raise EngineLoadError("an adapter goes into a quantized artifact at export (natix-quant export "
                                      "--adapter), not at load")
            model, tok = load_artifact(cfg.model, dtype=cfg.dtype, device="cpu")
            artifact_kv = getattr(model, "natix_kv_cache", "none")
            kv = "int4" if artifact_kv == "int4" else "none"
            if kv == "int4" and getattr(model, "natix_kv_key_block", 0):
                raise EngineLoadError(
                    f"{cfg.model}: its KV4 keys are per channel over blocks of {model.natix_kv_key_block} tokens "
                    "(w4a8kv4 kv_key_block), a layout the natix engine's paged cache and kernels do not serve yet; "
                    "run it with --engine hf, or export with kv_key_block=0 (keys per token)")
            if artifact_kv == "fp8":
                info["note"] = "the artifact's static fp8 KV scales are not used: the natix engine's fp8 path keeps a 16-bit cache"
            weights = from_hf_model(model, "w4a8kv4" if scheme == "w4a8kv4" else "fp8", kv)
        else:
            model, tok = load_base(cfg.model, dtype=cfg.dtype, device="cpu")
            if cfg.adapter:
                model, info["merge_report"] = merge_adapter_into(model, cfg.adapter)
            weights = from_hf_model(model, "dense", "none")
        eos = _eos_ids(model, tok)
        del model
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.cfg = cfg
        self.load_weights(weights.to(torch.device(device), dtype), tok, eos, options=options, info=info)

    def _load_dummy(self, cfg: EngineConfig, options: EngineOptions, device: str, dtype: Any) -> None:
        """``load_format=dummy-*``: random weights of ``cfg.model``'s config.json shape, made on the
        device in the scheme's served layout (seconds for an 8B shape), and the directory's tokenizer
        if it has one."""
        import torch
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        from natix.engines.natix.spec import LOAD_FORMATS, ModelSpec
        from natix.engines.natix.weights import random_weights

        if cfg.adapter:
            raise EngineLoadError(f"load_format={options.load_format} makes random weights: an adapter has nothing "
                                  "to merge into")
        try:
            hf_cfg = AutoConfig.from_pretrained(cfg.model)
        except (OSError, ValueError) as e:
            raise EngineLoadError(f"load_format={options.load_format} needs a model directory with a config.json: "
                                  f"{cfg.model}: {e}") from e
        spec = ModelSpec.from_hf_config(hf_cfg)
        scheme, group = LOAD_FORMATS[options.load_format]
        text_cfg = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
        # the rotary tables as transformers computes them for this config (rope scaling included);
        # Mistral and Qwen2 share Llama's rotary module
        rotary = LlamaRotaryEmbedding(text_cfg)
        weights = random_weights(spec, scheme, device=torch.device(device), dtype=dtype, group_size=group,
                                 rope=(rotary.inv_freq.float(), float(rotary.attention_scaling)))
        try:
            tok = AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError, TypeError):
            tok = None  # prompts must then be token ids
        if tok is not None and tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        eos = getattr(text_cfg, "eos_token_id", None)
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        self.cfg = cfg
        self.load_weights(weights, tok, eos_ids, options=options,
                          info={"source_scheme": scheme, "load_format": options.load_format})

    def _options(self, cfg: EngineConfig, device: str) -> EngineOptions:
        defaults = {"max_num_seqs": 256 if device == "cuda" else max(1, cfg.max_batch_size)}
        return EngineOptions.from_extra(cfg.extra, **defaults)

    def load_weights(self, weights: Any, tokenizer: Any = None, eos_ids: Optional[set[int]] = None, *,
                     options: Optional[EngineOptions] = None, info: Optional[dict[str, Any]] = None) -> None:
        """Run ``weights`` (a ModelWeights already on its device). Without a tokenizer, prompts must
        be token ids and texts are empty."""
        from natix.engines.natix.block_manager import BlockManager
        from natix.engines.natix.model_runner import ModelRunner
        from natix.engines.natix.scheduler import Scheduler

        o = options or EngineOptions()
        device = weights.embed.device
        if o.async_scheduling is None:
            import dataclasses

            o = dataclasses.replace(o, async_scheduling=device.type == "cuda")
        self.options = o
        spec = weights.spec
        max_len = o.max_model_len or min(spec.max_positions, 4096)
        if max_len > spec.max_positions:
            raise EngineLoadError(f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                                  f"{spec.max_positions}")
        if spec.sliding_window and spec.sliding_window < max_len:
            raise EngineLoadError(f"this model uses sliding-window attention ({spec.sliding_window} tokens), which the "
                                  f"natix engine does not implement; set max_model_len <= {spec.sliding_window}")
        self.max_model_len = max_len
        self.runner = ModelRunner(weights, o, max_len, device, weights.embed.dtype)
        self.scheduler = Scheduler(BlockManager(self.runner.kv.num_pages, o.page_size, o.enable_prefix_caching),
                                   o.max_num_seqs, o.max_num_batched_tokens)
        self.tokenizer = tokenizer
        self._eos = set(eos_ids or ())
        self.weights_scheme = weights.scheme
        self._load_info = {**(info or {}), **weights.info}
        if device.type == "cuda" and o.warmup != "none":
            t0 = time.perf_counter()
            lengths = self.runner.warmup_prefill()
            t1 = time.perf_counter()
            self.runner.warmup(modes=tuple(m.strip() for m in o.warmup.split(",")))
            self._load_info["warmup"] = {"prefill_lengths": lengths, "prefill_s": round(t1 - t0, 3),
                                         "graphs": len(self.runner.graphs), "graphs_s": round(time.perf_counter() - t1, 3)}
        if self.cfg is None:
            self.cfg = EngineConfig(model="<weights>", device=str(device), dtype=str(weights.embed.dtype))

    def close(self) -> None:
        self._pending = None
        self.runner = None
        self.scheduler = None
        self._requests.clear()
        self._inbox.clear()
        release_memory()

    def info(self) -> dict[str, Any]:
        r, o = self.runner, self.options
        if r is None or o is None:
            return {"engine": "natix", "loaded": False}
        return {
            "engine": "natix", "model": self.cfg.model if self.cfg else None,
            "adapter": self.cfg.adapter if self.cfg else None, "device": str(r.device), "dtype": str(r.dtype),
            "scheme": self.weights_scheme, "kv_cache": r.kv_kind, "kv_groups": r.kv_groups,
            "kv_pages": r.kv.num_pages,
            "page_size": r.page_size, "kv_capacity_tokens": r.kv.capacity_tokens, "kv_cache_bytes": r.kv.nbytes,
            "weight_bytes": r.weight_bytes, "max_model_len": self.max_model_len, "max_num_seqs": o.max_num_seqs,
            "max_num_batched_tokens": o.max_num_batched_tokens, "prefill_attention": o.prefill_attention,
            "cuda_graphs": r.use_graphs, "graphs_captured": [f"{b}:{m}:{c}" for b, m, c in sorted(r.graphs)], "graph_capture_s": round(r.capture_s, 3),
            "prefix_caching": o.enable_prefix_caching, "async_scheduling": o.async_scheduling,
            "decode_steps_ahead": self.steps_ahead, "preemptions": self.scheduler.preemptions,
            "prefix_cache_hit_tokens": self.scheduler.blocks.cache_hit_tokens, **self._load_info,
        }

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(running=len(s.running), waiting=len(s.waiting), kv_cache_usage=s.blocks.usage(),
                           kv_capacity_tokens=self.runner.kv.capacity_tokens, preemptions=s.preemptions,
                           prompt_tokens=self._prompt_tokens, generation_tokens=self._generation_tokens,
                           prefix_cache_hit_tokens=s.blocks.cache_hit_tokens)

    # ------------------------------------------------------------------------------ requests
    def add_request(self, prompt: str | Sequence[int], spec: SamplingSpec, request_id: Optional[str] = None) -> str:
        return self._add(prompt, spec, request_id, stream_text=True)

    def _add(self, prompt: str | Sequence[int], spec: SamplingSpec, request_id: Optional[str], stream_text: bool) -> str:
        if self.runner is None:
            raise RuntimeError("the natix engine is not loaded")
        ids = self._prompt_ids(prompt)
        vocab = self.runner.spec.vocab
        if not ids:
            raise RequestError("the prompt is empty after tokenization")
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        total = len(ids) + spec.max_tokens
        if total > self.max_model_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({spec.max_tokens}) = {total} exceeds this "
                               f"engine's max_model_len of {self.max_model_len} tokens")
        o = self.options
        assert o is not None
        if spec.n > o.max_num_seqs:
            raise RequestError(f"n={spec.n} samples exceed the engine's max_num_seqs={o.max_num_seqs}")
        ps = o.page_size
        need = len(ids) // ps + spec.n * (-(-((len(ids) % ps) + spec.max_tokens) // ps))
        usable = self.scheduler.blocks.usable_pages
        if need > usable:
            raise RequestError(f"this request can need {need} KV pages ({spec.n} x (prompt + {spec.max_tokens} "
                               f"tokens)) but the cache has {usable}: lower n or max_tokens")
        rid = request_id if request_id is not None else uuid.uuid4().hex
        seed = spec.seed if spec.seed is not None else secrets.randbits(62)
        req = Request(rid, ids, spec, seed, time.perf_counter(), stream_text=stream_text)
        req.seqs = [Seq(req, j, list(ids)) for j in range(spec.n)]
        with self._lock:
            if rid in self._requests:
                raise RequestError(f"request id {rid!r} is already in use")
            self._requests[rid] = req
        self._inbox.append(("add", req))
        return rid

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: give token ids")
            add_special = bool(self.cfg.extra.get("add_special_tokens", False)) if self.cfg else False
            return list(self.tokenizer(prompt, add_special_tokens=add_special).input_ids)
        try:
            return [int(t) for t in prompt]
        except (TypeError, ValueError) as e:
            raise RequestError(f"a prompt is a string or a sequence of token ids: {e}") from e

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self._inbox) or (self.scheduler is not None and self.scheduler.has_work())

    # ------------------------------------------------------------------------------ the step
    def step(self) -> list[RequestDelta]:
        deltas: list[RequestDelta] = []
        self._drain(deltas)
        if self._pending is not None:  # async scheduling: a decode step is in flight
            pending, self._pending = self._pending, None
            self._pending = self._launch_ahead(pending)
            self._collect(pending, deltas)
            return deltas
        seqs, prefill = self.scheduler.schedule()
        if not seqs:
            self.last_step = {}
            return deltas
        runner = self.runner
        if prefill:
            t = time.perf_counter()
            for s in seqs:
                if s.request.started is None:
                    s.request.started = t
        else:
            try:
                pending = runner.launch_decode(seqs)
            except Exception as e:  # noqa: BLE001 - a failed step fails its sequences, not the engine
                self._fail(seqs, e, False, deltas)
                return deltas
            self._pending = self._launch_ahead(pending)
            self._collect(pending, deltas)
            return deltas
        self.last_step = {"prefill": True, "seqs": len(seqs), "tokens": sum(len(s.token_ids) - s.num_cached_tokens for s in seqs)}
        try:
            logits = runner.prefill(seqs)
            self._prompt_tokens += self.last_step["tokens"]
            rows, sampled = [], []
            for i, s in enumerate(seqs):
                rows.append(i)
                sampled.append(s)
                req = s.request
                if not req.forked and s.index == 0 and len(req.seqs) > 1:
                    runner.copy_pages(self.scheduler.fork(s))
                    for c in req.seqs[1:]:
                        if c.status is Status.RUNNING:
                            rows.append(i)
                            sampled.append(c)
                elif not req.forked:
                    req.forked = True
            if rows != list(range(len(seqs))):
                import torch

                logits = logits[torch.tensor(rows, device=logits.device)]
            tokens, lps, tops = runner.sample(logits, sampled)
        except Exception as e:  # noqa: BLE001 - a failed step fails its sequences, not the engine
            self._fail(seqs, e, True, deltas)
            return deltas
        self._emit(sampled, tokens, lps, tops, deltas)
        return deltas

    def _launch_ahead(self, pending: Any) -> Any:
        """Async scheduling: launch the next decode step of the running sequences before ``pending``
        (launched, not collected) is read, its input tokens taken on the device from ``pending``'s. Only
        when the next step would be that decode anyway: nothing waits to be admitted, every running
        sequence is in ``pending``, and every page it needs is free (no preemption). A sequence that
        finishes on ``pending``'s token wastes one token of compute; its result is dropped."""
        o, sched = self.options, self.scheduler
        if not o.async_scheduling or sched.waiting or self._inbox:
            return None
        members = {id(s) for s in pending.seqs}
        if any(id(s) not in members for s in sched.running):
            return None
        seqs = [s for s in sched.running
                if s.num_output_tokens + s.inflight < s.request.spec.max_tokens
                and len(s.token_ids) + s.inflight < self.max_model_len]
        if not seqs or sum(map(sched.blocks.needs_page, seqs)) > sched.blocks.num_free:
            return None
        for s in seqs:
            sched.blocks.append_slot(s)
        try:
            nxt = self.runner.launch_decode(seqs, pending)
            self.steps_ahead += 1
            return nxt
        except Exception:  # noqa: BLE001 - the step is run again, synchronously, after the collect
            log.exception("natix engine: launching a decode step ahead failed")
            return None

    def _collect(self, pending: Any, deltas: list[RequestDelta]) -> None:
        """Read a launched decode step and emit its tokens; sequences that finished (or were aborted)
        while it ran drop theirs. The step launched ahead of it, if all its sequences are now finished,
        is collected and dropped."""
        self.last_step = {"prefill": False, "seqs": len(pending.seqs), "tokens": len(pending.seqs)}
        try:
            tokens, lps, tops = self.runner.collect(pending)
        except Exception as e:  # noqa: BLE001 - a failed step fails its sequences, not the engine
            self._pending = None
            self._fail(pending.seqs, e, False, deltas)
            return
        live = [j for j, s in enumerate(pending.seqs) if not s.finished]
        if len(live) < len(pending.seqs):
            seqs = [pending.seqs[j] for j in live]
            tokens, lps = [tokens[j] for j in live], [lps[j] for j in live]
            tops = [tops[j] for j in live] if tops is not None else None
        else:
            seqs = pending.seqs
        self._emit(seqs, tokens, lps, tops, deltas)
        nxt = self._pending
        if nxt is not None and all(s.finished for s in nxt.seqs):
            # waited for, not read: its pinned buffers are then free for the steps after it
            self.runner.collect(nxt)
            self._pending = None

    def _emit(self, sampled: list[Seq], tokens: list[int], lps: list[float], tops: Optional[list[Any]],
              deltas: list[RequestDelta]) -> None:
        now = time.perf_counter()
        self._generation_tokens += len(sampled)
        for j, s in enumerate(sampled):
            self._append(s, tokens[j], lps[j], tops[j] if tops is not None else None, now)
            deltas.append(self._delta(s))
        self._forget_finished(sampled)

    def _fail(self, seqs: list[Seq], e: Exception, prefill: bool, deltas: list[RequestDelta]) -> None:
        log.error("natix engine step failed", exc_info=e)
        now = time.perf_counter()
        if prefill:
            for s in seqs:
                self.scheduler.blocks.forget(s.block_table)
        for s in {id(x): x for x in seqs}.values():
            s.inflight = 0
            for sib in s.request.seqs:
                if not sib.finished:
                    self.scheduler.finish(sib, "error", now, f"{type(e).__name__}: {e}")
                    deltas.append(self._delta(sib))
        self._forget_finished(seqs)

    def _drain(self, deltas: list[RequestDelta]) -> None:
        now = time.perf_counter()
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                if item.aborted:
                    continue
                self.scheduler.add(item)
            else:
                req = self._requests.get(item)
                if req is None or req.aborted:
                    continue
                req.aborted = True
                for s in req.seqs:
                    if not s.finished:
                        self.scheduler.finish(s, "abort", now)
                        deltas.append(self._delta(s))
                with self._lock:
                    self._requests.pop(item, None)

    def _forget_finished(self, seqs: list[Seq]) -> None:
        for req in {id(s.request): s.request for s in seqs}.values():
            if req.finished:
                with self._lock:
                    if self._requests.get(req.request_id) is req:
                        del self._requests[req.request_id]

    def _append(self, s: Seq, token: int, logprob: float, top: Optional[dict[int, float]], now: float) -> None:
        spec = s.request.spec
        s.token_ids.append(token)
        s.logprobs.append(logprob)
        if top is not None:
            s.top_logprobs.append(top)
        if s.first_token_time is None:
            s.first_token_time = now
        if s.request.stream_text or spec.stop:
            self._detokenize(s)
        reason = None
        if token in self._eos:
            reason = "stop"
        elif spec.stop and self._cut_stop(s):
            reason = "stop"
        elif s.num_output_tokens >= spec.max_tokens or len(s.token_ids) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(s, reason, now)

    # ------------------------------------------------------------------------------ text
    def _detokenize(self, s: Seq) -> None:
        """Incremental decode of the output tokens (prefix/read offsets over the output, so a
        multi-byte character split across tokens appears once it is complete)."""
        if self.tokenizer is None:
            return
        out = s.output_ids
        prefix = self.tokenizer.decode(out[s.prefix_offset:s.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(out[s.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            s.text += full[len(prefix):]
            s.prefix_offset, s.read_offset = s.read_offset, len(out)

    def _cut_stop(self, s: Seq) -> bool:
        stops = s.request.spec.stop
        cuts = [i for i in (s.text.find(x) for x in stops if x) if i >= 0]
        if not cuts:
            return False
        s.text = s.text[: min(cuts)]
        return True

    def _final_text(self, s: Seq) -> str:
        if self.tokenizer is None:
            return ""
        ids = s.output_ids
        if ids and ids[-1] in self._eos:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(x) for x in s.request.spec.stop if x) if i >= 0]
        return text[: min(cuts)] if cuts else text

    def _delta(self, s: Seq) -> RequestDelta:
        req, spec = s.request, s.request.spec
        new = s.output_ids[s.sent_tokens:]
        lps = s.logprobs[s.sent_tokens:]
        tops = s.top_logprobs[s.sent_tokens:] if spec.top_logprobs else None
        s.sent_tokens = s.num_output_tokens
        completion = None
        if s.finished:
            text = self._final_text(s)
            emitted = s.text[:s.sent_text]
            new_text = text[len(emitted):] if text.startswith(emitted) else ""
            s.sent_text = len(text)
            completion = Completion(text=text, token_ids=tuple(s.output_ids),
                                    token_logprobs=tuple(s.logprobs) if spec.logprobs else None,
                                    finish_reason=s.finish_reason or "length", timing=self._timing(s),
                                    top_logprobs=tuple(s.top_logprobs) if spec.top_logprobs else None)
        elif req.stream_text:
            hold = max((len(x) for x in spec.stop), default=1) - 1  # text that may still become a stop string
            upto = max(s.sent_text, len(s.text) - hold)
            new_text = s.text[s.sent_text:upto]
            s.sent_text = upto
        else:
            new_text = ""
        return RequestDelta(request_id=req.request_id, index=s.index, token_ids=tuple(new),
                            logprobs=tuple(lps) if spec.logprobs else None, text=new_text,
                            finish_reason=s.finish_reason if s.finished else None, completion=completion,
                            error=s.error, top_logprobs=tuple(tops) if tops is not None else None)

    @staticmethod
    def _timing(s: Seq) -> Timing:
        arrival = s.request.arrival
        first = s.first_token_time if s.first_token_time is not None else (s.finish_time or arrival)
        end = s.finish_time if s.finish_time is not None else first
        n = s.num_output_tokens
        started = s.request.started
        return Timing(ttft_s=first - arrival, decode_s_per_token=(end - first) / (n - 1) if n > 1 else 0.0,
                      total_s=end - arrival, queue_s=started - arrival if started is not None else None)

    # ------------------------------------------------------------------------------ batch API
    def generate(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[Completion]]:
        if self.runner is None:
            raise RuntimeError("NatixEngine.generate called before load()")
        if isinstance(prompts, str):
            raise TypeError("generate takes a sequence of prompts, not a single string")
        ids = []
        try:
            for i, p in enumerate(prompts):
                try:
                    ids.append(self._add(p, spec, None, stream_text=False))
                except RequestError as e:
                    raise ValueError(f"prompt {i}: {e}") from e
        except BaseException:
            for rid in ids:
                self.abort(rid)
            self._drain([])
            raise
        done: dict[str, dict[int, Completion]] = {rid: {} for rid in ids}
        errors: list[str] = []
        while any(len(done[r]) < spec.n for r in ids):
            if not self.has_unfinished():  # pragma: no cover - would be an engine bug
                raise RuntimeError("natix engine: requests were lost (nothing left to run)")
            for d in self.step():
                if d.request_id in done and d.completion is not None:
                    done[d.request_id][d.index] = d.completion
                    if d.finish_reason == "error":
                        errors.append(d.error or "unknown error")
            if errors:
                for rid in ids:
                    self.abort(rid)
                self._drain([])
                raise RuntimeError(f"natix engine: generation failed: {errors[0]}")
        return [[done[rid][j] for j in range(spec.n)] for rid in ids]
