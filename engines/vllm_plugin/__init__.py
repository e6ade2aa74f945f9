"""natix.engines.vllm_plugin: natix's w4a8kv4 artifacts served by vLLM, through vLLM's plugin mechanism.

How vLLM finds it: natix declares the entry point ``natix = "natix.engines.vllm_plugin:register"``
in the group ``vllm.general_plugins`` (pyproject.toml). vLLM calls every such function in each
process it starts (API server, engine core, tensor-parallel workers) before it reads a model's
config, so with natix installed beside vLLM, ``vllm serve <w4a8kv4 artifact>`` needs no flag and no
user code: :func:`register` registers :class:`~natix.engines.vllm_plugin.config.NatixW4A8KV4Config`
under the artifact's ``quant_method`` (``natix-w4a8kv4``) with vLLM's
``register_quantization_config``, and vLLM picks it from ``config.json``.

Modules: ``artifact`` (what the plugin reads from an artifact and refuses; torch-free), ``config``
(the ``QuantizationConfig``), ``linear_method`` (the ``LinearMethodBase``: packed weights through
vLLM's fused / sharded layers, natix's W4A8 ops). Importing this package is cheap; vLLM is imported
by :func:`register`.
"""

from __future__ import annotations


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register natix's quantization config with vLLM.
    Safe to call more than once (vLLM loads plugins once per process; a repeat re-registers)."""
    from vllm.model_executor.layers.quantization import register_quantization_config

    from natix.engines.vllm_plugin.config import NatixW4A8KV4Config
    from natix.quant.w4a8kv4_config import QUANT_METHOD

    register_quantization_config(QUANT_METHOD)(NatixW4A8KV4Config)
