"""The benchmark matrix: its axes, and the checks every value passes before anything runs.

A matrix comes from defaults < a YAML file (or a bundled one: ``--matrix full``) < CLI flags. Its
axes: model variants (base, base + adapter), quantization **schemes** (unquantized, or an artifact
given or exported by the run), **engines** (each with its own interpreter and options), **KV**
(the scheme's own, 16-bit, int4, fp8, or a kvpress press), temperatures, strategies, batch sizes
(rows in flight), generation lengths and prompt lengths (few-shot examples). :mod:`natix.bench.plan` expands it into draw groups (one
engine load each) and cells, and states the cells that cannot exist.

The defaults are the smoke matrix README's first command runs: the demo adapter on the embedded
model, greedy against best-of-4 by the task's verifier and maj@4, 16 items (a few minutes on a
2-core CPU). ``--matrix full`` is the committed ``reports/matrix-cpu`` matrix.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from natix.quant.errors import UserError

DEMO_ADAPTER = "demo"
DEFAULT_STRATEGIES = ("greedy", "maj@4", "bo4:verifier")
DTYPES = ("auto", "fp32", "bf16", "fp16")
#: schemes that load the variant's own weights (no artifact); "none" keeps the matrix's dtype
UNQUANTIZED = ("none", "bf16", "fp16", "fp32")
#: schemes a run exports from the variant (natix-quant export), cached by content hash
EXPORTED = ("fp8", "gptq", "w4a8kv4")
#: KV-cache settings besides kvpress presses: the scheme's own, 16-bit, UINT4, FP8
KV_CHOICES = ("auto", "none", "int4", "fp8")
_KV_ALIASES = {"kv4": "int4", "kv16": "none", "bf16": "none"}
_EXPORT_KEYS = ("calib", "calib_samples", "calib_max_length", "set", "dtype")
_NAME = re.compile(r"[^/\\\x00-\x1f]+")  # names become path parts and cell keys: no separators


class BenchError(UserError, ValueError):
    """A matrix, an output directory or a cells file natix-bench cannot use; the message says which
    key, file or line. (A ``ValueError`` too, for callers that caught the ValueErrors it replaces.)"""


def _int(key: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BenchError(f"{key} must be an integer, got {v!r}")
    if v < lo:
        raise BenchError(f"{key} must be >= {lo}, got {v}")
    return v


def _real(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BenchError(f"{key} must be a finite number, got {v!r}")
    return float(v)


def _text(key: str, v: Any, *, name: bool = False) -> str:
    from natix.quant.validate import check_text

    if not isinstance(v, str) or not v:
        raise BenchError(f"{key} must be a non-empty string, got {v!r}")
    check_text(v, key)
    if name and not _NAME.fullmatch(v):
        raise BenchError(f"{key} {v!r} may not contain '/', '\\' or control characters (it names files and cells)")
    return v


def _unique(key: str, values: list[str]) -> None:
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise BenchError(f"{key} lists {', '.join(dup)} more than once (each would run, and be reported, twice)")


def demo_adapter_path() -> Path:
    """The demo LoRA shipped with natix (SmolLM2-135M, chain_sum)."""
    return Path(__file__).resolve().parent / "data" / "adapters" / "smollm2-chain-sum-lora"


def bundled_matrices() -> dict[str, Path]:
    """The matrices shipped with natix-bench (``--matrix NAME``)."""
    folder = Path(__file__).resolve().parent / "matrices"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


@dataclass(frozen=True)
class Variant:
    """A model variant: the matrix's base model, optionally with an adapter merged."""

    name: str
    adapter: str | None = None

    def adapter_path(self) -> str | None:
        if self.adapter == DEMO_ADAPTER:
            return str(demo_adapter_path())
        return self.adapter


@dataclass(frozen=True)
class Scheme:
    """How a variant's weights are stored. ``kind``: one of :data:`UNQUANTIZED` (the variant's own
    weights in that dtype), one of :data:`EXPORTED` (exported by the run, ``export`` holding
    ``natix-quant export`` settings: calib, calib_samples, calib_max_length, set, dtype), or
    ``artifact`` (a given artifact directory, used for the variant it was exported from)."""

    name: str
    kind: str
    artifact: str | None = None
    export: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def quantized(self) -> bool:
        return self.kind not in UNQUANTIZED

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "artifact": self.artifact, "export": dict(self.export)}


def normalize_kv(value: str) -> str:
    """``kv4`` -> ``int4`` and the like; a press spec stays as written."""
    return _KV_ALIASES.get(value, value)


def is_press(kv: str) -> bool:
    return kv not in KV_CHOICES


@dataclass(frozen=True)
class Matrix:
    name: str = "smoke"
    task: str = "chain_sum"
    task_file: str | None = None  # a JSONL task (natix.bench.task_file); replaces `task`
    items: int = 16
    model: str = "smollm2-135m"
    variants: tuple[Variant, ...] = (Variant("adapter", DEMO_ADAPTER),)
    schemes: tuple[Scheme, ...] = (Scheme("none", "none"),)
    engines: tuple[str, ...] = ("hf",)
    kv: tuple[str, ...] = ("auto",)
    temperatures: tuple[float, ...] = (0.7,)
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    batch_sizes: tuple[int, ...] = (64,)  # rows in flight: hf batch rows, natix/vllm max_num_seqs, http concurrency
    max_tokens: tuple[int, ...] = ()  # generation lengths; () = the task's
    few_shot: tuple[int, ...] = (0,)  # prompt lengths: worked training examples before each question
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    python: str | None = None  # run engines in a worker with this interpreter (own venv)
    engine_python: Mapping[str, str] = field(default_factory=dict)  # per-engine interpreter
    engine_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per-engine EngineConfig.extra
    cell_timeout_s: float = 3600.0  # per draw group (one engine load); a group past it is killed and recorded
    plugins: tuple[str, ...] = ()  # Python files imported first (they may register engines, tasks, extractors)

    def __post_init__(self) -> None:
        """Every value is checked here, types included (a YAML ``items: "two"`` or a NaN
        temperature must fail before anything loads), raising :class:`BenchError`."""
        _text("name", self.name, name=True)
        _int("items", self.items, 1)
        _text("model", self.model)
        if not self.variants or not self.engines or not self.strategies or not self.schemes or not self.kv:
            raise BenchError("a matrix needs at least one variant, scheme, engine, kv setting and strategy")
        for v in self.variants:
            _text("variant name", v.name, name=True)
            if v.adapter is not None:
                _text(f"adapter of variant {v.name!r}", v.adapter)
        _unique("variants", [v.name for v in self.variants])
        for s in self.schemes:
            _text("scheme name", s.name, name=True)
        _unique("schemes", [s.name for s in self.schemes])
        for p in self.plugins:
            _text("plugin", p)
        if self.plugins:
            from natix.bench.plugins import load_plugins

            load_plugins(self.plugins)  # they may register the engines and tasks checked below
        from natix.engines.base import available_engines

        for e in self.engines:
            if _text("engine", e) not in available_engines():
                raise BenchError(f"unknown engine {e!r}; available: {', '.join(available_engines())}")
        _unique("engines", list(self.engines))
        from natix.engines.kv_compression import parse_press_spec

        for kv in self.kv:
            if is_press(_text("kv", kv)):
                try:
                    parse_press_spec(kv)
                except ValueError as e:
                    raise BenchError(f"kv {kv!r} is not one of {', '.join(KV_CHOICES)} nor a kv press: {e}") from e
        _unique("kv", list(self.kv))
        for t in self.temperatures:
            if _real("temperature", t) <= 0:
                raise BenchError(f"temperatures are for sampled strategies and must be > 0, got {t}"
                                 " (greedy runs at 0 by itself)")
        _unique("temperatures", [f"{t:g}" for t in self.temperatures])
        if not self.batch_sizes:
            raise BenchError("batch_sizes needs at least one value")
        for b in self.batch_sizes:
            _int("batch_size", b, 1)
        _unique("batch_sizes", [str(b) for b in self.batch_sizes])
        for n in self.max_tokens:
            _int("max_tokens", n, 1)
        _unique("max_tokens", [str(n) for n in self.max_tokens])
        if not self.few_shot:
            raise BenchError("few_shot needs at least one value (0: no examples)")
        for k in self.few_shot:
            _int("few_shot", k, 0)
        _unique("few_shot", [str(k) for k in self.few_shot])
        if not 0 < _real("top_p", self.top_p) <= 1:
            raise BenchError(f"top_p must be in (0, 1], got {self.top_p}")
        _int("top_k", self.top_k, 0)
        _int("seed", self.seed, 0)
        if _real("cell_timeout_s", self.cell_timeout_s) <= 0:
            raise BenchError(f"cell_timeout_s must be > 0, got {self.cell_timeout_s}")
        from natix.quant.validate import is_device

        if not is_device(self.device):
            raise BenchError(f"device {self.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
        if self.dtype not in DTYPES:
            raise BenchError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.python is not None:
            _text("python", self.python)
        if not isinstance(self.engine_python, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.engine_python.items()):
            raise BenchError(f"engine_python must map engine names to interpreters, got {self.engine_python!r}")
        if not isinstance(self.engine_options, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Mapping) for k, v in self.engine_options.items()):
            raise BenchError(f"engine_options must map engine names to mappings of options, got {self.engine_options!r}")
        from natix.scaling import Greedy, parse_strategy

        task = self.load_task()
        if any(self.few_shot) and self.task_file is not None:
            raise BenchError(f"few_shot {list(self.few_shot)}: task file {self.task_file} has no training split; put "
                             "worked examples in its few_shot option")
        # Validate specs now, not after the model loaded; a verifier stands in when the task has
        # one, so "bo8:verifier" on a task without a verifier fails here, by name.
        placeholder = (lambda prompt, text: 0.0) if task.has_verifier else None
        parsed = []
        for s in self.strategies:
            try:
                parsed.append(parse_strategy(_text("strategy", s), extractor=task.extractor, verifier=placeholder))
            except (ValueError, TypeError) as e:
                raise BenchError(f"strategy {s!r} on task {task.name!r}: {e}") from e
        _unique("strategies", [p.spec() for p in parsed])
        if not self.temperatures and any(not isinstance(p, Greedy) for p in parsed):
            raise BenchError("sampled strategies need at least one temperature")

    def load_task(self) -> Any:
        """The task this matrix evaluates (a task file's, or a registered one)."""
        if self.task_file is not None:
            from natix.bench.task_file import load_task_file

            return load_task_file(_text("task_file", self.task_file))
        from natix.bench.tasks import get_task

        try:
            return get_task(_text("task", self.task))
        except ValueError as e:  # names the available tasks
            raise BenchError(str(e)) from e

    @property
    def task_name(self) -> str:
        return f"file:{Path(self.task_file).name}" if self.task_file else self.task

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: "Matrix | None" = None) -> "Matrix":
        """Overlay ``data`` (parsed YAML or CLI flags) on ``base`` (defaults)."""
        base = base or cls()
        aliases = {"kv_press": "kv", "kv_presses": "kv", "temperature": "temperatures", "strategy": "strategies",
                   "scheme": "schemes", "engine": "engines", "variant": "variants", "batch_size": "batch_sizes",
                   "max_batch_size": "batch_sizes", "plugin": "plugins"}
        known = {f.name for f in dataclasses.fields(cls)} | set(aliases)
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise BenchError(f"unknown matrix keys: {unknown}; known: {sorted(known)}")
        changes: dict[str, Any] = {}
        for key, value in data.items():
            if value is None:
                continue
            key = aliases.get(key, key)
            if key in ("variants", "engines", "kv", "strategies", "temperatures", "schemes", "batch_sizes",
                       "max_tokens", "few_shot", "plugins"):
                # one value is a list of one: `variants: base` is one variant, not four (b, a, s, e)
                if isinstance(value, (str, int, float, Mapping)):
                    value = [value]
                if not isinstance(value, (list, tuple)):
                    raise BenchError(f"{key} must be a list, got {value!r}")
                if key == "variants":
                    value = tuple(_variant(v) for v in value)
                elif key == "schemes":
                    value = tuple(_scheme(v) for v in value)
                elif key == "temperatures":
                    value = tuple(_real("temperature", v) for v in value)
                elif key in ("batch_sizes", "max_tokens", "few_shot"):
                    value = tuple(_int(key, v, 0 if key == "few_shot" else 1) for v in value)
                elif key == "kv":
                    value = tuple(normalize_kv(_text(key, v)) for v in value)
                else:
                    value = tuple(_text(key, v) for v in value)
            elif key == "cell_timeout_s" and not isinstance(value, bool) and isinstance(value, int):
                value = float(value)
            changes[key] = value
        if "task" in changes and "task_file" not in changes:
            changes["task_file"] = None  # a task named on top of a task file replaces it
        return dataclasses.replace(base, **changes)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Matrix":
        import yaml

        p = Path(path)
        if not p.exists() and str(path) in bundled_matrices():
            p = bundled_matrices()[str(path)]
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BenchError(f"cannot read matrix file {p}: no such file (bundled matrices: "
                             f"{', '.join(bundled_matrices())})") from None
        except OSError as e:
            raise BenchError(f"cannot read matrix file {p}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise BenchError(f"matrix file {p} is not UTF-8 text: {e}") from e
        except yaml.YAMLError as e:
            raise BenchError(f"matrix file {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise BenchError(f"matrix file {p} must hold a mapping of keys, got {type(data).__name__}")
        if isinstance(data.get("task_file"), str) and not Path(data["task_file"]).is_absolute():
            data["task_file"] = str(p.parent / data["task_file"])  # relative to the YAML, as a user means it
        try:
            return cls.from_mapping(data)
        except BenchError as e:
            raise BenchError(f"matrix file {p}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["schemes"] = [s.to_dict() for s in self.schemes]
        d["engine_python"] = dict(self.engine_python)
        d["engine_options"] = {k: dict(v) for k, v in self.engine_options.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Matrix":
        """The inverse of :meth:`to_dict` (a worker process rebuilds its matrix from it)."""
        d = dict(d)
        d["variants"] = tuple(Variant(**v) for v in d["variants"])
        d["schemes"] = tuple(Scheme(s["name"], s["kind"], s.get("artifact"), s.get("export") or {})
                             for s in d["schemes"])
        for k in ("engines", "kv", "temperatures", "strategies", "batch_sizes", "max_tokens", "few_shot", "plugins"):
            d[k] = tuple(d[k])
        return cls(**d)

    def python_for(self, engine: str) -> str | None:
        return self.engine_python.get(engine, self.python)


def _variant(v: Any) -> Variant:
    if isinstance(v, str):
        return Variant(v, DEMO_ADAPTER if v == "adapter" else None)
    if isinstance(v, Mapping) and "name" in v and set(v) <= {"name", "adapter"}:
        return Variant(_text("variant name", v["name"]), None if v.get("adapter") is None
                       else _text("adapter", v["adapter"]))
    raise BenchError(f"a variant is a name or a mapping with 'name' (and 'adapter'), got {v!r}")


def _scheme(v: Any) -> Scheme:
    """``fp8``, or ``{name: gptq-g128, scheme: gptq, calib: chain_sum, calib_samples: 32, set: {...}}``,
    or ``{name: mine, artifact: DIR}``."""
    known = UNQUANTIZED + EXPORTED
    if isinstance(v, str):
        if v not in known:
            raise BenchError(f"unknown scheme {v!r}; use one of {', '.join(known)}, or {{name: N, artifact: DIR}} "
                             "for an artifact you exported")
        return Scheme(v, v)
    if not isinstance(v, Mapping) or "name" not in v:
        raise BenchError(f"a scheme is a name ({', '.join(known)}) or a mapping with 'name', got {v!r}")
    if "kind" in v:  # the form Matrix.to_dict() writes (a run's matrix.json used as a matrix file)
        v = {"name": v["name"], **({"scheme": v["kind"]} if v["kind"] != "artifact" else {}),
             **({"artifact": v["artifact"]} if v.get("artifact") else {}), **dict(v.get("export") or {})}
    extra = sorted(set(v) - {"name", "scheme", "artifact", *_EXPORT_KEYS})
    if extra:
        raise BenchError(f"scheme {v['name']!r}: unknown keys {extra}; known: name, scheme, artifact, "
                         f"{', '.join(_EXPORT_KEYS)}")
    name = _text("scheme name", v["name"], name=True)
    if v.get("artifact") is not None:
        if set(v) - {"name", "artifact"}:
            raise BenchError(f"scheme {name!r}: an artifact is used as exported; export settings do not apply")
        return Scheme(name, "artifact", _text(f"artifact of scheme {name!r}", v["artifact"]))
    kind = v.get("scheme", name)
    if kind not in known:
        raise BenchError(f"scheme {name!r}: unknown scheme {kind!r}; use one of {', '.join(known)}")
    export = {k: v[k] for k in _EXPORT_KEYS if k in v}
    if export and kind not in EXPORTED:
        raise BenchError(f"scheme {name!r} is unquantized: export settings ({', '.join(export)}) do not apply")
    if "set" in export and not isinstance(export["set"], Mapping):
        raise BenchError(f"scheme {name!r}: 'set' must map setting names to values, got {export['set']!r}")
    for key in ("calib_samples", "calib_max_length"):
        if key in export:
            _int(f"scheme {name!r} {key}", export[key], 1 if key == "calib_samples" else 2)
    return Scheme(name, kind, None, export)
