"""Read a PEFT adapter directory, check it fits a base model, merge it, and prove the merge.

Supported adapter types are the ones peft can fold into the base weights with
``merge_and_unload``: LoRA (incl. DoRA, rsLoRA, embeddings, lm_head, trainable tokens,
``modules_to_save``), AdaLoRA, VeRA, IA³, LoHa and LoKr.

Order of work, and why:

1. :func:`read_adapter` reads ``adapter_config.json`` and the *shapes* of the adapter tensors
   (safetensors header or .bin) — every missing/corrupt file fails here, naming the file.
2. :func:`validate_adapter` compares those shapes with the base's modules *before* peft touches
   the model: peft's own errors for a foreign base are size-mismatch tracebacks from
   ``load_state_dict`` (or, worse, silent random init of layers the file lacks).
3. :func:`merge_adapter` loads the adapter with peft, runs a probe batch through the unmerged
   model, merges, runs it again and compares the logits in fp32.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from natix.quant.errors import AdapterError, MergeParityError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel

CONFIG_NAME = "adapter_config.json"
#: peft loads safetensors first when both exist; so do we.
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
SUPPORTED_TYPES = ("LORA", "ADALORA", "VERA", "IA3", "LOHA", "LOKR")

#: Relative logit error ‖merged−unmerged‖/‖unmerged‖ allowed after an fp32 merge. Measured on
#: tiny random Llama/Qwen2 models with random adapters of every supported type: 1e-7..1e-6
#: (see tests/quant/test_adapters.py); 1e-4 leaves two orders of magnitude of headroom for
#: larger models while still catching a wrong merge (those show errors of 1e-2 and up).
FP32_REL_TOL = 1e-4

# (axis of the adapter tensor, which base dimension it must equal). Embeddings count as
# in = num_embeddings, out = embedding_dim, which is how peft lays out lora_embedding_A/B.
_AXIS_RULES: dict[str, tuple[tuple[int, str], ...]] = {
    "lora_A": ((1, "in"),),
    "lora_B": ((0, "out"),),
    "lora_embedding_A": ((1, "in"),),
    "lora_embedding_B": ((0, "out"),),
    "lora_magnitude_vector": ((0, "out"),),
    "lora_E": (),
    "ranknum": (),
    "vera_lambda_b": ((0, "out"),),
    "vera_lambda_d": (),
    "hada_w1_a": ((0, "out"),),
    "hada_w1_b": ((1, "in"),),
    "hada_w2_a": ((0, "out"),),
    "hada_w2_b": ((1, "in"),),
    "token_adapter": ((-1, "out"),),
}
_SPECIAL = {"ia3_l", "base_layer", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
_ADAPTER_PARAMS = set(_AXIS_RULES) | _SPECIAL
# Parameters of the adapter that are not per-layer deltas (overwritten base weights).
_NOT_LAYER_PARAMS = {"base_layer", "token_adapter"}


@dataclass(frozen=True)
class AdapterFiles:
    """What :func:`read_adapter` found on disk: config, weights file and tensor shapes."""

    path: Path
    peft_type: str
    config: dict[str, Any]
    weights_file: Path
    #: saved key (``base_model.model.`` stripped) -> shape
    shapes: dict[str, tuple[int, ...]]

    @property
    def layer_targets(self) -> tuple[str, ...]:
        """Base modules that carry adapter layers (LoRA A/B, IA3 vectors, ...), sorted."""
        splits = [_split_key(k) for k in self.shapes]
        return tuple(sorted({s[0] for s in splits
                             if s and s[1] in _ADAPTER_PARAMS and s[1] not in _NOT_LAYER_PARAMS}))

    @property
    def variants(self) -> tuple[str, ...]:
        c = self.config
        flags = [("dora", c.get("use_dora")), ("rslora", c.get("use_rslora")),
                 ("trainable_tokens", c.get("trainable_token_indices")),
                 ("modules_to_save", c.get("modules_to_save"))]
        return tuple(name for name, on in flags if on)


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_adapter` did; ``to_dict`` goes into the artifact manifest."""

    adapter_type: str
    variants: tuple[str, ...]
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    parity_error: float | None  # ‖merged−unmerged‖/‖unmerged‖ of fp32 logits; None if unchecked
    tolerance: float
    probe_shape: tuple[int, ...]
    untied_embeddings: bool  # True when tied input/output embeddings had to be split
    peft_warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split_key(key: str) -> tuple[str, str] | None:
    """``model.layers.0.q_proj.lora_A.weight`` -> (``model.layers.0.q_proj``, ``lora_A``).

    Keys with no adapter parameter name (``modules_to_save`` copies such as ``lm_head.weight``)
    give (module path, parameter name) of the full base parameter they replace.
    """
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p in _ADAPTER_PARAMS:
            return ".".join(parts[:i]), p
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1]), parts[-1]


def _read_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                raw = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        else:
            import torch

            sd = torch.load(weights, map_location="cpu", weights_only=True)
            if not isinstance(sd, dict):
                raise ValueError(f"expected a dict of tensors, got {type(sd).__name__}")
            raw = {k: tuple(v.shape) for k, v in sd.items()}
    except Exception as e:  # safetensors/zip/pickle errors vary by version: wrap them all
        raise AdapterError(f"adapter weights {weights} are corrupt or unreadable: {e}") from e
    if not raw:
        raise AdapterError(f"adapter weights {weights} contain no tensors")
    out: dict[str, tuple[int, ...]] = {}
    for k, shape in raw.items():
        for prefix in ("base_model.model.", "base_model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = shape
    return out


def read_adapter(adapter_dir: str | Path) -> AdapterFiles:
    """Read ``adapter_config.json`` and the weight shapes; raise :class:`AdapterError` naming the file."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterError(f"{cfg_file} is missing: not a PEFT adapter directory")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"cannot read {cfg_file}: {e}") from e
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterError(f"{cfg_file} has no 'peft_type': not a PEFT adapter config")
    peft_type = str(config["peft_type"]).upper()
    if peft_type not in SUPPORTED_TYPES:
        raise AdapterError(
            f"adapter type {peft_type} cannot be merged into the base weights; "
            f"supported types: {', '.join(SUPPORTED_TYPES)}"
        )
    weights = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
    if weights is None:
        raise AdapterError(f"adapter weights are missing: expected {' or '.join(str(path / n) for n in WEIGHT_NAMES)}")
    return AdapterFiles(path, peft_type, config, weights, _read_shapes(weights))


def check_finite(files: AdapterFiles) -> None:
    """Raise :class:`AdapterError` naming the first tensor of the adapter that holds NaN or inf
    (a diverged training run): merging it would poison the base weights. Adapters are small, so
    this reads every tensor."""
    import torch

    try:
        if files.weights_file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(files.weights_file), framework="pt") as f:
                tensors = ((k, f.get_tensor(k)) for k in f.keys())
                bad = next((k for k, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()), None)
        else:
            sd = torch.load(files.weights_file, map_location="cpu", weights_only=True)
            bad = next((k for k, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    except Exception as e:  # corrupt past the header: name the file
        raise AdapterError(f"adapter weights {files.weights_file} are corrupt or unreadable: {e}") from e
    if bad is not None:
        raise AdapterError(f"adapter weights {files.weights_file} hold NaN or infinite values (tensor {bad}); "
                           "merging them would destroy the base weights")


def _dims(module: Any) -> tuple[int, int, str, str] | None:
    """(in, out, in_name, out_name) of a base layer in peft's convention, or None if not a 2-D layer."""
    import torch.nn as nn

    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim, "num_embeddings", "embedding_dim"
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, "in_features", "out_features"
    w = getattr(module, "weight", None)
    if w is not None and w.ndim == 2:
        if type(module).__name__ == "Conv1D":  # GPT-2 style: weight stored (in, out)
            return w.shape[0], w.shape[1], "in_features", "out_features"
        return w.shape[1], w.shape[0], "in_features", "out_features"
    return None


def _check_module(module_path: str, module: Any, params: dict[str, tuple[int, ...]]) -> list[str]:
    """Shape mismatches (as messages) between one base module and its adapter tensors."""
    problems: list[str] = []
    # Reported last: the adapter's own tensors make the clearer message.
    saved_base: list[str] = []
    dims = _dims(module)
    layer_params = {p: s for p, s in params.items() if p != "base_layer"}
    if "base_layer" in params:  # embedding weights peft saved alongside the adapter
        w = getattr(module, "weight", None)
        if w is not None and tuple(w.shape) != params["base_layer"]:
            saved_base.append(f"{module_path} saved base weight has shape {params['base_layer']} "
                              f"but base has {tuple(w.shape)}")
    if not layer_params:
        return saved_base
    if dims is None:
        return saved_base + [f"{module_path} is a {type(module).__name__} in the base, not a linear or "
                           f"embedding layer the adapter ({', '.join(sorted(layer_params))}) can modify"]
    d_in, d_out, n_in, n_out = dims
    want = {"in": (d_in, n_in), "out": (d_out, n_out)}
    for p, shape in sorted(layer_params.items()):
        for axis, which in _AXIS_RULES.get(p, ()):
            size, name = want[which]
            if len(shape) < (axis + 1 if axis >= 0 else -axis):
                problems.append(f"{module_path} {p} has shape {shape}, expected a {name} axis")
            elif shape[axis] != size:
                problems.append(f"{module_path} {p} expects {name} {shape[axis]} but base has {size}")
    if "ia3_l" in layer_params:
        s = layer_params["ia3_l"]  # (out, 1) scales outputs; (1, in) scales inputs (feedforward)
        if len(s) == 2 and s[0] == 1 and s[1] != 1:
            if s[1] != d_in:
                problems.append(f"{module_path} ia3_l (feedforward) has length {s[1]} but base {n_in} is {d_in}")
        elif s[0] != d_out:
            problems.append(f"{module_path} ia3_l has length {s[0]} but base {n_out} is {d_out}")
    if any(p.startswith("lokr_") for p in layer_params):
        # W = kron(w1, w2): rows multiply to out, columns to in.
        w1 = layer_params.get("lokr_w1") or (
            (layer_params["lokr_w1_a"][0], layer_params["lokr_w1_b"][1]) if "lokr_w1_a" in layer_params else None)
        w2 = layer_params.get("lokr_w2") or (
            (layer_params["lokr_w2_a"][0], layer_params["lokr_w2_b"][1]) if "lokr_w2_a" in layer_params else None)
        if w1 and w2 and (w1[0] * w2[0], w1[1] * w2[1]) != (d_out, d_in):
            problems.append(f"{module_path} LoKr factors {tuple(w1)}⊗{tuple(w2)} give "
                            f"({w1[0] * w2[0]}, {w1[1] * w2[1]}) but base weight is ({d_out}, {d_in})")
    return problems + saved_base


def validate_adapter(model: "PreTrainedModel", files: AdapterFiles) -> None:
    """Raise :class:`AdapterError` unless every adapter tensor fits a module of ``model``.

    Checks both directions: every module the weights name exists with matching shapes, and every
    module the config targets in this base has weights (peft would otherwise initialise the
    missing ones — randomly if the config says so — and merge them).
    """
    by_module: dict[str, dict[str, tuple[int, ...]]] = {}
    full_params: dict[str, tuple[int, ...]] = {}
    shared: dict[str, tuple[int, ...]] = {}
    for key, shape in files.shapes.items():
        if key in ("vera_A", "vera_B"):
            shared[key] = shape
            continue
        split = _split_key(key)
        if split is None:
            raise AdapterError(f"adapter weights {files.weights_file} hold an unexpected tensor {key!r}")
        mod, param = split
        if param in _ADAPTER_PARAMS:
            by_module.setdefault(mod, {})[param] = shape
        else:
            full_params[key] = shape

    kind = f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"
    problems: list[str] = []
    for mod, params in sorted(by_module.items()):
        try:
            module = model.get_submodule(mod)
        except AttributeError:
            problems.append(f"it targets {mod}, which the base {kind} does not have")
            continue
        problems += _check_module(mod, module, params)
    for key, shape in sorted(full_params.items()):  # modules_to_save: whole replacement tensors
        try:
            base_shape = tuple(model.get_parameter(key).shape)
        except AttributeError:
            problems.append(f"it replaces {key}, which the base {kind} does not have")
            continue
        if base_shape != shape:
            problems.append(f"{key} (modules_to_save) has shape {shape} but base has {base_shape}")
    if shared and not problems:  # VeRA's shared projections are sliced to each layer's size
        for mod in by_module:
            d = _dims(model.get_submodule(mod))
            if d and "vera_A" in shared and shared["vera_A"][1] < d[0]:
                problems.append(f"vera_A has {shared['vera_A'][1]} columns but {mod} {d[2]} is {d[0]}")
            if d and "vera_B" in shared and shared["vera_B"][0] < d[1]:
                problems.append(f"vera_B has {shared['vera_B'][0]} rows but {mod} {d[3]} is {d[1]}")
    if not problems:
        problems += _untargeted(model, files, set(by_module))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterError(f"adapter {files.path} was made for another base: {problems[0]}{more}")


def _untargeted(model: "PreTrainedModel", files: AdapterFiles, present: set[str]) -> list[str]:
    """Modules the config targets in ``model`` but the weights file has nothing for."""
    from peft import PeftConfig
    from peft.tuners import tuners_utils
    from peft.tuners.tuners_utils import check_target_module_exists

    excluded = getattr(tuners_utils, "_ExcludedModule", ())  # private marker; absent in some versions

    targets = files.config.get("target_modules")
    if not targets or targets == "all-linear":
        return []
    try:
        cfg = PeftConfig.from_peft_type(**files.config)
    except Exception as e:
        raise AdapterError(f"{files.path / CONFIG_NAME} is not a valid {files.peft_type} config: {e}") from e
    missing = []
    for name, module in model.named_modules():
        hit = check_target_module_exists(cfg, name)
        if hit and not isinstance(hit, excluded) and _dims(module) and name not in present:
            missing.append(name)
    if missing:
        return [f"{CONFIG_NAME} targets {missing[0]} in this base but {files.weights_file.name} has no "
                f"weights for it ({len(missing)} such modules)"]
    return []


def _shared_embedding(model: "PreTrainedModel", files: AdapterFiles) -> "torch.nn.Parameter | None":
    """The weight input and output embeddings share, if they do and the adapter changes either."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or inp.weight is not out.weight:
        return None
    names = {n for n, m in model.named_modules() if m is inp or m is out}
    touched = any((s := _split_key(k)) and s[0] in names for k in files.shapes)
    return inp.weight if touched else None


def _untie(model: Any, shared: "torch.nn.Parameter") -> None:
    """Give every holder of ``shared`` but the first its own copy, and stop transformers re-tying.

    Done after the unmerged probe (so the reference is peft's own semantics for a tied model,
    e.g. trainable tokens applied to both ends) and before merging: each module's delta then
    lands in its own weight. Merged into one shared tensor, an adapter on ``embed_tokens`` alone
    would silently change ``lm_head`` as well.
    """
    import torch

    holders = [(m, name) for m in model.modules() for name, p in m._parameters.items() if p is shared]
    for m, name in holders[1:]:
        setattr(m, name, torch.nn.Parameter(shared.detach().clone(), requires_grad=False))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for cfg in (base.config, getattr(base.config, "get_text_config", lambda: None)()):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


def default_probe(model: "PreTrainedModel", batch: int = 2, length: int = 32, seed: int = 0) -> "torch.Tensor":
    """Deterministic random token ids ``[batch, length]`` drawn from the model's vocabulary."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _logits(model: Any, ids: "torch.Tensor") -> "torch.Tensor":
    import torch

    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def merge_adapter(
    model: "PreTrainedModel",
    adapter_dir: str | Path,
    *,
    probe_tokens: "torch.Tensor | None" = None,
    check: bool = True,
    tolerance: float = FP32_REL_TOL,
) -> tuple["PreTrainedModel", MergeReport]:
    """Merge the PEFT adapter in ``adapter_dir`` into ``model`` (modified in place) and return it.

    The merge runs in fp32 whatever ``model``'s dtype (rounding a bf16 base before adding the
    delta would be a second, avoidable error); the merged model is cast back to the original dtype.

    Args:
        model: base causal LM, eval mode.
        adapter_dir: directory written by peft's ``save_pretrained``.
        probe_tokens: ``[batch, seq]`` token ids for the parity check; default
            :func:`default_probe` (2 x 32 random ids).
        check: compare fp32 logits of the unmerged and merged model on the probe.
        tolerance: maximum ‖merged−unmerged‖/‖unmerged‖.

    Raises:
        AdapterError: missing/corrupt files, unsupported type, an adapter for another base, or
            NaN/inf in the adapter or the merged weights.
        MergeParityError: the merged logits differ by more than ``tolerance``.
    """
    files = read_adapter(adapter_dir)
    validate_adapter(model, files)
    check_finite(files)

    from peft import PeftModel

    orig_dtype = model.dtype
    model = model.float()
    shared = _shared_embedding(model, files)
    probe = default_probe(model) if probe_tokens is None else probe_tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(model, str(files.path), is_trainable=False)
        except Exception as e:  # whatever our checks missed: still name the adapter
            raise AdapterError(f"peft could not load adapter {files.path}: {e}") from e
        peft_model.eval()
        before = _logits(peft_model, probe) if check else None
        if shared is not None:
            _untie(peft_model, shared)
        try:
            merged = peft_model.merge_and_unload(safe_merge=True)
        except ValueError as e:  # safe_merge found NaN/inf in a merged weight (finite inputs that overflow)
            raise AdapterError(f"merging adapter {files.path} gives non-finite weights: {e}") from e
    error = None
    if before is not None:
        after = _logits(merged, probe)
        error = float((after - before).norm() / before.norm().clamp_min(1e-30))
        if not error <= tolerance:  # `not <=` so NaN fails too
            raise MergeParityError(
                f"merged {files.peft_type} adapter {files.path} changes the logits: relative error "
                f"{error:.3g} > tolerance {tolerance:.3g} (fp32, probe {tuple(probe.shape)})"
            )
    merged = merged.to(orig_dtype).eval()
    report = MergeReport(
        adapter_type=files.peft_type,
        variants=files.variants,
        targets=files.layer_targets,
        modules_to_save=tuple(files.config.get("modules_to_save") or ()),
        parity_error=error,
        tolerance=tolerance,
        probe_shape=tuple(probe.shape),
        untied_embeddings=shared is not None,
        # Deprecation notices are for library authors, not for someone merging an adapter.
        peft_warnings=tuple(dict.fromkeys(
            str(w.message).splitlines()[0] for w in caught
            if not issubclass(w.category, (DeprecationWarning, FutureWarning)))),
    )
    return merged, report
