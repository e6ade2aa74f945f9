"""Read a quantized natix artifact back: the reference model (:func:`load_artifact`) and a
torch-free description for ``natix-quant inspect`` (:func:`describe_artifact`).

The manifest's ``details.quant_config`` (never the directory or file names) says which scheme
made the artifact; the scheme's config builds the reference modules. The manifest's
``details.layers`` lists the quantized layers with each one's ``layer_meta`` (group size actually
used, ...); artifacts written before it existed fall back to "a layer is quantized iff the
checkpoint has ``<layer>.weight_scale``", the rule vLLM's compressed-tensors loader follows.
Both verify the checkpoint against the manifest first (:mod:`natix.quant.checkpoint`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from natix.quant.artifact import MANIFEST_NAME, Manifest, read_manifest
from natix.quant.checkpoint import quantized_layers, verify_checkpoint, weight_files
from natix.quant.errors import ArtifactError
from natix.quant.schemes import QuantConfig, config_from_dict

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    layers = quantized_layers(manifest, verify_checkpoint(p, manifest, cfg))
    torch_dtype = resolve_dtype(dtype, device)
    try:
        hf_config = AutoConfig.from_pretrained(p)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"artifact {p}: cannot read config.json: {e}") from e
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # we build the quantized modules ourselves
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(p):
        state.update(load_file(str(f)))
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
    cfg.prepare_empty_model(model)
    for name, meta in layers.items():
        try:
            old = model.get_submodule(name)
            new = cfg.empty_module(name, old, torch_dtype, meta)
        except AttributeError as e:
            raise ArtifactError(f"artifact {p}: quantized layer {name} has no module of its kind in the model") from e
        model.set_submodule(name, new)
    # Tied tensors are stored once; their second name is legitimately missing.
    expected = model.state_dict()
    first: dict[tuple[int, int], str] = {}
    tied = set()
    for k, v in expected.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in first and v.numel() > 0:
            tied.add(k)
        first.setdefault(key, k)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatches between the checkpoint and config.json
        raise ArtifactError(f"artifact {p} does not match its config.json: {str(e).splitlines()[-1].strip()}") from e
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ArtifactError(f"artifact {p} does not match its config: missing {missing[:5]}, "
                            f"unexpected {list(result.unexpected_keys)[:5]}")
    with contextlib.suppress(OSError):  # an artifact without generation_config.json keeps the default
        model.generation_config = GenerationConfig.from_pretrained(p)
    model.to(device).eval()
    # engines read this to quantize the KV cache as the scheme says (natix.quant.kv_quant)
    model.natix_kv_cache = getattr(cfg, "kv_cache", "none")
    # w4a8kv4 rotate_keys: queries and keys rotated by the head Hadamard after RoPE (kv_quant, the
    # natix engine's DecoderModel); an artifact from before the option has none
    model.natix_kv_rotate_keys = bool(getattr(cfg, "rotate_keys", False))
    # w4a8kv4 kv_group_size: channels per KV4 scale (-1, and an artifact from before the option: the head)
    model.natix_kv_group_size = int(getattr(cfg, "kv_group_size", -1))
    # w4a8kv4 kv_key_block: keys per channel over blocks of that many tokens (0, and older artifacts: per token)
    model.natix_kv_key_block = int(getattr(cfg, "kv_key_block", 0))
    return model, load_tokenizer(str(p))


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
    tensors = verify_checkpoint(p, manifest, cfg)
    layers = quantized_layers(manifest, tensors)
    # every tensor of a quantized layer (codes, scales, zeros, ...) except its bias
    qtensors = [k for k in tensors if k.rsplit(".", 1)[0] in layers and not k.endswith(".bias")]

    def nbytes(k: str) -> int:
        return tensors[k]["nbytes"]

    def numel(k: str) -> int:
        n = 1
        for s in tensors[k]["shape"]:
            n *= s
        return n

    q_elems = sum(_layer_numel(name, meta, tensors) for name, meta in layers.items())
    q_bits = 8 * sum(nbytes(k) for k in qtensors)
    all_elems = sum(numel(k) for k in tensors)
    all_bits = 8 * sum(nbytes(k) for k in tensors)
    q_names = set(qtensors)
    plain = sorted(((k, nbytes(k), tensors[k]["dtype"]) for k in tensors if k not in q_names and k.rsplit(".", 1)[0]
                    not in layers), key=lambda x: -x[1])
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
        "quantized_bytes": sum(nbytes(k) for k in qtensors),
        "unquantized_bytes": sum(b for _, b, _ in plain),
        "largest_unquantized": [{"name": k, "bytes": b, "dtype": d} for k, b, d in plain[:4]],
        "tensor_dtypes": dtypes,
        "files": {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()},
        "engines": cfg.engines(),
        "manifest": manifest.to_dict(),
    }
