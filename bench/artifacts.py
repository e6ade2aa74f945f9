"""What model directory a draw group loads: the variant itself, a given artifact, or an artifact the
run exports from the variant with a named scheme, cached by content hash.

The cache key is a hash of everything the artifact depends on: the base model's bytes, the
adapter's bytes, the scheme's full config (KV setting included), the calibration source and sizes,
the seed, the storage dtype and the natix version. So a second run (or a second engine in the same
run, or another shard on the same machine) reuses the export, and a changed input never does.
Artifacts live in ``<model cache>-artifacts/<scheme>-<hash>`` (``~/.cache/natix-artifacts`` by
default: beside the model cache, never inside it, since an export never writes into one of its
inputs and the converted GGUF base lives in the model cache) and are written atomically, so an
interrupted export leaves nothing a later run could mistake for one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from natix.bench.matrix import Matrix, Scheme, Variant

#: calibration defaults for exports a matrix asks for (natix-quant export's defaults, but a task's own data)
EXPORT_DEFAULTS = {"calib": "chain_sum", "calib_samples": 128, "calib_max_length": 512, "dtype": "bf16"}


@dataclass(frozen=True)
class Load:
    """What the engine loads for a group: ``model`` (+ ``adapter`` to merge), in ``dtype``."""

    model: str
    adapter: str | None
    dtype: str
    export: dict[str, Any] | None = None  # the export to run first (cache miss), else None


def _sha(path: str) -> str:
    from natix.quant.models import resolve_base, tree_sha256

    p = Path(path)
    return tree_sha256(p) if p.exists() and (p / "adapter_config.json").is_file() else tree_sha256(resolve_base(path).file)


def artifact_cache() -> Path:
    from natix.quant.models import cache_dir

    return cache_dir().with_name(cache_dir().name + "-artifacts")


def export_config(scheme: Scheme, kv: str) -> Any:
    """The scheme's QuantConfig for KV setting ``kv`` (``auto``: the scheme's default)."""
    from natix.quant.schemes import make_config

    fields = dict(scheme.export.get("set") or {})
    if kv != "auto":
        fields["kv_cache"] = kv
    return make_config(scheme.kind, fields)


def resolve(m: Matrix, variant: Variant, scheme: Scheme, kv: str) -> Load:
    """Where the weights of (variant, scheme) come from (no export runs here)."""
    if scheme.kind == "artifact":
        return Load(scheme.artifact, None, m.dtype)
    if not scheme.quantized:
        return Load(m.model, variant.adapter_path(), m.dtype if scheme.kind == "none" else scheme.kind)
    settings = {**EXPORT_DEFAULTS, **{k: v for k, v in scheme.export.items() if k != "set"}}
    cfg = export_config(scheme, kv if kv in ("none", "int4", "fp8", "auto") else "auto")
    adapter = variant.adapter_path()
    from natix.quant.artifact import natix_version

    key = json.dumps({"base": _sha(m.model), "adapter": _sha(adapter) if adapter else None, "config": cfg.to_dict(),
                      **settings, "seed": m.seed, "natix": natix_version()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out = artifact_cache() / f"{scheme.kind}-{digest}"
    # a GPU run calibrates on the GPU (not part of the key: the same export, computed elsewhere)
    from natix.engines.hf_engine import resolve_device

    device = resolve_device(m.device)
    device = device if device.startswith("cuda") else "cpu"  # cuda:N kept; mps calibrates on the CPU
    job = None if (out / "natix_manifest.json").is_file() else {
        "base": m.model, "adapter": adapter, "config": cfg.to_dict(), "out": str(out), "seed": m.seed, **settings,
        "device": device}
    return Load(str(out), None, m.dtype, job)


def run_export(job: dict[str, Any], progress: Callable[[int, int, str], None], say: Callable[[str], None]) -> None:
    """Export ``job`` (from :func:`resolve`) into the cache. Another process exporting the same
    artifact at the same time is fine: the one that finishes second finds it there."""
    from natix.quant.errors import ArtifactError
    from natix.quant.export import export
    from natix.quant.schemes import config_from_dict

    out = Path(job["out"])
    try:
        export(job["base"], config_from_dict(job["config"]), out, adapter=job["adapter"], dtype=job["dtype"],
               calib=job["calib"], calib_samples=job["calib_samples"], calib_max_length=job["calib_max_length"],
               seed=job["seed"], status=say, progress=progress, device=job.get("device", "cpu"))
    except ArtifactError:
        if not (out / "natix_manifest.json").is_file():
            raise


def adapter_matches(scheme: Scheme, variant: Variant) -> str | None:
    """Why a given artifact does not belong to ``variant`` (its manifest's adapter differs), or None."""
    from natix.quant.artifact import read_manifest

    manifest = read_manifest(scheme.artifact)
    want = _sha(variant.adapter_path()) if variant.adapter_path() else None
    have = manifest.adapter.sha256 if manifest.adapter else None
    if want == have:
        return None
    what = f"adapter {manifest.adapter.spec}" if manifest.adapter else "no adapter"
    return f"artifact {scheme.artifact} was exported with {what}, not variant {variant.name!r}'s"
