"""A matrix expanded: draw groups (one engine load each), their draws, their cells, and the cells
that cannot exist with the reason why.

A *group* is variant x scheme x engine x KV x batch size x generation length x prompt length (few-shot
examples): one engine load. It serves a greedy draw (if the matrix has greedy) and, per temperature,
one shared sampled draw that every sampled strategy decides on (maj@8 and best-of-8 read its first 8 samples, adaptive maj@<=16
reads on until it stops). Each (group, temperature, strategy) is a :class:`Cell`: a report row
and a JSONL line.

Exclusions are decided here from what each engine can load (no model is touched): a kv press on an
engine without presses, gptq on the natix engine, an int4 KV cache on the hf engine without an
artifact that declares one, ...; and single cells: on the natix engine a request's n samples run in
one batch, so a strategy whose budget exceeds the batch size cannot run there. Excluded cells are
written to ``cells.jsonl`` with ``status: "excluded"`` and the reason, so the report states them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from natix.bench.matrix import EXPORTED, Matrix, Scheme, Variant, is_press

#: the weight schemes each engine loads (the artifact's manifest decides for a given artifact)
ENGINE_SCHEMES = {
    "hf": {"dense", "fp8", "gptq", "w4a8kv4"},
    "natix": {"dense", "fp8", "w4a8kv4"},
    "vllm": {"dense", "fp8", "gptq"},
    "openai-http": {"dense"},
}
_DEFAULT_KV = {"w4a8kv4": "int4"}  # a scheme's own KV cache when kv is "auto"


@dataclass(frozen=True)
class Group:
    """One engine load: variant x scheme x engine x KV x batch size x generation length x prompt length
    (``few_shot`` worked examples before each question)."""

    variant: Variant
    scheme: Scheme
    engine: str
    kv: str
    batch_size: int
    max_tokens: int | None = None  # None: the task's
    few_shot: int = 0

    @property
    def key(self) -> str:
        tail = (f"/len={self.max_tokens}" if self.max_tokens else "") + (f"/shots={self.few_shot}" if self.few_shot else "")
        return f"{self.variant.name}/{self.scheme.name}/{self.engine}/kv={self.kv}/b={self.batch_size}{tail}"


@dataclass(frozen=True)
class Cell:
    group: Group
    temperature: float  # 0 for greedy
    strategy: str  # canonical spec
    label: str  # the spec as the matrix wrote it (short)

    @property
    def key(self) -> str:
        return f"{self.group.key}/T={self.temperature:g}/{self.strategy}"


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]  # runnable, in the matrix's order
    cells: tuple[Cell, ...]  # every cell, runnable or not, in the matrix's order
    excluded: dict[str, str]  # cell key -> why it cannot exist
    excluded_groups: dict[str, str]  # group key -> why none of its cells can exist

    def cells_of(self, group: Group) -> list[Cell]:
        """The cells of ``group`` that can run."""
        return [c for c in self.cells if c.group == group and c.key not in self.excluded]


def weights_kind(scheme: Scheme) -> str:
    """``dense``, ``fp8``, ``gptq`` or ``w4a8kv4`` (a given artifact: from its manifest)."""
    if scheme.kind == "artifact":
        from natix.quant.loader import quantized_scheme

        return quantized_scheme(scheme.artifact) or "dense"
    return scheme.kind if scheme.kind in EXPORTED else "dense"


def artifact_kv(scheme: Scheme) -> str:
    """The KV cache a given artifact declares (``none``, ``int4``, ``fp8``)."""
    from natix.quant.loader import artifact_config

    _, cfg = artifact_config(scheme.artifact)
    return getattr(cfg, "kv_cache", "none") or "none"


def effective_kv(scheme: Scheme, kv: str) -> str:
    """What ``kv`` means for ``scheme``: ``auto`` is the scheme's (or artifact's) own cache."""
    if kv != "auto":
        return kv
    if scheme.kind == "artifact":
        return artifact_kv(scheme)
    return _DEFAULT_KV.get(scheme.kind, "none")


def exclusion(g: Group) -> str | None:
    """Why group ``g`` cannot exist, or None."""
    if g.scheme.kind == "artifact":
        from natix.bench.artifacts import adapter_matches

        if (why := adapter_matches(g.scheme, g.variant)) is not None:
            return why
    kind = weights_kind(g.scheme)
    engines = ENGINE_SCHEMES.get(g.engine)
    if engines is not None and kind not in engines:
        if g.engine == "openai-http":
            return "openai-http measures the server at its endpoint: the weights are whatever that server loaded"
        return f"the {g.engine} engine does not load {kind} weights (it loads {', '.join(sorted(engines))})"
    kv = effective_kv(g.scheme, g.kv)
    if is_press(kv):
        return None if g.engine == "hf" else f"kv press {kv} runs in the hf engine (kvpress); {g.engine} has no presses"
    if g.engine == "openai-http":
        return None if g.kv == "auto" else "openai-http uses the server's KV cache: only kv auto applies"
    if g.scheme.kind == "artifact" and g.engine != "natix" and kv != artifact_kv(g.scheme):
        return (f"artifact {g.scheme.artifact} was exported with KV {artifact_kv(g.scheme)}; the {g.engine} engine "
                f"reads the artifact's KV setting: export it again for KV {kv}")
    if kv == "none":
        return None
    if g.engine == "natix":
        return None if kv == "int4" else f"the natix engine's KV cache is 16-bit or int4, not {kv}"
    if g.engine == "vllm" and kv == "int4":
        return "vllm has no int4 KV cache"
    if kind == "dense":
        return (f"the {g.engine} engine quantizes the KV cache only as an artifact declares it: use a scheme exported "
                f"with KV {kv} (w4a8kv4 for int4, fp8 or gptq for fp8)")
    allowed = {"fp8": ("fp8",), "gptq": ("fp8",), "w4a8kv4": ("int4",)}[kind]
    if kv not in allowed:
        return f"scheme {kind} has no {kv} KV cache (it has: none, {', '.join(allowed)})"
    return None


def plan(m: Matrix, *, shard: tuple[int, int] | None = None) -> Plan:
    """Expand ``m``; ``shard`` = (i, n) keeps the runnable groups i, i+n, i+2n, ... (1-based i) of the
    matrix's order, so n machines running shards 1..n cover every group exactly once."""
    from natix.scaling import Greedy, parse_strategy

    task = m.load_task()
    verifier = (lambda prompt, text: 0.0) if task.has_verifier else None
    strategies = [(s, parse_strategy(s, extractor=task.extractor, verifier=verifier)) for s in m.strategies]
    groups = [Group(v, s, e, kv, b, t, k) for v in m.variants for s in m.schemes for e in m.engines for kv in m.kv
              for b in m.batch_sizes for t in (m.max_tokens or (None,)) for k in m.few_shot]
    excluded_groups = {g.key: why for g in groups if (why := exclusion(g)) is not None}
    runnable = [g for g in groups if g.key not in excluded_groups]
    if shard is not None:
        i, n = shard
        runnable = runnable[i - 1::n]
        keep = set(runnable)
        groups = [g for g in groups if g in keep or g.key in excluded_groups and shard[0] == 1]
    cells, excluded = [], {}
    for g in groups:
        for label, s in strategies:
            temps = (0.0,) if isinstance(s, Greedy) else m.temperatures
            for t in temps:
                c = Cell(g, t, s.spec(), label)
                cells.append(c)
                if g.key in excluded_groups:
                    excluded[c.key] = excluded_groups[g.key]
                elif g.engine == "natix" and s.budget > g.batch_size:
                    excluded[c.key] = (f"the natix engine runs a request's {s.budget} samples in one batch: batch size "
                                       f"{g.batch_size} is smaller")
    runnable = [g for g in runnable if any(c.group == g and c.key not in excluded for c in cells)]
    return Plan(tuple(runnable), tuple(cells), excluded, excluded_groups)


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` -> (2, 4)."""
    from natix.bench.matrix import BenchError

    a, sep, b = text.partition("/")
    try:
        i, n = int(a), int(b)
    except ValueError:
        i = n = 0
    if not sep or n < 1 or not 1 <= i <= n:
        raise BenchError(f"--shard must be I/N with 1 <= I <= N (e.g. 2/4), got {text!r}")
    return i, n


def describe(g: Group, kv: str | None = None) -> dict[str, Any]:
    """What a row records about its group."""
    return {"variant": g.variant.name, "adapter": g.variant.adapter, "scheme": g.scheme.name,
            "scheme_kind": g.scheme.kind, "engine": g.engine, "kv": g.kv,
            "kv_effective": kv if kv is not None else g.kv, "batch_size": g.batch_size, "max_tokens": g.max_tokens,
            "few_shot": g.few_shot}
