"""KV-cache compression specs (``"name:ratio"``) and the kvpress presses they build.

A press prunes the KV cache once, during prefill: ``compression_ratio`` is the fraction of the
prompt's key/value pairs removed in every layer (``knorm:0.5`` keeps half). Decoding then runs
over the smaller cache. The presses come from NVIDIA's kvpress (0.5.5), which pins
transformers<5.3, so they only work in the side environment built by
``scripts/make_env.sh kvpress``; parsing a spec needs nothing, building a press imports kvpress.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KVPRESS_ENV_HINT = (
    "kv presses need the kvpress environment: scripts/make_env.sh kvpress, "
    "then run with --python .venvs/kvpress/bin/python"
)


@dataclass(frozen=True)
class PressInfo:
    """How to build one press: its kvpress class and whether it reads attention weights
    (those need ``attn_implementation="eager"``, which returns them from every layer)."""

    cls_name: str
    needs_eager: bool = False
    summary: str = ""


# Score-based presses that take only ``compression_ratio`` and work on a plain DynamicCache.
# Presses that download side models from a hub (qfilter, kvzap, duo_attention, fastkvzip) or
# need a second pass over the context (kvzip) are left out on purpose.
PRESSES: dict[str, PressInfo] = {
    "knorm": PressInfo("KnormPress", summary="drop keys with the largest L2 norm"),
    "snapkv": PressInfo("SnapKVPress", summary="attention of the last 64 prompt tokens (prompt > 64)"),
    "streaming_llm": PressInfo("StreamingLLMPress", summary="keep 4 sink tokens + the most recent"),
    "expected_attention": PressInfo("ExpectedAttentionPress", summary="attention expected of future queries"),
    "tova": PressInfo("TOVAPress", summary="attention from the last prompt token"),
    "observed_attention": PressInfo(
        "ObservedAttentionPress", needs_eager=True, summary="mean attention received (H2O); eager attention"
    ),
    "random": PressInfo("RandomPress", summary="uniformly random (a baseline)"),
    "keydiff": PressInfo("KeyDiffPress", summary="keys least similar to the mean key"),
    "pyramidkv": PressInfo("PyramidKVPress", summary="SnapKV with a per-layer budget pyramid"),
}


class PressSpecError(ValueError):
    """A ``name:ratio`` KV-press spec that cannot be honoured; the message lists the options."""


@dataclass(frozen=True)
class PressSpec:
    """A parsed ``"name:ratio"``: ``ratio`` in [0, 1) is the fraction of prompt KV pairs pruned."""

    name: str
    ratio: float

    @property
    def info(self) -> PressInfo:
        return PRESSES[self.name]

    def __str__(self) -> str:
        return f"{self.name}:{self.ratio:g}"


def _available() -> str:
    return ", ".join(sorted(PRESSES))


def parse_press_spec(spec: str) -> PressSpec:
    """Parse ``"knorm:0.5"`` (the ratio defaults to 0.5 when omitted: ``"knorm"``).

    Raises :class:`PressSpecError` naming the available presses on an unknown name, and the
    valid range on a bad ratio.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PressSpecError(f"empty kv press spec; use name:ratio with name one of: {_available()}")
    name, sep, ratio_text = spec.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in PRESSES:
        raise PressSpecError(f"unknown kv press {name!r} in {spec!r}; available presses: {_available()}")
    if not sep:
        ratio_text = "0.5"
    try:
        ratio = float(ratio_text)
    except ValueError:
        raise PressSpecError(
            f"kv press ratio in {spec!r} is not a number; give the fraction of the cache to prune, "
            f"in [0, 1), e.g. {name}:0.5"
        ) from None
    if not 0.0 <= ratio < 1.0:
        raise PressSpecError(
            f"kv press ratio {ratio:g} in {spec!r} is outside [0, 1): it is the fraction of the "
            f"prompt's KV cache to prune (e.g. {name}:0.5 keeps half)"
        )
    return PressSpec(name, ratio)


def _import_kvpress() -> Any:
    """``import kvpress``, refusing a transformers it does not work with: kvpress 0.5.5 imports
    beside transformers>=5.3 but every press then fails (KeyError 'cache_position')."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("5.3"):
        raise ImportError(f"kvpress 0.5.5 needs transformers<5.3, this environment has {transformers.__version__}")
    import kvpress

    return kvpress


def kvpress_available() -> bool:
    """Whether kvpress imports here and can work (transformers<5.3)."""
    try:
        _import_kvpress()
    except Exception:  # ImportError, or kvpress failing to import against this transformers
        return False
    return True


def build_press(spec: PressSpec | str) -> Any:
    """Instantiate the kvpress press for ``spec``; raises ImportError with the env hint if
    kvpress cannot be used here."""
    parsed = parse_press_spec(spec) if isinstance(spec, str) else spec
    try:
        kvpress = _import_kvpress()
    except Exception as e:
        raise ImportError(f"{KVPRESS_ENV_HINT} ({type(e).__name__}: {e})") from e
    cls = getattr(kvpress, parsed.info.cls_name)
    return cls(compression_ratio=parsed.ratio)


def cache_lengths(cache: Any) -> list[int]:
    """Sequence length held by each layer of a transformers cache (after a press: the kept
    length; presses such as pyramidkv give layers different budgets)."""
    return [int(cache.get_seq_length(i)) for i in range(len(cache.layers))]
