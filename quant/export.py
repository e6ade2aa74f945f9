"""Export: base (+ merged adapter) -> quantized artifact directory, written atomically.

Pipeline: check the inputs cheaply (scheme, --out, base path, adapter files, calibration source)
-> load the base in the artifact's storage dtype (bf16 by default) -> merge the adapter
(:func:`natix.quant.adapters.merge_adapter`: fp32, parity-checked, cast back) ->
``cfg.prepare_model`` (whole-model transforms, e.g. QoQ rotation) -> quantize:

- schemes that need calibration (GPTQ, smoothing, KV scales): :func:`natix.quant.calibrate.quantize_sequential`,
  one decoder layer at a time on calibration data (:mod:`natix.quant.calib`);
- the others (fp8 weights): every ``nn.Linear`` the scheme does not ignore, rounded to nearest,
  one at a time (:func:`quantize_model`);

-> write ``model.safetensors`` + ``config.json`` (with the scheme's ``quantization_config``) +
generation config + tokenizer + ``natix_manifest.json`` (per-layer ``layer_meta``, calibration,
transforms) inside :func:`natix.quant.artifact.atomic_dir`.

Peak memory: the model in its storage dtype, plus one decoder layer in fp32 with its calibration
activations and Hessians; merging an adapter upcasts the whole model to fp32 for the duration of
the merge (exactness of the parity check), so with an adapter the peak is ~2x the bf16 model.
The checkpoint is written in safetensors shards of up to 512 MiB (:func:`save_sharded`), which also
bounds the memory that writing it takes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from natix.quant.schemes import QuantConfig

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 512 * 2**20


@dataclass(frozen=True)
class ExportResult:
    out: Path
    scheme: str
    quantized: tuple[str, ...]  # module names replaced by quantized modules
    skipped: tuple[str, ...]  # Linear modules the scheme ignores
    bytes_written: int
    layers: dict[str, dict[str, Any]]  # quantized module -> its manifest record (layer_meta + shape)


def quantize_model(model: "nn.Module", cfg: QuantConfig,
                   progress: Callable[[int, int, str], None] | None = None) -> tuple[list[str], list[str]]:
    """Replace, in place and layer by layer, every ``nn.Linear`` of ``model`` that ``cfg`` does
    not skip with ``cfg.quantize_linear(linear)``; returns (quantized names, skipped names)."""
    import torch
    from torch import nn

    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    todo = [n for n in names if not cfg.skips(n)]
    skipped = [n for n in names if cfg.skips(n)]
    with torch.no_grad():
        for i, name in enumerate(todo):
            model.set_submodule(name, cfg.quantize_linear(model.get_submodule(name), name=name))
            if progress:
                progress(i + 1, len(todo), name)
    return todo, skipped


def unique_state_dict(model: "nn.Module") -> dict[str, Any]:
    """``model.state_dict()`` without the second name of tied tensors (first name kept:
    ``model.embed_tokens.weight`` before ``lm_head.weight``, as transformers saves them)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous()
    return out


def save_sharded(state: dict[str, Any], out: Path, max_shard_bytes: int | None = None) -> list[str]:
    """Write ``state`` as safetensors shards of at most ~``max_shard_bytes`` (Hugging Face's layout:
    ``model.safetensors`` when one shard suffices, else ``model-0000i-of-0000n.safetensors`` +
    ``model.safetensors.index.json``). safetensors' ``save_file`` builds the whole file in memory
    before writing it, so shards also bound the export's peak memory to model + one shard."""
    from safetensors.torch import save_file

    max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(v.numel() * v.element_size() for v in state.values())
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True) + "\n")
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        shard.clear()
    return names


def _layer_record(mod: "nn.Module") -> dict[str, Any]:
    """What the manifest keeps per quantized layer: the module's ``layer_meta()`` plus its
    ``shape`` [out_features, in_features] (inspect counts weights from it)."""
    return {**mod.layer_meta(), "shape": [int(mod.out_features), int(mod.in_features)]}


def _source_refs(base: str, adapter: str | None, adapter_type: str | None):
    from natix.quant.artifact import SourceRef
    from natix.quant.models import resolve_base, tree_sha256

    src = resolve_base(base)
    base_file = src.path / src.gguf_file if src.gguf_file else src.path
    base_ref = SourceRef(spec=base, sha256=tree_sha256(base_file))
    adapter_ref = (SourceRef(spec=str(Path(adapter).resolve()), sha256=tree_sha256(Path(adapter)), type=adapter_type)
                   if adapter else None)
    return base_ref, adapter_ref


def export(base: str, cfg: QuantConfig, out: str | Path, *, adapter: str | None = None, dtype: str = "bf16",
           force: bool = False, calib: str = "pydoc", calib_samples: int = 128, calib_max_length: int = 512,
           seed: int = 0, status: Callable[[str], None] | None = None,
           progress: Callable[[int, int, str], None] | None = None) -> ExportResult:
    """Quantize ``base`` (+ ``adapter``) with ``cfg`` and write the artifact to ``out``.

    ``calib`` (a task name, ``pydoc``, or a .jsonl/.txt file; see :mod:`natix.quant.calib`),
    ``calib_samples`` and ``calib_max_length`` matter only for schemes that need calibration.

    Raises (before writing anything): :class:`~natix.quant.errors.ArtifactError` if ``out``
    exists and not ``force``; :class:`~natix.quant.calib.CalibrationError` for a bad calibration
    source; :class:`~natix.quant.models.ModelLoadError` for a bad base;
    :class:`~natix.quant.errors.AdapterError` / ``MergeParityError`` for a bad adapter.
    """
    from natix.quant.adapters import merge_adapter, read_adapter
    from natix.quant.artifact import Manifest, atomic_dir, library_versions, write_manifest
    from natix.quant.errors import ArtifactError
    from natix.quant.models import _dtype, load_base, resolve_base

    say = status or (lambda _msg: None)
    out = Path(out)
    if out.exists() and not force:
        raise ArtifactError(f"output {out} already exists; pass --force to replace it")
    torch_dtype = _dtype(dtype)
    resolve_base(base)  # a missing base fails here, before any slow work
    files = read_adapter(adapter) if adapter else None
    calibrated = cfg.needs_calibration()
    if calibrated:
        from natix.quant.calib import check_source

        check_source(calib)
    cfg.hf_quantization_config()  # a missing library fails before the model load

    say(f"loading base {base}")
    model, tokenizer = load_base(base, dtype=dtype)
    merge = None
    if adapter:
        say(f"merging {files.peft_type} adapter {adapter}")
        model, merge = merge_adapter(model, adapter)
    transforms: dict[str, Any] = {}
    cfg.prepare_model(model, transforms)
    calib_info: dict[str, Any] | None = None
    if calibrated:
        from natix.quant.calib import load_calibration
        from natix.quant.calibrate import quantize_sequential

        say(f"reading calibration data ({calib})")
        samples = load_calibration(calib, tokenizer, samples=calib_samples, max_length=calib_max_length, seed=seed)
        calib_info = {"source": calib, "samples": len(samples), "max_length": calib_max_length, "seed": seed,
                      "tokens": sum(len(x) for x in samples)}
        say(f"quantizing ({cfg.scheme}, {len(samples)} calibration samples, layer by layer)")
        quantized, skipped = quantize_sequential(model, cfg, samples, progress=progress, report=transforms)
    else:
        say(f"quantizing ({cfg.scheme})")
        quantized, skipped = quantize_model(model, cfg, progress)
    model.to(torch_dtype)  # quantized modules keep their storage dtypes (see Fp8Linear._apply)

    layers = {n: _layer_record(model.get_submodule(n)) for n in quantized}
    hf_qc = cfg.hf_quantization_config(layers)
    base_ref, adapter_ref = _source_refs(base, adapter, files.peft_type if files else None)
    details: dict[str, Any] = {
        "quant_config": cfg.to_dict(),
        "format": hf_qc.get("quant_method"),
        "quantized_modules": len(quantized),
        "skipped_modules": skipped,
        "layers": layers,
        "libraries": library_versions(("compressed-tensors",)),
    }
    if calib_info is not None:
        details["calibration"] = calib_info
    if transforms:
        details["transforms"] = transforms
    if merge is not None:
        details["merge"] = merge.to_dict()
    manifest = Manifest(scheme=cfg.scheme, base=base_ref, adapter=adapter_ref, dtype=dtype, details=details)

    config = model.config.to_dict()
    config["dtype"] = str(torch_dtype).removeprefix("torch.")
    config["quantization_config"] = hf_qc
    say(f"writing {out}")
    with atomic_dir(out, force=force) as tmp:
        save_sharded(unique_state_dict(model), tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, manifest)
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    return ExportResult(out, cfg.scheme, tuple(quantized), tuple(skipped), size, layers)
