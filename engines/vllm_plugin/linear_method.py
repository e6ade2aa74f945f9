"""``W4A8LinearMethod``: vLLM's ``LinearMethodBase`` over natix's packed W4A8 weights.

vLLM builds every Linear of its model code with the quantization config's method (``create_weights``
registers the parameters the checkpoint loads into, ``process_weights_after_loading`` turns them into
what the kernel reads, ``apply`` runs the layer), and does the tensor-parallel sharding and the
fusing (QKV, gate/up) itself, in its layers' weight loaders. This method lets it:

- ``scale`` [N], ``zero`` [N] (per channel) and ``group_scale`` / ``group_zero`` [K/G, N] (progressive, G = 128, 64 or 32)
  are ordinary tensors with an output dim (and, for the group tensors, an input dim): vLLM's
  loaders narrow them for the rank's shard and write each fused part at its offset, as for any
  quantized checkpoint.
- ``qweight`` is not: the format (:mod:`natix.kernels.packing`) pairs output rows ``j`` and
  ``j + N/2`` of the *whole* layer in one byte, so a shard of rows is no slice of the packed
  tensor. The parameter vLLM loads into therefore holds the unpacked UINT4 codes ``[N, K]`` (one
  per byte): its loader unpacks the checkpoint tensor (``unpack_uint4``) and hands the codes to
  vLLM's own loader, which slices and places them like any other weight. After loading, the
  rank's codes (all fused parts of its shard) are packed again (``pack_uint4``), exactly what
  :func:`natix.kernels.packing.concat_packed` does for natix's own fused GEMMs.

Row-parallel layers (o_proj, down_proj) shard K. Each rank quantizes *its* slice of the
activations per token (the scale is that slice's amax, as vLLM's dynamic per-token methods do) and
multiplies it by its slice of the integer weight; per channel, the zero correction
``x_sum[m] * zero[n]`` uses that slice's code sum, so each partial result is exact for its shard
and the all-reduce adds them. With ``tensor_parallel_size > 1`` these layers are therefore not bit
for bit the unsharded layer (each shard's activation scale is finer); column-parallel layers are.
A progressive row-parallel shard needs ``K / tp`` to be a multiple of G (groups cannot straddle ranks).

Compute: on CUDA natix's Triton ops (``natix::rmsnorm_quant`` per-token INT8, ``natix::w4a8_gemm``),
``torch.library`` custom ops with fake kernels, so vLLM's torch.compile and CUDA graphs see through
them; elsewhere the exact reference (``w4a8_gemm_reference`` on an integer weight unpacked once),
bit for bit what natix's reference module :class:`natix.quant.w4a8.W4A8Linear` computes on CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.utils import set_weight_attrs

from natix.engines.vllm_plugin.artifact import PluginRefused
from natix.kernels.packing import W4A8Weight, integer_weight, pack_uint4, unpack_uint4


class W4A8LinearMethod(LinearMethodBase):
    """One (possibly fused, possibly sharded) W4A8 linear of vLLM's model.

    ``prefix``: the vLLM layer name (for messages); ``group_size``: 128, 64, 32 or -1; ``shape``: the
    checkpoint's unsharded ``[out, in]`` of the layer (fused parts summed), checked against the
    shape vLLM's model code builds.
    """

    def __init__(self, prefix: str, group_size: int, shape: tuple[int, int]) -> None:
        self.prefix, self.group_size, self.shape = prefix, group_size, shape

    # ------------------------------------------------------------------------------ load
    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        if (output_size, input_size) != self.shape:
            raise PluginRefused(f"natix vLLM plugin: {self.prefix}: vLLM's model builds a [{output_size}, {input_size}] "
                                f"linear but the artifact's layers record {list(self.shape)}; config.json and the "
                                "checkpoint disagree")
        n, k = sum(output_partition_sizes), input_size_per_partition
        if n % 2:
            raise PluginRefused(f"natix vLLM plugin: {self.prefix}: this rank's shard has {n} output rows; the W4A8 "
                                "format pairs rows, so it needs an even number (choose another tensor_parallel_size)")
        g = self.group_size
        if g > 0 and k % g:
            raise PluginRefused(f"natix vLLM plugin: {self.prefix}: g{g} weights sharded to in_features {k} per rank "
                                f"(of {input_size}); groups of {g} cannot straddle ranks, so "
                                f"in_features / tensor_parallel_size must be a multiple of {g} (or export "
                                "with --set group_fallback=channel, a smaller --set group_size, or -1)")
        loader = extra_weight_attrs.pop("weight_loader")
        u8 = torch.uint8

        def add(name: str, shape: tuple[int, ...], dtype: torch.dtype, dims: dict[str, int],
                load: Callable[..., None] = loader) -> None:
            param = Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(param, {**dims, "weight_loader": load, **extra_weight_attrs})
            layer.register_parameter(name, param)

        # codes [N, K], one per byte, until process_weights_after_loading packs them
        add("qweight", (n, k), u8, {"output_dim": 0, "input_dim": 1}, _unpacking(loader, self.prefix))
        add("scale", (n,), torch.float32, {"output_dim": 0})
        if g > 0:
            add("group_scale", (k // g, n), u8, {"input_dim": 0, "output_dim": 1})
            add("group_zero", (k // g, n), u8, {"input_dim": 0, "output_dim": 1})
        else:
            add("zero", (n,), u8, {"output_dim": 0})

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        codes = layer.qweight.data
        grouped = self.group_size > 0
        w = W4A8Weight(
            pack_uint4(codes), layer.scale.data.contiguous(),
            group_scale=layer.group_scale.data.contiguous() if grouped else None,
            group_zero=layer.group_zero.data.contiguous() if grouped else None,
            zero=None if grouped else layer.zero.data.contiguous())
        w.validate()
        wi = integer_weight(w)
        if wi.numel() and (int(wi.min()) < -128 or int(wi.max()) > 127):
            raise PluginRefused(f"natix vLLM plugin: {self.prefix}: q4 * group_scale - group_zero leaves INT8 "
                                "(the export clamps level 0 to [-119, 119]); the checkpoint is corrupt")
        layer.qweight = Parameter(w.qweight, requires_grad=False)
        layer.natix_weight = w
        layer.natix_wi = None
        if w.qweight.is_cuda:
            from natix.kernels.select import LinearSpec, can_implement

            scheme = f"w4a8_g{self.group_size}" if grouped else "w4a8_channel"
            ok, why = can_implement(LinearSpec(scheme, w.n, w.k, str(w.qweight.device), layer.params_dtype))
            if not ok or w.k % 4:
                raise PluginRefused(f"natix vLLM plugin: {self.prefix}: natix's W4A8 Triton kernel cannot run this "
                                    f"[{w.n}, {w.k}] layer here: {why if not ok else 'K % 4 != 0'}")
        else:
            # float32 holds these integers exactly; unpacked once, not per call
            layer.natix_wi = wi.float()

    # ------------------------------------------------------------------------------ run
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``."""
        w: W4A8Weight = layer.natix_weight
        x2 = x.reshape(-1, w.k).contiguous()
        if layer.natix_wi is None:
            from natix.kernels.rmsnorm_quant import quantize_per_token
            from natix.kernels.w4a8_gemm import w4a8_gemm

            xq, xs, xsum = quantize_per_token(x2)
            y = w4a8_gemm(xq, xs, w, xsum, bias, x.dtype)
        else:
            from natix.kernels.rmsnorm_quant import rmsnorm_quant_reference
            from natix.kernels.w4a8_gemm import w4a8_gemm_reference

            xq, xs, _ = rmsnorm_quant_reference(x2, None)
            y = w4a8_gemm_reference(xq, xs, w, bias, out_dtype=x.dtype, wi=layer.natix_wi)
        return y.reshape(*x.shape[:-1], w.n)


def _unpacking(loader: Callable[..., None], prefix: str) -> Callable[..., None]:
    """vLLM's weight loader of the layer, fed the unpacked codes of a packed checkpoint ``qweight``."""

    def load(param: Parameter, loaded_weight: torch.Tensor, *shard_id: Any) -> None:
        if loaded_weight.dtype != torch.uint8 or loaded_weight.dim() != 2:
            raise PluginRefused(f"natix vLLM plugin: {prefix}: a checkpoint qweight must be packed uint8 [N/2, K], "
                                f"got {loaded_weight.dtype} {list(loaded_weight.shape)}")
        loader(param, unpack_uint4(loaded_weight), *shard_id)

    return load
