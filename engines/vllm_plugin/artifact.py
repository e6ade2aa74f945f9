"""What the vLLM plugin reads from a w4a8kv4 artifact, checked before vLLM builds a layer (torch-free).

vLLM hands a quantization config two things, at two moments:

1. ``config.json``'s ``quantization_config`` (``QuantizationConfig.from_config``):
   :meth:`ArtifactSpec.from_quantization_config` checks the method (``natix-w4a8kv4``), the format
   version this natix reads, the per-layer records (group size 128, 64, 32 or -1 and ``[out, in]`` shape,
   written by ``W4A8KV4Config.hf_quantization_config``), ``ignore`` and ``kv_cache``.
2. the model path (``maybe_update_config``): :meth:`ArtifactSpec.check_directory` reads the natix
   manifest the way natix's own loader does (:func:`natix.quant.loader.artifact_config`: manifest
   schema, scheme, config version), verifies the checkpoint against it
   (:func:`natix.quant.checkpoint.verify_checkpoint`: headers only, every quantized layer's tensors
   with their dtypes and shapes) and requires the manifest's layers to be ``config.json``'s.

Every refusal is a :class:`PluginRefused` (a ``ValueError``: what vLLM's config code lets through)
whose message names the artifact, the field and what to do, so ``vllm serve`` stops before any
weight is read with a sentence, not a shape mismatch deep in a weight loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from natix.quant.w4a8kv4_config import GROUP_SIZES, QUANT_METHOD, W4A8KV4Config

#: the ``quantization_config.version`` (= ``W4A8KV4Config.version``) this natix writes and reads
FORMAT_VERSION: int = W4A8KV4Config.__dataclass_fields__["version"].default
KV_MODES = ("int4", "none")


class PluginRefused(ValueError):
    """An artifact the natix vLLM plugin will not load; the message says why and what to do."""


@dataclass(frozen=True)
class LayerSpec:
    """One quantized Linear of the checkpoint (its unfused name is the key in ``ArtifactSpec.layers``)."""

    group_size: int  # 128, 64 or 32 (progressive) or -1 (per channel)
    shape: tuple[int, int]  # [out_features, in_features] of the unsharded, unfused layer


@dataclass(frozen=True)
class ArtifactSpec:
    """The parts of a w4a8kv4 artifact's ``quantization_config`` the plugin acts on."""

    layers: dict[str, LayerSpec]
    ignore: tuple[str, ...]
    kv_cache: str  # what natix's engines do with the KV cache: "int4" (KV4) or "none" (16-bit)
    version: int = FORMAT_VERSION

    # ------------------------------------------------------------------------------ config.json
    @classmethod
    def from_quantization_config(cls, qc: Any) -> "ArtifactSpec":
        if not isinstance(qc, dict):
            raise PluginRefused(f"natix vLLM plugin: quantization_config must be a mapping, got {type(qc).__name__}")
        method = qc.get("quant_method")
        if method != QUANT_METHOD:
            raise PluginRefused(
                f"natix vLLM plugin: quant_method {method!r} is not a scheme this plugin serves (it serves "
                f"{QUANT_METHOD!r}, format version {FORMAT_VERSION}). natix's fp8 and gptq artifacts are "
                "compressed-tensors checkpoints that vLLM loads without the plugin; re-export anything else with "
                "`natix-quant export --scheme w4a8kv4`")
        version = qc.get("version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise PluginRefused(
                f"natix vLLM plugin: this {QUANT_METHOD} artifact has format version {version!r}, but this natix "
                f"({_natix_version()}) reads version {FORMAT_VERSION}; re-export it with this natix "
                "(`natix-quant export --scheme w4a8kv4`) or serve it with the natix version that wrote it")
        # embed_bits / lm_head_bits (absent before the options existed: 16): vLLM's embedding and
        # lm_head are its own 16-bit modules, which cannot take int8 rows
        vocab = {k: qc.get(k, 16) for k in ("embed_bits", "lm_head_bits")}
        if any(v != 16 for v in vocab.values()):
            raise PluginRefused(
                f"natix vLLM plugin: this artifact stores its embedding / lm_head in 8 bits "
                f"({', '.join(f'{k}={v}' for k, v in vocab.items())}); the plugin serves 16-bit ones only. "
                "Re-export with `--set embed_bits=16 --set lm_head_bits=16`, or serve it with natix's engines")
        raw_layers = qc.get("layers")
        if not isinstance(raw_layers, dict) or not raw_layers:
            raise PluginRefused(f"natix vLLM plugin: quantization_config.layers must map each quantized Linear to "
                                f"its group size and shape; got {raw_layers!r:.80}")
        layers = {str(name): _layer_spec(name, rec) for name, rec in raw_layers.items()}
        ignore = qc.get("ignore", [])
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise PluginRefused(f"natix vLLM plugin: quantization_config.ignore must be a list of names, got {ignore!r:.80}")
        kv = qc.get("kv_cache")
        if kv not in KV_MODES:
            raise PluginRefused(f"natix vLLM plugin: quantization_config.kv_cache must be one of "
                                f"{', '.join(KV_MODES)}, got {kv!r}")
        return cls(layers=layers, ignore=tuple(ignore), kv_cache=kv, version=version)

    def renamed(self, rename: Callable[[str], str | None]) -> "ArtifactSpec":
        """The same spec with layer names mapped to a model implementation's own (None drops one)."""
        layers = {new: spec for name, spec in self.layers.items() if (new := rename(name)) is not None}
        return ArtifactSpec(layers=layers, ignore=self.ignore, kv_cache=self.kv_cache, version=self.version)

    # ------------------------------------------------------------------------------ layers
    def group_size_of(self, prefix: str, parts: list[str]) -> int | None:
        """The group size of the (possibly fused) vLLM layer ``prefix`` whose checkpoint layers are
        ``parts`` (``[prefix]`` when it is not fused), or None when it is not quantized. The parts of
        one layer must all be quantized, or none, with one group size."""
        found = {p: self.layers.get(p) for p in parts}
        quantized = [p for p, s in found.items() if s is not None]
        if not quantized:
            return None
        if len(quantized) != len(parts):
            missing = [p for p in parts if found[p] is None]
            raise PluginRefused(f"natix vLLM plugin: vLLM fuses {', '.join(parts)} into {prefix}, but the artifact "
                                f"quantized only some of them ({', '.join(missing)} not); one GEMM cannot mix them")
        sizes = {found[p].group_size for p in quantized}  # type: ignore[union-attr]
        if len(sizes) != 1:
            raise PluginRefused(f"natix vLLM plugin: vLLM fuses {', '.join(parts)} into {prefix}, but their group "
                                f"sizes differ ({sorted(sizes)}); the fused W4A8 GEMM needs one")
        return sizes.pop()

    def fused_shape(self, prefix: str, parts: list[str]) -> tuple[int, int]:
        """``[sum of out_features, in_features]`` of ``parts`` (all quantized, see :meth:`group_size_of`)."""
        shapes = [self.layers[p].shape for p in parts]
        ks = {s[1] for s in shapes}
        if len(ks) != 1:
            raise PluginRefused(f"natix vLLM plugin: {prefix} fuses layers of different in_features {sorted(ks)}")
        return sum(s[0] for s in shapes), ks.pop()

    # ------------------------------------------------------------------------------ the directory
    def check_directory(self, path: str | Path) -> dict[str, Any]:
        """Verify the artifact directory against its manifest and this spec (see module docstring);
        returns the manifest as a dict."""
        from natix.quant.checkpoint import manifest_layers, verify_checkpoint
        from natix.quant.errors import UserError
        from natix.quant.loader import artifact_config

        p = Path(path)
        try:
            manifest, cfg = artifact_config(p)
            if cfg.scheme != "w4a8kv4":
                raise PluginRefused(f"natix vLLM plugin: {p}'s config.json says {QUANT_METHOD} but its natix "
                                    f"manifest says scheme {cfg.scheme!r}; the artifact is inconsistent, re-export it")
            verify_checkpoint(p, manifest, cfg)
            recorded = manifest_layers(manifest) or {}
        except UserError as e:
            raise PluginRefused(f"natix vLLM plugin: cannot serve {p}: {e}") from e
        mine = {name: spec.group_size for name, spec in self.layers.items()}
        theirs = {name: rec.get("group_size") if isinstance(rec, dict) else rec for name, rec in recorded.items()}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
            raise PluginRefused(f"natix vLLM plugin: {p}: config.json's quantization_config.layers and "
                                f"natix_manifest.json's details.layers disagree (e.g. {diff}); re-export the artifact")
        return manifest.to_dict()


def check_artifact(path: str | Path) -> ArtifactSpec | None:
    """Both checks the plugin runs inside vLLM, on a model directory, before vLLM starts: the spec of
    a ``natix-*`` quantized directory (refused as the plugin would refuse it), None for any other."""
    import json

    cfg_file = Path(path) / "config.json"
    try:
        qc = json.loads(cfg_file.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # not ours to judge: vLLM reports a missing or unreadable config.json itself
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if not (isinstance(method, str) and method.startswith("natix")):
        return None
    spec = ArtifactSpec.from_quantization_config(qc)
    spec.check_directory(path)
    return spec


def _layer_spec(name: Any, rec: Any) -> LayerSpec:
    if not isinstance(rec, dict):
        raise PluginRefused(f"natix vLLM plugin: quantization_config.layers[{name!r}] must be a mapping, got {rec!r:.60}")
    gs, shape = rec.get("group_size"), rec.get("shape")
    if gs not in (*GROUP_SIZES, -1) or isinstance(gs, bool):
        raise PluginRefused(f"natix vLLM plugin: layer {name}: group_size must be one of "
                            f"{', '.join(map(str, GROUP_SIZES))} or -1, got {gs!r}")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise PluginRefused(f"natix vLLM plugin: layer {name}: shape must be [out_features, in_features], got "
                            f"{shape!r} (artifacts written before natix recorded shapes: re-export)")
    n, k = shape
    if n % 2:
        raise PluginRefused(f"natix vLLM plugin: layer {name}: out_features {n} is odd; the W4A8 format pairs rows")
    if gs > 0 and k % gs:
        raise PluginRefused(f"natix vLLM plugin: layer {name}: g{gs} needs in_features % {gs} == 0, got {k}")
    return LayerSpec(group_size=gs, shape=(n, k))


def _natix_version() -> str:
    from natix.quant.artifact import natix_version

    return natix_version()
