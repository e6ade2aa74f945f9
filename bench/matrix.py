"""The benchmark matrix: which model variants, engines, KV presses, temperatures and strategies.

A matrix comes from defaults < a YAML file < CLI flags. It expands into *draw groups*: one
engine load (variant x engine x KV press) serves a greedy draw and, per temperature, one shared
sampled draw that every sampled strategy decides on (maj@8 and best-of-8 read the first 8
samples, adaptive maj@<=16 reads on until it stops). Each (group, temperature, strategy) is a
:class:`Cell`, the unit a report row and a JSONL line describe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

DEMO_ADAPTER = "demo"
DEFAULT_STRATEGIES = ("greedy", "maj@8", "bo8:verifier", "bo8:logprob", "adaptive@16:beta")


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
        if self.items < 1:
            raise ValueError(f"items must be >= 1, got {self.items}")
        if not self.variants or not self.engines or not self.strategies:
            raise ValueError("a matrix needs at least one variant, engine and strategy")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique: {names}")
        for t in self.temperatures:
            if t <= 0:
                raise ValueError(f"temperatures are for sampled strategies and must be > 0, got {t}"
                                 " (greedy runs at 0 by itself)")
        from natix.bench.tasks import get_task
        from natix.scaling import parse_strategy

        task = get_task(self.task)  # raises, naming the available tasks
        # Validate specs now, not after the model loaded; a verifier stands in when the task has
        # one, so "bo8:verifier" on a task without a verifier fails here, by name.
        placeholder = (lambda prompt, text: 0.0) if task.has_verifier else None
        for s in self.strategies:
            parse_strategy(s, extractor=task.kind, verifier=placeholder)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: "Matrix | None" = None) -> "Matrix":
        """Overlay ``data`` (parsed YAML or CLI flags) on ``base`` (defaults)."""
        base = base or cls()
        known = {f.name for f in dataclasses.fields(cls)} | {"kv_press", "temperature", "strategy"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown matrix keys: {unknown}; known: {sorted(known)}")
        changes: dict[str, Any] = {}
        for key, value in data.items():
            if value is None:
                continue
            key = {"kv_press": "kv_presses", "temperature": "temperatures", "strategy": "strategies"}.get(key, key)
            if key == "variants":
                value = tuple(_variant(v) for v in value)
            elif key in ("engines", "kv_presses", "strategies"):
                value = tuple(str(v) for v in ([value] if isinstance(value, str) else value))
            elif key == "temperatures":
                value = tuple(float(v) for v in ([value] if isinstance(value, (int, float)) else value))
            changes[key] = value
        return dataclasses.replace(base, **changes)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Matrix":
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except OSError as e:
            raise ValueError(f"cannot read matrix file {p}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ValueError(f"matrix file {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"matrix file {p} must hold a mapping of keys, got {type(data).__name__}")
        return cls.from_mapping(data)

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
    if isinstance(v, Mapping) and "name" in v:
        return Variant(str(v["name"]), v.get("adapter"))
    raise ValueError(f"a variant is a name or a mapping with 'name' (and 'adapter'), got {v!r}")


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
