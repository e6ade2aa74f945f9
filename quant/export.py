"""Export: base (+ merged adapter) -> quantized artifact directory, written atomically.

Pipeline: check the inputs cheaply (:func:`check_inputs`: --out neither overlaps an input nor
exists without --force, base path and not already quantized, adapter files, calibration source)
-> create the output's temporary directory (so an unwritable --out fails now) -> load the base in
the artifact's storage dtype (bf16 by default) -> merge the adapter
(:func:`natix.quant.adapters.merge_adapter`: fp32, parity-checked, cast back) -> check the group
size fits some layer ->
``cfg.prepare_model`` (whole-model transforms, e.g. QoQ rotation) -> quantize:

- schemes that need calibration (GPTQ, smoothing, KV scales): :func:`natix.quant.calibrate.quantize_sequential`,
  one decoder layer at a time on calibration data (:mod:`natix.quant.calib`);
- the others (fp8 weights): every ``nn.Linear`` the scheme does not ignore, rounded to nearest,
  one at a time (:func:`quantize_model`);

-> write ``model.safetensors`` + ``config.json`` (with the scheme's ``quantization_config``) +
generation config + tokenizer + ``natix_manifest.json`` (per-layer ``layer_meta``, calibration,
transforms) into that directory, renamed into place once complete (:func:`natix.quant.artifact.atomic_dir`).
:func:`merge` is the same pipeline without quantization (``natix-quant merge``).

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

    from natix.quant.adapters import AdapterFiles, MergeReport
    from natix.quant.models import BaseSource

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


def _source_refs(src: "BaseSource", adapter: str | None, adapter_type: str | None):
    from natix.quant.artifact import SourceRef
    from natix.quant.models import tree_sha256

    base_ref = SourceRef(spec=src.spec, sha256=tree_sha256(src.file))
    adapter_ref = (SourceRef(spec=str(Path(adapter).resolve()), sha256=tree_sha256(Path(adapter)), type=adapter_type)
                   if adapter else None)
    return base_ref, adapter_ref


def check_inputs(base: str, out: str | Path, *, adapter: str | None = None, force: bool = False,
                 calib: str | None = None) -> tuple["BaseSource", "AdapterFiles | None"]:
    """The checks merge and export run before any slow work: ``out`` is text, overlaps no input
    (base, its model cache, adapter, calibration file; :func:`natix.quant.validate.check_no_overlap`)
    and does not exist unless ``force`` (and then only as a natix output or an empty directory:
    ``--force`` never replaces a directory natix did not write); the base exists and is not
    quantized; the adapter's files read. Returns the resolved base and the adapter's files."""
    from natix.quant.adapters import read_adapter
    from natix.quant.artifact import MANIFEST_NAME
    from natix.quant.calib import source_file
    from natix.quant.errors import ArtifactError
    from natix.quant.models import check_unquantized, resolve_base
    from natix.quant.validate import check_no_overlap, check_text

    out = Path(check_text(str(out), "--out"))
    src = resolve_base(base)
    inputs = [*src.inputs(), ("adapter", adapter), ("calibration file", source_file(calib) if calib else None)]
    check_no_overlap(out, inputs)
    if out.exists() or out.is_symlink():
        if not (out.is_dir() and not out.is_symlink() and ((out / MANIFEST_NAME).is_file() or not any(out.iterdir()))):
            raise ArtifactError(f"output {out} already exists and is not a natix output (no {MANIFEST_NAME}) or an "
                                "empty directory; natix will not replace it, --force or not: remove it yourself or "
                                "choose another output")
        if not force:
            raise ArtifactError(f"output {out} already exists; pass --force to replace it")
    check_unquantized(src)
    return src, read_adapter(adapter) if adapter else None


def grouped(cfg: QuantConfig) -> bool:
    """Whether ``cfg`` quantizes in groups of ``cfg.group_size`` with a per-channel fallback."""
    g = getattr(cfg, "group_size", None)
    return isinstance(g, int) and not isinstance(g, bool) and g > 0 and hasattr(cfg, "group_fallback")


def _check_groups(model: "nn.Module", cfg: QuantConfig) -> None:
    """Refuse a group size that divides no layer's input width: every layer would silently fall
    back to per channel (``--group-size 100000`` is a typo, not a per-channel request)."""
    from torch import nn

    if not grouped(cfg) or cfg.group_fallback != "channel":
        return
    widths = sorted({m.in_features for n, m in model.named_modules() if type(m) is nn.Linear and not cfg.skips(n)})
    if widths and not any(k % cfg.group_size == 0 for k in widths):
        from natix.quant.errors import QuantError

        raise QuantError(f"{cfg.scheme}: group size {cfg.group_size} divides the input width of none of the layers "
                         f"to quantize ({', '.join(map(str, widths))}), so every layer would be quantized per "
                         "output channel; pass --group-size -1 if that is what you want")


def merge(base: str, adapter: str, out: str | Path, *, dtype: str = "fp32", tolerance: float | None = None,
          force: bool = False, status: Callable[[str], None] | None = None) -> "MergeReport":
    """Merge ``adapter`` into ``base`` (fp32, parity-checked) and write a standalone model in
    ``dtype`` with a ``merged`` manifest to ``out``, atomically. Every check runs before the base
    loads (:func:`check_inputs`)."""
    from natix.quant.adapters import FP32_REL_TOL, merge_adapter
    from natix.quant.artifact import Manifest, atomic_dir, write_manifest
    from natix.quant.models import _dtype, load_base

    say = status or (lambda _msg: None)
    torch_dtype = _dtype(dtype)
    src, files = check_inputs(base, out, adapter=adapter, force=force)
    with atomic_dir(out, force=force) as tmp:  # made now: an unwritable --out fails before the work
        say(f"loading base {base}")
        model, tokenizer = load_base(base, dtype="fp32")
        say(f"merging {files.peft_type} adapter {adapter}")
        merged, report = merge_adapter(model, adapter, tolerance=FP32_REL_TOL if tolerance is None else tolerance)
        base_ref, adapter_ref = _source_refs(src, adapter, report.adapter_type)
        manifest = Manifest(scheme="merged", base=base_ref, adapter=adapter_ref, dtype=dtype,
                            details={"merge": report.to_dict()})
        say(f"writing {out}")
        merged.to(torch_dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, manifest)
    return report


def export(base: str, cfg: QuantConfig, out: str | Path, *, adapter: str | None = None, dtype: str = "bf16",
           force: bool = False, calib: str = "pydoc", calib_samples: int = 128, calib_max_length: int = 512,
           seed: int = 0, status: Callable[[str], None] | None = None,
           progress: Callable[[int, int, str], None] | None = None, device: str = "cpu") -> ExportResult:
    """Quantize ``base`` (+ ``adapter``) with ``cfg`` and write the artifact to ``out``.

    ``calib`` (a task name, ``pydoc``, or a .jsonl/.txt file; see :mod:`natix.quant.calib`) matters
    only for schemes that need calibration; ``calib_samples`` and ``calib_max_length`` are checked
    whatever the scheme. ``device``: where calibrated schemes run each decoder layer (the model
    stays on the CPU; see :func:`~natix.quant.calibrate.quantize_sequential`).

    Raises before any slow work (:func:`check_inputs`): :class:`~natix.quant.errors.ArtifactError`
    if ``out`` exists and not ``force``, or cannot be written; :class:`~natix.quant.errors.UserError`
    if ``out`` overlaps an input; :class:`~natix.quant.calib.CalibrationError` for a bad calibration
    source; :class:`~natix.quant.models.ModelLoadError` for a bad or already quantized base;
    :class:`~natix.quant.errors.AdapterError` for a bad adapter. After the base loads:
    ``QuantError`` for a group size that fits no layer, ``AdapterError`` / ``MergeParityError``
    for an adapter that does not merge. Whatever fails, nothing is left at ``out`` or beside it.
    """
    from natix.quant.adapters import merge_adapter
    from natix.quant.artifact import Manifest, atomic_dir, library_versions, write_manifest
    from natix.quant.calib import check_sizes
    from natix.quant.models import _dtype, load_base

    say = status or (lambda _msg: None)
    out = Path(out)
    torch_dtype = _dtype(dtype)
    check_sizes(calib_samples, calib_max_length)
    from natix.engines.hf_engine import resolve_device
    from natix.quant.errors import UserError
    from natix.quant.validate import check_device

    check_device(device)
    device = resolve_device(device)
    if device == "mps":
        raise UserError("--device mps: GPTQ's fp64 Hessians do not run on MPS; use cpu or cuda")
    src, files = check_inputs(base, out, adapter=adapter, force=force, calib=calib)
    calibrated = cfg.needs_calibration()
    if calibrated:
        from natix.quant.calib import check_source

        check_source(calib)
    cfg.hf_quantization_config()  # a missing library fails before the model load

    with atomic_dir(out, force=force) as tmp:  # made now: an unwritable --out fails before the work
        say(f"loading base {base}")
        model, tokenizer = load_base(base, dtype=dtype)
        merge = None
        if adapter:
            say(f"merging {files.peft_type} adapter {adapter}")
            model, merge = merge_adapter(model, adapter)
        _check_groups(model, cfg)
        transforms: dict[str, Any] = {}
        cfg.prepare_model(model, transforms)
        vocab = cfg.quantize_vocab(model, transforms)  # e.g. int8 embeddings / lm_head (w4a8kv4)
        calib_info: dict[str, Any] | None = None
        if calibrated:
            from natix.quant.calib import load_calibration
            from natix.quant.calibrate import quantize_sequential

            say(f"reading calibration data ({calib})")
            samples = load_calibration(calib, tokenizer, samples=calib_samples, max_length=calib_max_length,
                                       seed=seed)
            calib_info = {"source": calib, "samples": len(samples), "max_length": calib_max_length, "seed": seed,
                          "tokens": sum(len(x) for x in samples), "device": device}
            say(f"quantizing ({cfg.scheme}, {len(samples)} calibration samples, layer by layer)")
            quantized, skipped = quantize_sequential(model, cfg, samples, progress=progress, report=transforms,
                                                     device=device)
        else:
            say(f"quantizing ({cfg.scheme})")
            quantized, skipped = quantize_model(model, cfg, progress)
        quantized = [*quantized, *vocab]
        model.to(torch_dtype)  # quantized modules keep their storage dtypes (see Fp8Linear._apply)

        layers = {n: _layer_record(model.get_submodule(n)) for n in quantized}
        hf_qc = cfg.hf_quantization_config(layers)
        base_ref, adapter_ref = _source_refs(src, adapter, files.peft_type if files else None)
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
        save_sharded(unique_state_dict(model), tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, manifest)
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    return ExportResult(out, cfg.scheme, tuple(quantized), tuple(skipped), size, layers)
