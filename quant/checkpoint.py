"""Verify a quantized artifact's safetensors against its manifest before anything trusts them.

``natix-quant inspect`` and :func:`natix.quant.loader.load_artifact` both call :func:`verify_checkpoint`
(torch-free: headers only), which refuses, naming the file or tensor:

- a weight file that does not open as safetensors: the library checks the header's size and
  structure and that the file is exactly as long as the header says, so a truncated, padded or
  random file fails here (reading the header of random bytes used to ask for gigabytes);
- a tensor stored in two files, or an index (``model.safetensors.index.json``) that disagrees with
  the files;
- a quantized layer (the manifest's ``details.layers``) whose tensors are not exactly those its
  scheme writes, with their dtypes and shapes (:meth:`~natix.quant.schemes.QuantConfig.tensor_layout`):
  a manifest that says ``fp8`` over bf16 weights is not reported, or loaded, as fp8;
- any other tensor that is not in the manifest's dtype (fp32 / bf16 / fp16).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from natix.quant.artifact import MANIFEST_NAME, Manifest
from natix.quant.errors import ArtifactError
from natix.quant.export import INDEX_NAME
from natix.quant.schemes import QuantConfig

_SCALE_SUFFIX = ".weight_scale"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT = {"fp32": "F32", "bf16": "BF16", "fp16": "F16", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"artifact {path} has no .safetensors files")
    return files


def read_headers(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, nbytes, file} over every weight file of the artifact at ``path``."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, dict[str, Any]] = {}
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    dtype, shape = sl.get_dtype(), tuple(int(d) for d in sl.get_shape())
                    if k in tensors:
                        raise ArtifactError(f"artifact {path}: tensor {k} is stored in both {tensors[k]['file']} "
                                            f"and {f.name}")
                    n = DTYPE_BYTES.get(dtype, 0)
                    for d in shape:
                        n *= d
                    tensors[k] = {"dtype": dtype, "shape": shape, "nbytes": n, "file": f.name}
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"cannot read {index}: {e}") from e
        actual = {k: t["file"] for k, t in tensors.items()}
        if weight_map != actual:
            diff = sorted(set(weight_map.items()) ^ set(actual.items()))[:3]
            raise ArtifactError(f"{index} disagrees with the safetensors files (e.g. {diff})")
    return tensors


def manifest_layers(manifest: Manifest) -> dict[str, dict[str, Any]] | None:
    """The manifest's per-layer records (None for artifacts written before it had them)."""
    layers = manifest.details.get("layers")
    if layers is None:
        return None
    if not isinstance(layers, dict):
        raise ArtifactError(f"{MANIFEST_NAME}: details.layers must map layer names to records, "
                            f"got {type(layers).__name__}")
    return layers


def quantized_layers(manifest: Manifest, tensor_names: Any) -> dict[str, dict[str, Any]]:
    """Quantized layer name -> its ``layer_meta``; artifacts written before the manifest had
    ``details.layers``: every layer with a ``.weight_scale`` (the rule vLLM's loader follows)."""
    layers = manifest_layers(manifest)
    if layers is not None:
        return layers
    return {k[: -len(_SCALE_SUFFIX)]: {} for k in tensor_names if k.endswith(_SCALE_SUFFIX)}


def _layer_shape(name: str, meta: dict[str, Any]) -> tuple[int, int] | None:
    shape = meta.get("shape")
    if shape is None:  # records written before they had a shape: nothing to check against
        return None
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ArtifactError(f"manifest record of quantized layer {name} has a bad shape {shape!r}")
    return shape[0], shape[1]


def verify_checkpoint(path: Path, manifest: Manifest, cfg: QuantConfig) -> dict[str, dict[str, Any]]:
    """Check the artifact at ``path`` as the module docstring says; returns :func:`read_headers`."""
    tensors = read_headers(path)
    layers = quantized_layers(manifest, tensors)
    float_dtype = _FLOAT.get(manifest.dtype)
    if float_dtype is None:
        raise ArtifactError(f"artifact {path}: manifest dtype {manifest.dtype!r} is not fp32, bf16 or fp16")
    owned: set[str] = set()
    for name, meta in layers.items():
        if not isinstance(meta, dict):
            raise ArtifactError(f"manifest record of quantized layer {name} is not a mapping")
        present = {k for k in tensors if k.rsplit(".", 1)[0] == name}
        owned |= present
        shape = _layer_shape(name, meta)
        if shape is None:
            continue
        try:
            want = cfg.tensor_layout(*shape, meta)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"manifest record of quantized layer {name} is incomplete for {cfg.scheme}: {e}") from e
        got = {k[len(name) + 1:]: (tensors[k]["dtype"], tensors[k]["shape"]) for k in present}
        bias = got.pop("bias", None)
        if got != want:
            missing = sorted(set(want) - set(got))
            wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
            extra = sorted(set(got) - set(want))
            what = "; ".join(
                [f"missing {', '.join(missing)}"] * bool(missing)
                + [f"{k} is {got[k][0]} {list(got[k][1])}, expected {want[k][0]} {list(want[k][1])}" for k in wrong]
                + [f"unexpected {', '.join(extra)}"] * bool(extra))
            raise ArtifactError(f"artifact {path} is not a {cfg.scheme} checkpoint as its manifest says: "
                                f"layer {name}: {what}")
        if bias is not None and bias != (float_dtype, (shape[0],)):
            raise ArtifactError(f"artifact {path}: {name}.bias is {bias[0]} {list(bias[1])}, expected "
                                f"{float_dtype} [{shape[0]}]")
    for k, t in tensors.items():
        if k not in owned and t["dtype"] != float_dtype:
            raise ArtifactError(f"artifact {path}: tensor {k} is {t['dtype']} but the manifest says unquantized "
                                f"tensors are {manifest.dtype}; the checkpoint does not match its manifest")
    return tensors
