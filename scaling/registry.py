"""Strategy specs as strings, for CLIs and YAML: a small registry keyed by name.

Grammar (case-insensitive name)::

    spec    := name [ "@" ] [ n ] [ ":" options ]
    options := option ( "," option )*
    option  := value | key "=" value

Examples: ``greedy``, ``maj@8``, ``wmaj@8`` (weighted by mean logprob), ``wmaj@8:sum_logprob``,
``bo8:verifier``, ``bo8:logprob``, ``adaptive@16``, ``adaptive@16:beta,threshold=0.9,round=4``.
A bare option (no ``=``) fills the strategy's main option (the weighting, the scorer, the stop
rule). Values are coerced to int, float or bool where they parse as such.

Things a string cannot carry - the task's answer extractor and verifier - are injected by the
caller: ``parse_strategy("bo8:verifier", extractor=task.extractor, verifier=task.verify)``.

Each strategy module registers a factory with ``@register_strategy("maj", ...)``; parsing
dispatches through the table, never through a chain of name comparisons.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from natix.scaling.strategy import Strategy

__all__ = ["StrategyArgs", "register_strategy", "parse_strategy", "available_strategies"]

OptionValue = str | int | float | bool

_FACTORIES: dict[str, Callable[["StrategyArgs"], "Strategy"]] = {}

# Modules whose import registers the built-in strategies; imported on first parse so that
# importing this module alone stays cheap and free of cycles.
_BUILTIN_MODULES = (
    "natix.scaling.greedy",
    "natix.scaling.vote",
    "natix.scaling.best_of_n",
    "natix.scaling.adaptive",
)

_SPEC = re.compile(r"^(?P<name>[a-z_]+?)(?:@?(?P<n>\d+))?(?::(?P<opts>.*))?$")


@dataclass(frozen=True)
class StrategyArgs:
    """A parsed spec plus the caller's injected objects, handed to a strategy factory."""

    name: str
    n: int | None = None
    positional: tuple[OptionValue, ...] = ()
    keywords: dict[str, OptionValue] = field(default_factory=dict)
    extractor: Any = "number"
    verifier: Any = None
    spec: str = ""

    def n_or(self, default: int) -> int:
        return default if self.n is None else self.n

    def options(self, positional: str | None = None, aliases: dict[str, str] | None = None) -> dict[str, Any]:
        """Keyword options as constructor arguments: the (at most one) bare option becomes
        ``positional``; ``aliases`` maps short spec keys to field names (``round`` ->
        ``round_size``)."""
        out = {(aliases or {}).get(k, k): v for k, v in self.keywords.items()}
        if self.positional:
            if positional is None or len(self.positional) > 1:
                raise ValueError(f"{self.spec!r}: unexpected option(s) {list(self.positional)}")
            if positional in out:
                raise ValueError(f"{self.spec!r}: {positional} given twice")
            out[positional] = self.positional[0]
        return out


def register_strategy(*names: str) -> Callable[[Callable[[StrategyArgs], "Strategy"]], Callable[[StrategyArgs], "Strategy"]]:
    """Decorator for a factory ``StrategyArgs -> Strategy``, reachable under each of ``names``."""
    if not names:
        raise ValueError("register_strategy needs at least one name")
    for name in names:
        # digits would be ambiguous with the sample count ("bo8")
        if not re.fullmatch(r"[a-z_]+", name):
            raise ValueError(f"strategy names are lower-case letters/underscores, got {name!r}")

    def deco(factory: Callable[[StrategyArgs], "Strategy"]) -> Callable[[StrategyArgs], "Strategy"]:
        for name in names:
            if name in _FACTORIES:
                raise ValueError(f"strategy {name!r} is already registered")
            _FACTORIES[name] = factory
        return factory

    return deco


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_strategies() -> list[str]:
    _load_builtins()
    return sorted(_FACTORIES)


def _coerce(value: str) -> OptionValue:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _split(spec: str) -> StrategyArgs:
    text = spec.strip()
    name_part, sep, opts = text.partition(":")
    m = _SPEC.match(name_part.lower())
    if not m or m.group("opts") is not None:
        raise ValueError(f"bad strategy spec {spec!r}; expected e.g. 'maj@8' or 'bo8:verifier'")
    positional: list[OptionValue] = []
    keywords: dict[str, OptionValue] = {}
    for item in (o.strip() for o in opts.split(",")) if sep else ():
        if not item:
            raise ValueError(f"empty option in strategy spec {spec!r}")
        key, eq, value = item.partition("=")
        if eq:
            if key.strip() in keywords:
                raise ValueError(f"option {key.strip()!r} repeated in {spec!r}")
            keywords[key.strip()] = _coerce(value.strip())
        else:
            positional.append(_coerce(item))
    n = None if m.group("n") is None else int(m.group("n"))
    return StrategyArgs(m.group("name"), n, tuple(positional), keywords, spec=spec)


def parse_strategy(spec: str, *, extractor: Any = "number", verifier: Any = None) -> "Strategy":
    """Build a strategy from a spec string (see module doc). ``extractor``: registered name,
    extractor or callable; ``verifier``: ``(prompt, completion_text) -> float`` for
    ``bo<N>:verifier``. Raises ``ValueError`` on unknown names or bad options."""
    _load_builtins()
    parsed = _split(spec)
    if parsed.name not in _FACTORIES:
        raise ValueError(f"unknown strategy {parsed.name!r} in {spec!r}; available: {', '.join(sorted(_FACTORIES))}")
    args = StrategyArgs(
        parsed.name, parsed.n, parsed.positional, parsed.keywords, extractor, verifier, spec
    )
    try:
        return _FACTORIES[parsed.name](args)
    except TypeError as e:  # an unknown keyword reaches the dataclass constructor
        raise ValueError(f"bad options in strategy spec {spec!r}: {e}") from e
