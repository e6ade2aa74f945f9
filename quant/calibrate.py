"""Calibrated, sequential quantization: one decoder layer at a time, each fed by the already
quantized layers before it (as GPTQ and llm-compressor's sequential pipeline do).

For every decoder layer ("block") of the model:

1. ``cfg.prepare_block(prefix, block, run_block, report)`` — function-preserving transforms that
   need the block's real input statistics (QoQ smoothing, fp8 KV scales); ``run_block()`` runs the
   block on every calibration sample;
2. forward pre-hooks accumulate each quantized Linear's GPTQ Hessian ``2/n Σ x xᵀ`` over the
   calibration tokens (Linears that read the same tensor — q/k/v, gate/up — share one accumulator);
3. ``cfg.quantize_linear(linear, name=..., hessian=H)`` replaces each Linear;
4. the *quantized* block runs again and its outputs become the next block's inputs, so later
   layers are calibrated on the activations they will see when served.

Memory: the model stays in its storage dtype (bf16 by default); only the block being worked on is
upcast to fp32, plus the calibration activations (samples x tokens x hidden, fp32) and one block's
Hessians (fp64 [K, K] per distinct input). Linears outside the decoder layers that the scheme does
not skip (e.g. an lm_head a user chose to quantize) are rounded to nearest, without a Hessian.

Samples run one at a time (batch 1): no padding, so no masked positions leak into the Hessians.

``device`` (e.g. ``cuda``): the model stays on the CPU; each decoder layer in turn moves to the
device with the calibration activations, which stay there between layers, and its Hessians and
GPTQ solves run there. Peak device memory: one fp32 layer, the activations, one layer's Hessians.
"""

from __future__ import annotations

import contextlib

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from natix.quant.errors import QuantError
from natix.quant.schemes import QuantConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

Progress = Callable[[int, int, str], None]


class _Captured(Exception):
    """Raised by the hook on the first decoder layer once its inputs are recorded."""


def decoder_layers(model: "nn.Module") -> tuple[str, "nn.ModuleList"]:
    """(module name, layers) of the model's decoder stack (``model.model.layers`` for the Llama
    family); a clear error for architectures without one."""
    from torch import nn

    for name in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        try:
            layers = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers):
            return name, layers
    raise QuantError(f"{type(model).__name__}: no decoder layer stack found (looked for model.layers, "
                     "transformer.h, ...); calibrated export supports decoder-only transformers")


def _to_device(x: Any, device: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _to_fp32(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_fp32(v) for v in x)
    return x


def capture_block_inputs(model: "nn.Module", samples: Sequence[Sequence[int]]
                         ) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The (args, kwargs) each sample brings to the first decoder layer, floats in fp32.

    The embedding output is upcast before the stack runs (``inputs_embeds``), so the rotary
    tables are computed in fp32 too, whatever the model's storage dtype."""
    import torch

    _, layers = decoder_layers(model)
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kw = {k: _to_fp32(v) for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache")}
        kw["use_cache"] = False
        captured.append((_to_fp32(args), kw))
        raise _Captured

    dev = next(model.parameters()).device
    embed = model.get_input_embeddings()
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in samples:
                t = torch.tensor([list(ids)], dtype=torch.long, device=dev)
                with contextlib.suppress(_Captured):  # the hook stops the forward at layer 0
                    model(inputs_embeds=embed(t).float(), use_cache=False)
    finally:
        handle.remove()
    if len(captured) != len(samples):
        raise QuantError("the first decoder layer was not reached for every calibration sample")
    return captured


def _block_output(out: Any) -> "torch.Tensor":
    return out[0] if isinstance(out, (tuple, list)) else out


def _linears(block: "nn.Module", prefix: str, cfg: QuantConfig) -> dict[str, "nn.Linear"]:
    from torch import nn

    return {n: m for n, m in block.named_modules() if type(m) is nn.Linear and not cfg.skips(f"{prefix}.{n}")}


def collect_hessians(block: "nn.Module", linears: dict[str, "nn.Linear"], run_block: Callable[[], None]
                     ) -> dict[str, "torch.Tensor"]:
    """Run the block once with hooks; return each Linear's Hessian (fp64 [K, K]). Linears fed
    the very same input tensor share one accumulator (and so one Hessian object)."""
    from natix.quant.gptq import HessianAccumulator

    accs: dict[str, HessianAccumulator] = {}
    share: dict[str, str] = {}  # linear -> the linear whose accumulator it shares
    # id of this sample's input tensor -> (first linear that read it, the tensor: held so that
    # its id cannot be reused by a later tensor of the same sample)
    seen: dict[int, tuple[str, Any]] = {}
    first_pass = [True]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_m: Any, args: tuple[Any, ...]) -> None:
            x = args[0]
            if first_pass[0] and name not in share:
                owner = seen.setdefault(id(x), (name, x))[0]
                share[name] = owner
                if owner == name:
                    accs[name] = HessianAccumulator(x.shape[-1], device=x.device)
            if share[name] == name:
                accs[name].add(x)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()]

    def on_sample_end() -> None:
        first_pass[0] = False
        seen.clear()

    try:
        run_block(on_sample_end)
    finally:
        for h in handles:
            h.remove()
    hessians = {owner: accs.pop(owner).hessian(consume=True) for owner in list(accs)}
    return {n: hessians[share[n]] for n in linears}


def quantize_sequential(model: "nn.Module", cfg: QuantConfig, samples: Sequence[Sequence[int]], *,
                        progress: Progress | None = None, report: dict[str, Any] | None = None,
                        device: Any = None) -> tuple[list[str], list[str]]:
    """Quantize ``model`` in place block by block (see the module docstring); returns
    (quantized Linear names, skipped Linear names). ``report`` collects the scheme's notes;
    ``device``: where each block is calibrated and quantized (default: where the model is)."""
    import torch
    from torch import nn

    report = {} if report is None else report
    stack_name, layers = decoder_layers(model)
    storage = next(layers[0].parameters()).dtype
    all_linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    skipped = [n for n in all_linears if cfg.skips(n)]
    quantized: list[str] = []
    total = len(all_linears) - len(skipped)

    with torch.no_grad():
        home = next(layers[0].parameters()).device
        work = torch.device(device) if device is not None else home
        inputs = _to_device(capture_block_inputs(model, samples), work)
        for i, block in enumerate(layers):
            prefix = f"{stack_name}.{i}"
            block.to(work).float()

            def run_block(after_sample: Callable[[], None] | None = None, block: nn.Module = block) -> None:
                for args, kwargs in inputs:
                    block(*args, **kwargs)
                    if after_sample:
                        after_sample()

            cfg.prepare_block(prefix, block, run_block, report)
            linears = _linears(block, prefix, cfg)
            hessians = collect_hessians(block, linears, run_block) if linears and cfg.needs_hessians() else {}
            for name, lin in linears.items():
                full = f"{prefix}.{name}"
                block.set_submodule(name, cfg.quantize_linear(lin, name=full, hessian=hessians.pop(name, None)))
                quantized.append(full)
                if progress:
                    progress(len(quantized), total, full)
            del hessians
            for j, (args, kwargs) in enumerate(inputs):  # in place: one sample's input freed per output
                inputs[j] = ((_block_output(block(*args, **kwargs)),) + tuple(args[1:]), kwargs)
            block.to(storage).to(home)  # norms and biases back to storage dtype; quantized tensors keep theirs
        # Linears outside the decoder stack that the scheme quantizes: round to nearest
        for name in all_linears:
            if name in quantized or name in skipped or name.startswith(stack_name + "."):
                continue
            model.set_submodule(name, cfg.quantize_linear(model.get_submodule(name), name=name, hessian=None))
            quantized.append(name)
            if progress:
                progress(len(quantized), total, name)
    return quantized, skipped
