"""The benchmark matrix: which model variants, engines, KV presses, temperatures and strategies.

A matrix comes from defaults < a YAML file < CLI flags. It expands into *draw groups*: one
engine load (variant x engine x KV press) serves a greedy draw and, per temperature, one shared
sampled draw that every sampled strategy decides on (maj@8 and best-of-8 read the first 8
samples, adaptive maj@<=16 reads on until it stops). Each (group, temperature, strategy) is a
:class:`Cell`, the unit a report row and a JSONL line describe.
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
DEFAULT_STRATEGIES = ("greedy", "maj@8", "bo8:verifier", "bo8:logprob", "adaptive@16:beta")
DTYPES = ("auto", "fp32", "bf16", "fp16")
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
class Matrix:
    name: str = "default"
    task: str = "chain_sum"
    items: int = 40
    model: str = "smollm2-135m"
    variants: tuple[Variant, ...] = (Variant("base"), Variant("adapter", DEMO_ADAPTER))
    engines: tuple[str, ...] = ("hf",)
    kv_presses: tuple[str, ...] = ("none",)
    temperatures: tuple[float, ...] = (0.7,)
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    max_tokens: int | None = None  # None: the task's default
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 128
    python: str | None = None  # run engines in a worker with this interpreter (own venv)
    engine_python: Mapping[str, str] = field(default_factory=dict)  # per-engine interpreter

    def __post_init__(self) -> None:
        """Every value is checked here, types included (a YAML ``items: "two"`` or a NaN
        temperature must fail before anything loads), raising :class:`BenchError`."""
        _text("name", self.name, name=True)
        _text("task", self.task)
        _int("items", self.items, 1)
        _text("model", self.model)
        if not self.variants or not self.engines or not self.strategies:
            raise BenchError("a matrix needs at least one variant, engine and strategy")
        for v in self.variants:
            _text("variant name", v.name, name=True)
            if v.adapter is not None:
                _text(f"adapter of variant {v.name!r}", v.adapter)
        _unique("variants", [v.name for v in self.variants])
        from natix.engines.base import available_engines

        for e in self.engines:
            if _text("engine", e) not in available_engines():
                raise BenchError(f"unknown engine {e!r}; available: {', '.join(available_engines())}")
        _unique("engines", list(self.engines))
        from natix.engines.kv_compression import parse_press_spec

        for kv in self.kv_presses:
            if _text("kv_press", kv) != "none":
                try:
                    parse_press_spec(kv)
                except ValueError as e:
                    raise BenchError(str(e)) from e
        _unique("kv_presses", list(self.kv_presses))
        for t in self.temperatures:
            if _real("temperature", t) <= 0:
                raise BenchError(f"temperatures are for sampled strategies and must be > 0, got {t}"
                                 " (greedy runs at 0 by itself)")
        _unique("temperatures", [f"{t:g}" for t in self.temperatures])
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1)
        if not 0 < _real("top_p", self.top_p) <= 1:
            raise BenchError(f"top_p must be in (0, 1], got {self.top_p}")
        _int("top_k", self.top_k, 0)
        _int("seed", self.seed, 0)
        from natix.quant.validate import is_device

        if not is_device(self.device):
            raise BenchError(f"device {self.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
        if self.dtype not in DTYPES:
            raise BenchError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        _int("max_batch_size", self.max_batch_size, 1)
        if self.python is not None:
            _text("python", self.python)
        if not isinstance(self.engine_python, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.engine_python.items()):
            raise BenchError(f"engine_python must map engine names to interpreters, got {self.engine_python!r}")
        from natix.bench.tasks import get_task
        from natix.scaling import Greedy, parse_strategy

        try:
            task = get_task(self.task)
        except ValueError as e:  # names the available tasks
            raise BenchError(str(e)) from e
        # Validate specs now, not after the model loaded; a verifier stands in when the task has
        # one, so "bo8:verifier" on a task without a verifier fails here, by name.
        placeholder = (lambda prompt, text: 0.0) if task.has_verifier else None
        parsed = []
        for s in self.strategies:
            try:
                parsed.append(parse_strategy(_text("strategy", s), extractor=task.kind, verifier=placeholder))
            except (ValueError, TypeError) as e:
                raise BenchError(str(e)) from e
        _unique("strategies", [p.spec() for p in parsed])
        if not self.temperatures and any(not isinstance(p, Greedy) for p in parsed):
            raise BenchError("sampled strategies need at least one temperature")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: "Matrix | None" = None) -> "Matrix":
        """Overlay ``data`` (parsed YAML or CLI flags) on ``base`` (defaults)."""
        base = base or cls()
        known = {f.name for f in dataclasses.fields(cls)} | {"kv_press", "temperature", "strategy"}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise BenchError(f"unknown matrix keys: {unknown}; known: {sorted(known)}")
        changes: dict[str, Any] = {}
        for key, value in data.items():
            if value is None:
                continue
            key = {"kv_press": "kv_presses", "temperature": "temperatures", "strategy": "strategies"}.get(key, key)
            if key in ("variants", "engines", "kv_presses", "strategies", "temperatures"):
                # one value is a list of one: `variants: base` is one variant, not four (b, a, s, e)
                if isinstance(value, (str, int, float, Mapping)):
                    value = [value]
                if not isinstance(value, (list, tuple)):
                    raise BenchError(f"{key} must be a list, got {value!r}")
                if key == "variants":
                    value = tuple(_variant(v) for v in value)
                elif key == "temperatures":
                    value = tuple(_real("temperature", v) for v in value)
                else:
                    value = tuple(_text(key, v) for v in value)
            changes[key] = value
        return dataclasses.replace(base, **changes)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Matrix":
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise BenchError(f"cannot read matrix file {p}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise BenchError(f"matrix file {p} is not UTF-8 text: {e}") from e
        except yaml.YAMLError as e:
            raise BenchError(f"matrix file {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise BenchError(f"matrix file {p} must hold a mapping of keys, got {type(data).__name__}")
        try:
            return cls.from_mapping(data)
        except BenchError as e:
            raise BenchError(f"matrix file {p}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["engine_python"] = dict(self.engine_python)
        return d

    def groups(self) -> list["Group"]:
        return [Group(v, e, kv) for v in self.variants for e in self.engines for kv in self.kv_presses]

    def python_for(self, engine: str) -> str | None:
        return self.engine_python.get(engine, self.python)


def _variant(v: Any) -> Variant:
    if isinstance(v, str):
        return Variant(v, DEMO_ADAPTER if v == "adapter" else None)
    if isinstance(v, Mapping) and "name" in v and set(v) <= {"name", "adapter"}:
        return Variant(_text("variant name", v["name"]), None if v.get("adapter") is None
                       else _text("adapter", v["adapter"]))
    raise BenchError(f"a variant is a name or a mapping with 'name' (and 'adapter'), got {v!r}")


@dataclass(frozen=True)
class Group:
    """One engine load: variant x engine x KV press."""

    variant: Variant
    engine: str
    kv_press: str

    @property
    def key(self) -> str:
        return f"{self.variant.name}/{self.engine}/kv={self.kv_press}"


def cell_key(group: Group, temperature: float, strategy: str) -> str:
    return f"{group.key}/T={temperature:g}/{strategy}"
