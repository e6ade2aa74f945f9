"""``NatixW4A8KV4Config``: vLLM's ``QuantizationConfig`` for natix's ``natix-w4a8kv4`` artifacts.

vLLM finds it by the checkpoint's ``quantization_config.quant_method`` once :func:`natix.engines.
vllm_plugin.register` has registered it (vLLM calls that through the ``vllm.general_plugins``
entry point in every process it starts). It then asks it, per layer of vLLM's own model code,
for a method:

- a Linear whose checkpoint layers (a fused QKV or gate/up layer: all of its parts, through the
  model's ``packed_modules_mapping``) are quantized gets :class:`W4A8LinearMethod`; one the artifact
  kept in float (``ignore``) vLLM's unquantized method;
- embeddings and ``lm_head`` stay vLLM's (natix keeps them in float);
- attention gets nothing: the KV cache is vLLM's (``--kv-cache-dtype``, by default the model
  dtype). natix's KV4 cache (UINT4 per token and head) is not carried; the artifact's other
  transforms (rotation, smoothing, SmoothAttention) are folded into the weights, so vLLM's model
  code runs them unchanged. Accuracy is therefore that of the artifact's weights with a 16-bit KV
  cache (docs/scaling.md has the measured consequence), which the plugin says once at load.

Bad input is refused with a :class:`~natix.engines.vllm_plugin.artifact.PluginRefused` before any
weight loads: another natix method or an unknown format version (from ``config.json``, see
:meth:`override_quantization_method`), and an artifact directory whose manifest or checkpoint does
not match it (:meth:`maybe_update_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from natix.engines.vllm_plugin.artifact import ArtifactSpec
from natix.engines.vllm_plugin.linear_method import W4A8LinearMethod
from natix.quant.w4a8kv4_config import QUANT_METHOD

# under "vllm." so that vLLM's logging configuration (format, VLLM_LOGGING_LEVEL) applies to these lines
logger = init_logger(f"vllm.{__name__}")


class NatixW4A8KV4Config(QuantizationConfig):
    """natix W4A8KV4 (QServe QoQ): UINT4 weights (progressive in groups of 128, 64 or 32, or per channel), INT8 per-token
    activations; the format of ``docs/w4a8kv4-format.md``."""

    def __init__(self, spec: ArtifactSpec) -> None:
        super().__init__()
        self.spec = spec
        self.manifest: dict[str, Any] | None = None
        self._kv_said = False

    # ------------------------------------------------------------------------------ identity
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # INT8 tensor-core tl.dot (natix.kernels.select)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NatixW4A8KV4Config":
        return cls(ArtifactSpec.from_quantization_config(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """Claim every ``natix-*`` checkpoint, so that one this plugin cannot serve (another natix
        scheme name, a newer format) is refused by :meth:`from_config` with a sentence saying why,
        rather than by vLLM as an unknown quantization method."""
        method = hf_quant_cfg.get("quant_method") if isinstance(hf_quant_cfg, dict) else None
        if isinstance(method, str) and method.startswith("natix") and method != QUANT_METHOD:
            return QUANT_METHOD
        return None

    # ------------------------------------------------------------------------------ artifact
    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        path = Path(model_name)
        if path.is_dir():
            self.manifest = self.spec.check_directory(path)
        else:
            logger.warning("natix vLLM plugin: %s is not a local directory, so its natix manifest and checkpoint "
                           "are not verified before loading (config.json's quantization_config was)", model_name)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        self.spec = self.spec.renamed(hf_to_vllm_mapper.map_name)

    # ------------------------------------------------------------------------------ layers
    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            parts = self._checkpoint_layers(prefix)
            group_size = self.spec.group_size_of(prefix, parts)
            if group_size is None:
                return UnquantizedLinearMethod()
            return W4A8LinearMethod(prefix, group_size, self.spec.fused_shape(prefix, parts))
        if isinstance(layer, Attention):
            self._say_kv_cache(layer)
        return None

    def _checkpoint_layers(self, prefix: str) -> list[str]:
        """The checkpoint's layer names behind vLLM's layer ``prefix`` (its fused parts, or itself)."""
        head, _, proj = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(proj)
        if not parts:
            return [prefix]
        return [f"{head}.{p}" if head else p for p in parts]

    def _say_kv_cache(self, layer: torch.nn.Module) -> None:
        if self._kv_said:
            return
        self._kv_said = True
        kv = getattr(layer, "kv_cache_dtype", "auto")
        where = "the model dtype" if kv == "auto" else kv
        if self.spec.kv_cache == "int4":
            logger.warning(
                "natix vLLM plugin: this w4a8kv4 artifact was exported for natix's KV4 cache (UINT4 per token and "
                "head); vLLM has no such cache, so its KV cache runs in %s and the model is the artifact's weights "
                "with that cache (natix's reference path with kv_cache='none'), not KV4 (docs/scaling.md)", where)
        else:
            logger.info("natix vLLM plugin: KV cache in %s (the artifact was exported with kv_cache='none')", where)
        if kv != "auto" and kv.startswith("fp8"):
            logger.warning("natix vLLM plugin: w4a8kv4 artifacts carry no calibrated fp8 KV scales, so vLLM's fp8 KV "
                           "cache uses a scale of 1.0 in every layer; natix has not measured that accuracy")
