"""Read a quantized natix artifact back: the reference model (:func:`load_artifact`) and a
torch-free description for ``natix-quant inspect`` (:func:`describe_artifact`).

The manifest's ``details.quant_config`` (never the directory or file names) says which scheme
made the artifact; the scheme's config builds the reference modules. The manifest's
``details.layers`` lists the quantized layers with each one's ``layer_meta`` (group size actually
used, ...); artifacts written before it existed fall back to "a layer is quantized iff the
checkpoint has ``<layer>.weight_scale``", the rule vLLM's compressed-tensors loader follows.
"""

from __future__ import annotations

import contextlib

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from natix.quant.artifact import MANIFEST_NAME, Manifest, read_manifest
from natix.quant.errors import ArtifactError
from natix.quant.schemes import QuantConfig, config_from_dict

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_SCALE_SUFFIX = ".weight_scale"
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
             "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def quantized_scheme(path: str | Path) -> str | None:
    """The scheme of the quantized natix artifact at ``path``, or None for anything else
    (a plain HF directory, a merged-only artifact, a file, an embedded model name)."""
    p = Path(path)
    if not (p / MANIFEST_NAME).is_file():
        return None
    m = read_manifest(p)
    return m.scheme if "quant_config" in m.details else None


def artifact_config(path: str | Path) -> tuple[Manifest, QuantConfig]:
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"{p} is not a directory, so not a natix artifact")
    if not (p / MANIFEST_NAME).is_file():
        raise ArtifactError(f"{p} is not a natix artifact: no {MANIFEST_NAME}")
    m = read_manifest(p)
    if "quant_config" not in m.details:
        raise ArtifactError(f"{p} is a {m.scheme!r} artifact with no quant_config: load it as a plain model")
    return m, config_from_dict(m.details["quant_config"])


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"artifact {path} has no .safetensors files")
    return files


def load_artifact(path: str | Path, *, dtype: str = "auto", device: str = "cpu"
                  ) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a quantized artifact as a transformers model whose quantized Linears are the
    scheme's reference modules (e.g. ``Fp8Linear``); ``dtype`` applies to everything else."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from natix.quant.models import load_tokenizer, resolve_dtype

    p = Path(path)
    manifest, cfg = artifact_config(p)
    torch_dtype = resolve_dtype(dtype, device)
    hf_config = AutoConfig.from_pretrained(p)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # we build the quantized modules ourselves
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(p):
        state.update(load_file(str(f)))
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
    cfg.prepare_empty_model(model)
    for name, meta in quantized_layers(manifest, state).items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ArtifactError(f"artifact {p}: quantized layer {name} has no module in the model") from e
        model.set_submodule(name, cfg.empty_linear(old.in_features, old.out_features, old.bias is not None,
                                                   torch_dtype, meta))
    # Tied tensors are stored once; their second name is legitimately missing.
    expected = model.state_dict()
    first: dict[tuple[int, int], str] = {}
    tied = set()
    for k, v in expected.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in first and v.numel() > 0:
            tied.add(k)
        first.setdefault(key, k)
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ArtifactError(f"artifact {p} does not match its config: missing {missing[:5]}, "
                            f"unexpected {list(result.unexpected_keys)[:5]}")
    with contextlib.suppress(OSError):  # an artifact without generation_config.json keeps the default
        model.generation_config = GenerationConfig.from_pretrained(p)
    model.to(device).eval()
    # engines read this to quantize the KV cache as the scheme says (natix.quant.kv_quant)
    model.natix_kv_cache = getattr(cfg, "kv_cache", "none")
    return model, load_tokenizer(str(p))


def quantized_layers(manifest: Manifest, tensor_names: Any) -> dict[str, dict[str, Any]]:
    """Quantized layer name -> its ``layer_meta`` (see the module docstring for old artifacts)."""
    layers = manifest.details.get("layers")
    if isinstance(layers, dict):
        return layers
    return {k[: -len(_SCALE_SUFFIX)]: {} for k in tensor_names if k.endswith(_SCALE_SUFFIX)}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets); no torch."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _layer_numel(name: str, meta: dict[str, Any], tensors: dict[str, Any]) -> int:
    """Number of weights (out x in features) of quantized layer ``name``: from its manifest
    record, or, for artifacts written before records had a shape, its 2-D ``weight`` tensor."""
    if "shape" in meta:
        out_f, in_f = meta["shape"]
        return int(out_f) * int(in_f)
    t = tensors.get(name + ".weight")
    if t is not None and len(t["shape"]) == 2:
        return t["shape"][0] * t["shape"][1]
    raise ArtifactError(f"cannot tell the shape of quantized layer {name}: no 'shape' in its manifest record")


def describe_artifact(path: str | Path) -> dict[str, Any]:
    """What ``natix-quant inspect`` shows: scheme, bits per weight, files, engines, manifest."""
    p = Path(path)
    manifest, cfg = artifact_config(p)
    tensors: dict[str, Any] = {}
    for f in _weight_files(p):
        try:
            tensors.update(safetensors_header(f))
        except (OSError, ValueError, struct.error) as e:
            raise ArtifactError(f"cannot read safetensors header of {f}: {e}") from e
    layers = quantized_layers(manifest, tensors)
    # every tensor of a quantized layer (codes, scales, zeros, ...) except its bias
    qtensors = [k for k in tensors if k.rsplit(".", 1)[0] in layers and not k.endswith(".bias")]

    def nbytes(k: str) -> int:
        t = tensors[k]
        return t["data_offsets"][1] - t["data_offsets"][0]

    def numel(k: str) -> int:
        n = 1
        for s in tensors[k]["shape"]:
            n *= s
        return n

    q_elems = sum(_layer_numel(name, meta, tensors) for name, meta in layers.items())
    q_bits = 8 * sum(nbytes(k) for k in qtensors)
    all_elems = sum(numel(k) for k in tensors)
    all_bits = 8 * sum(nbytes(k) for k in tensors)
    dtypes: dict[str, int] = {}
    for k in tensors:
        dtypes[tensors[k]["dtype"]] = dtypes.get(tensors[k]["dtype"], 0) + 1
    return {
        "path": str(p),
        "scheme": cfg.scheme,
        "quant_config": cfg.to_dict(),
        "bits_per_weight": cfg.bits_per_weight(),
        "effective_bits_quantized": q_bits / q_elems if q_elems else None,
        "effective_bits_all": all_bits / all_elems if all_elems else None,
        "quantized_layers": len(layers),
        "tensor_dtypes": dtypes,
        "files": {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()},
        "engines": cfg.engines(),
        "manifest": manifest.to_dict(),
    }
