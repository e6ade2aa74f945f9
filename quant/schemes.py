"""Quantization schemes: a registry from scheme name to its frozen, versioned config class.

A scheme registers its config with :func:`register_scheme`; everything generic (export, load,
inspect, the CLI) looks the config up here and calls its methods, so adding ``gptq`` or
``w4a8kv4`` means one new config module plus one line in :data:`_BUILTIN_MODULES` — no
``if scheme == ...`` chains. Config modules must stay torch-free at import time (the torch
work lives in the methods, imported lazily), so the registry itself is cheap to load.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from natix.quant.errors import QuantError


class UnknownSchemeError(QuantError):
    """The scheme name is not registered; the message lists the known ones."""


#: modules that register the built-in schemes (imported on first lookup, not at package import)
_BUILTIN_MODULES = ("natix.quant.fp8_config", "natix.quant.w4a8kv4_config",
                    "natix.quant.gptq_config")
_REGISTRY: dict[str, type["QuantConfig"]] = {}
_loaded = False

C = TypeVar("C", bound="type[QuantConfig]")


class QuantConfig:
    """Base of per-scheme configs (frozen dataclasses). Subclasses set ``version`` as a field
    default and implement the hooks below; ``scheme`` is filled in by :func:`register_scheme`."""

    scheme: ClassVar[str] = ""
    version: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {"scheme": self.scheme, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        d = dict(d)
        scheme = d.pop("scheme", cls.scheme)
        if scheme != cls.scheme:
            raise QuantError(f"config is for scheme {scheme!r}, not {cls.scheme!r}")
        current = cls.__dataclass_fields__["version"].default  # type: ignore[attr-defined]
        if d.get("version", current) != current:
            raise QuantError(f"{cls.__name__} version {d.get('version')!r} is not supported "
                             f"(this natix reads version {current})")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise QuantError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        types = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        d = {k: tuple(v) if isinstance(types.get(k), tuple) and isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    # --- hooks every scheme implements ------------------------------------------------------
    def bits_per_weight(self) -> float:
        """Storage width of one quantized weight element (scales not included; inspect
        reports the effective width with scales from the checkpoint itself)."""
        raise NotImplementedError

    def quantize_linear(self, linear: Any, *, name: str = "", hessian: Any = None) -> Any:
        """Return a module replacing ``linear`` (an ``nn.Linear`` called ``name`` in the model)
        whose state dict is the artifact's format for that layer. ``hessian`` is the layer's
        ``[K, K]`` GPTQ Hessian from calibration (fp64), or None (round to nearest). The module
        has ``layer_meta() -> dict`` (JSON): what :meth:`empty_linear` needs to rebuild it
        (e.g. the group size actually used); the manifest stores it per layer."""
        raise NotImplementedError

    def empty_linear(self, in_features: int, out_features: int, bias: bool, dtype: Any,
                     meta: dict[str, Any] | None = None) -> Any:
        """An uninitialised reference module with the state-dict layout of :meth:`quantize_linear`
        (``meta``: that module's ``layer_meta()``)."""
        raise NotImplementedError

    def empty_module(self, name: str, old: Any, dtype: Any, meta: dict[str, Any] | None = None) -> Any:
        """The loader's replacement for module ``name`` (``old``, as built from config.json) of a
        quantized layer whose manifest record is ``meta``: :meth:`empty_linear` for a Linear; a scheme
        that quantizes other modules (e.g. the embedding table) overrides this."""
        return self.empty_linear(old.in_features, old.out_features, old.bias is not None, dtype, meta)

    def tensor_layout(self, out_features: int, in_features: int, meta: dict[str, Any]
                      ) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The tensors one quantized layer stores (its bias aside): name suffix -> (safetensors
        dtype, shape), exactly the state dict of :meth:`empty_linear` for ``meta`` (a test checks
        they agree). Torch-free, so ``natix-quant inspect`` verifies checkpoints without torch."""
        raise NotImplementedError

    def hf_quantization_config(self, layers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """The ``quantization_config`` entry of ``config.json`` that serving engines read.
        ``layers``: quantized module name -> ``layer_meta()`` (None before quantizing: the
        exporter calls it once early so that a missing library fails before the slow work)."""
        raise NotImplementedError

    def engines(self) -> dict[str, str]:
        """Engines that can load the artifact -> how (shown by ``natix-quant inspect``)."""
        raise NotImplementedError

    def skips(self, module_name: str) -> bool:
        """Whether the Linear at ``module_name`` stays unquantized."""
        ignore = getattr(self, "ignore", ())
        return any(module_name == i or module_name.endswith("." + i) for i in ignore)

    # --- optional hooks (calibrated schemes) ------------------------------------------------
    def needs_calibration(self) -> bool:
        """Whether export must run calibration data through the model (GPTQ, smoothing, KV scales)."""
        return False

    def needs_hessians(self) -> bool:
        """Whether :meth:`quantize_linear` uses calibration Hessians (GPTQ); a calibrated scheme
        that only smooths or calibrates KV scales says no, and export skips accumulating them."""
        return self.needs_calibration()

    def prepare_model(self, model: Any, report: dict[str, Any]) -> None:
        """Whole-model, function-preserving transforms before any layer is quantized (e.g.
        untie embeddings, fold norms, rotate the residual stream). Runs on the fp32 model;
        record what was done in ``report`` (it lands in the manifest)."""

    def quantize_vocab(self, model: Any, report: dict[str, Any]) -> list[str]:
        """After :meth:`prepare_model`, before the Linears are quantized: replace modules outside the
        Linear path (the embedding table, lm_head) by quantized ones; returns their names (each gets a
        manifest record from its ``layer_meta()``, ``out_features`` and ``in_features``). Default: none."""
        return []

    def prepare_block(self, prefix: str, block: Any, run_block: Any, report: dict[str, Any]) -> None:
        """Per decoder layer, before its Hessians are collected: ``run_block()`` runs the
        (still float) ``block`` on every calibration input (whose earlier layers are already
        quantized), so hooks registered here see real activations; smoothing folds scales
        into weights here. ``prefix`` is the block's module name (``model.layers.3``)."""

    def prepare_empty_model(self, model: Any) -> None:
        """Loader side: structural changes to a freshly built model before the artifact's state
        dict is loaded (e.g. register the buffers :meth:`prepare_block` added)."""

def finer_group_size(in_features: int, group_size: int, sizes: tuple[int, ...]) -> int:
    """``group_fallback="finer"``: the largest of ``sizes`` below ``group_size`` that divides
    ``in_features``, or -1 (per channel) when none does."""
    return next((g for g in sorted(sizes, reverse=True) if g < group_size and in_features % g == 0), -1)


def register_scheme(name: str) -> Callable[[C], C]:
    """Class decorator: register a :class:`QuantConfig` subclass under ``name``."""

    def deco(cls: C) -> C:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"scheme {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.scheme = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)
        _loaded = True


def known_schemes() -> tuple[str, ...]:
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def scheme_class(name: str) -> type[QuantConfig]:
    """The config class of ``name``, or :class:`UnknownSchemeError` listing the known schemes."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownSchemeError(
            f"unknown quantization scheme {name!r}; known schemes: {', '.join(known_schemes())}") from None


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """Rebuild a config from :meth:`QuantConfig.to_dict` output (dispatching on ``scheme``)."""
    if "scheme" not in d:
        raise QuantError("quantization config has no 'scheme' field")
    return scheme_class(d["scheme"]).from_dict(d)


def parse_override(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` -> (field, value); the value is read as JSON when it parses (``true``,
    ``0.5``, ``[1, 2]``), else kept as a string."""
    import json

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise QuantError(f"expected FIELD=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def make_config(name: str, fields: dict[str, Any], flags: dict[str, str] | None = None) -> QuantConfig:
    """Build scheme ``name``'s config from ``fields``; a field the scheme does not have is an error
    naming the scheme (``flags`` maps field -> the CLI flag that set it, for the message)."""
    cls = scheme_class(name)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in fields if k not in known]
    if unknown:
        said = ", ".join((flags or {}).get(k, k) for k in unknown)
        raise QuantError(f"scheme {name!r} does not take {said}; its settings: "
                         f"{', '.join(sorted(known - {'version'}))}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return cls(**d)
    except TypeError as e:
        raise QuantError(f"scheme {name!r}: {e}") from e
