"""Answer extractors: turn a completion's text into a canonical answer string (or ``None``).

Voting only works if equal answers compare equal, so every extractor *normalises*: numbers
become an exact canonical form ("5", "5.0", "$5.00" and "10/2" all become ``"5"``), yes/no
becomes ``"yes"``/``"no"``, choices become an upper-case letter. The same normalisation is
exposed as :meth:`Extractor.normalize` so a benchmark can canonicalise its gold labels and
compare with ``==``.

Explicit answer markers win over incidental text: a model that writes "12 + 5 = 17. The answer
is 14." answered 14, not 17. Priority (first that yields an answer wins):
``\\boxed{...}`` > ``#### ...`` > "the answer is ..." / "answer: ..." > a fallback that depends
on the extractor (last number; leading or last yes/no word; a bracketed choice letter).
Within one marker kind the *last* occurrence wins (models restate and correct themselves).

Extractors register by name (``@register_extractor``) so specs and YAML can name them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, ClassVar, Protocol, runtime_checkable

__all__ = [
    "AnswerExtractor",
    "Extractor",
    "NumberExtractor",
    "YesNoExtractor",
    "ChoiceExtractor",
    "RegexExtractor",
    "CallableExtractor",
    "register_extractor",
    "get_extractor",
    "available_extractors",
    "parse_number",
    "canonical_number",
    "normalize_number",
    "extract_number",
    "extract_yes_no",
    "extract_choice",
]


@runtime_checkable
class AnswerExtractor(Protocol):
    """Anything that maps completion text to a canonical answer or ``None`` (no answer)."""

    def __call__(self, text: str) -> str | None: ...


class Extractor:
    """Base class: subclasses implement :meth:`extract`; :meth:`normalize` canonicalises a
    reference answer (by default, by extracting from it)."""

    name: ClassVar[str] = ""

    def extract(self, text: str) -> str | None:
        raise NotImplementedError

    def normalize(self, answer: str) -> str | None:
        """Canonical form of a gold/reference answer, comparable with ``==`` to extractions."""
        return self.extract(answer)

    def __call__(self, text: str) -> str | None:
        return self.extract(text)


_EXTRACTORS: dict[str, type[Extractor]] = {}


def register_extractor(name: str) -> Callable[[type[Extractor]], type[Extractor]]:
    """Class decorator: make an extractor constructible by name via :func:`get_extractor`."""

    def deco(cls: type[Extractor]) -> type[Extractor]:
        if name in _EXTRACTORS:
            raise ValueError(f"extractor {name!r} is already registered")
        cls.name = name
        _EXTRACTORS[name] = cls
        return cls

    return deco


def available_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def get_extractor(spec: str | AnswerExtractor | Callable[[str], str | None]) -> AnswerExtractor:
    """An extractor from a registered name (``"number"``, ``"yesno"``, ``"choice"``), or
    ``"regex:<pattern>"``, or pass-through for an extractor/callable."""
    if not isinstance(spec, str):
        if not callable(spec):
            raise TypeError(f"expected an extractor name or a callable, got {type(spec).__name__}")
        return spec
    if spec.startswith("regex:"):
        return RegexExtractor(spec[len("regex:"):])
    if spec not in _EXTRACTORS:
        raise ValueError(f"unknown extractor {spec!r}; available: {', '.join(available_extractors())}")
    return _EXTRACTORS[spec]()


# ---------------------------------------------------------------------------------------------
# numbers

# A number token. Thousands groups must be exactly 3 digits ("1,234") so lists like "1,2,3" stay
# three numbers; the sign must touch the digits and not follow a word/digit, so "12 - 3" and
# "3-4" do not produce negatives. A decimal point needs digits after it, so the full stop in
# "The answer is 7." is not swallowed.
_NUM = re.compile(
    r"""
    (?<![\w.])                              # not the tail of a word, number or decimal
    (?P<sign>[-+\u2212])?
    (?P<cur>[$\u20ac\u00a3])?               # currency: $ EUR GBP
    (?P<sign2>[-\u2212])?
    (?P<num>
        \d+\s*/\s*\d+                       # fraction 3/4 (also 10 / 2)
      | \d{1,3}(?:,\d{3})+(?:\.\d+)?        # 1,234 or 1,234.50
      | \d+(?:\.\d+)?(?:[eE][-+]?\d+)?      # 12, 2.5, 1e5
      | \.\d+                               # .5
    )
    (?P<pct>\s?%)?
    """,
    re.VERBOSE,
)
_FRAC_LATEX = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*)\}\s*\{\s*([^{}]*)\}")


def parse_number(token: str) -> Fraction | None:
    """Exact value of the *first* number in ``token`` (``"$1,234.50"``, ``"-3/4"``,
    ``"\\frac{3}{4}"``), or ``None``. Percent signs are dropped ("50%" -> 50): gold labels
    for percentage questions are almost always written without the sign."""
    token = _FRAC_LATEX.sub(r"\1/\2", token)
    for m in _NUM.finditer(token):
        value = _match_value(m)
        if value is not None:
            return value
    return None


def _match_value(m: re.Match[str]) -> Fraction | None:
    raw = m.group("num").replace(",", "").replace(" ", "")
    try:
        if "/" in raw:
            num, den = raw.split("/")
            if int(den) == 0:
                return None
            value = Fraction(int(num), int(den))
        else:
            value = Fraction(raw)  # exact: Fraction("2.5") == 5/2, no float rounding
    except (ValueError, ZeroDivisionError):
        return None
    if (m.group("sign") or "") in ("-", "\u2212") or m.group("sign2"):
        value = -value
    return value


def canonical_number(value: Fraction) -> str:
    """Canonical string of an exact number: integers as "5", terminating decimals as "2.5",
    other rationals as "1/3". Equal values always give equal strings."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    # A fraction terminates in base 10 iff its reduced denominator is 2^a * 5^b.
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = value * 10**places  # an integer by construction
    sign = "-" if scaled < 0 else ""
    digits = str(abs(scaled.numerator)).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def normalize_number(text: str) -> str | None:
    """Canonical form of the first number in ``text`` or ``None``."""
    value = parse_number(text)
    return None if value is None else canonical_number(value)


def _boxed_contents(text: str) -> list[str]:
    r"""Contents of every ``\boxed{...}`` / ``\fbox{...}``, matching nested braces
    (``\boxed{\frac{3}{4}}``), in order of appearance."""
    out: list[str] = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


# "The answer is 7", "Final answer: 7", "answer = 7", "Answer - 7"; case-insensitive.
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\s*:?|:|=|-(?=\s))\s*", re.IGNORECASE)


def _after_markers(text: str) -> list[list[str]]:
    """Candidate answer spans grouped by marker kind, highest priority first; within a kind,
    last occurrence first."""
    boxed = _boxed_contents(text)[::-1]
    hashes = [text[m.end() :] for m in re.finditer(r"####", text)][::-1]
    phrases = [text[m.end() :] for m in _ANSWER_PHRASE.finditer(text)][::-1]
    return [boxed, hashes, phrases]


@register_extractor("number")
@dataclass(frozen=True)
class NumberExtractor(Extractor):
    """Numeric answers, canonicalised exactly (via :class:`fractions.Fraction`).

    ``fallback_last_number``: with no usable marker, take the last number in the text (what
    a model without an answer format usually means). Set ``False`` to require a marker.
    """

    fallback_last_number: bool = True

    def extract(self, text: str) -> str | None:
        for spans in _after_markers(text):
            for span in spans:
                value = parse_number(span)
                if value is not None:
                    return canonical_number(value)
        if not self.fallback_last_number:
            return None
        text = _FRAC_LATEX.sub(r"\1/\2", text)
        for m in reversed(list(_NUM.finditer(text))):
            value = _match_value(m)
            if value is not None:
                return canonical_number(value)
        return None

    def normalize(self, answer: str) -> str | None:
        return normalize_number(answer)


# ---------------------------------------------------------------------------------------------
# yes / no


@register_extractor("yesno")
@dataclass(frozen=True)
class YesNoExtractor(Extractor):
    """Yes/no answers as ``"yes"``/``"no"``. Case-insensitive whole words ("Yes.", "no,",
    "YES"); "not"/"nobody" do not count.

    Priority: a marker ("the answer is no", "Answer: yes", ``\\boxed{yes}``), then the first
    word of the text (the usual "Yes, because ..." shape), then, if ``fallback_last``, the last
    yes/no word anywhere ("... so the answer must be yes").
    """

    yes_words: tuple[str, ...] = ("yes",)
    no_words: tuple[str, ...] = ("no",)
    fallback_last: bool = True
    _word: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        yes = {w.lower() for w in self.yes_words}
        no = {w.lower() for w in self.no_words}
        if not yes or not no or yes & no:
            raise ValueError("yes_words and no_words must be non-empty and disjoint")
        alts = "|".join(re.escape(w) for w in sorted(yes | no, key=len, reverse=True))
        object.__setattr__(self, "_word", re.compile(rf"\b({alts})\b", re.IGNORECASE))

    def _label(self, word: str) -> str:
        return "yes" if word.lower() in {w.lower() for w in self.yes_words} else "no"

    def extract(self, text: str) -> str | None:
        for spans in _after_markers(text):
            for span in spans:
                # the answer must come first after the marker, not somewhere later
                m = self._word.match(span.lstrip(" \t*_\"'(`"))
                if m:
                    return self._label(m.group(1))
        m = self._word.match(text.lstrip(" \t\n*_\"'(`"))
        if m:
            return self._label(m.group(1))
        if self.fallback_last:
            words = self._word.findall(text)
            if words:
                return self._label(words[-1])
        return None


# ---------------------------------------------------------------------------------------------
# multiple choice


@register_extractor("choice")
@dataclass(frozen=True)
class ChoiceExtractor(Extractor):
    """Multiple-choice letters (default A-E), upper-cased.

    Priority: a marker ("Answer: C", "the answer is (b)", ``\\boxed{B}``), then the last
    bracketed letter "(B)", then a text that *is* a letter ("B", "B.", "B)" at the start
    followed by punctuation or the end) - a bare capital "A" opening a sentence is not taken.
    """

    choices: str = "ABCDE"

    def __post_init__(self) -> None:
        letters = self.choices.upper()
        if not letters or not letters.isalpha() or len(set(letters)) != len(letters):
            raise ValueError(f"choices must be distinct letters, got {self.choices!r}")
        object.__setattr__(self, "choices", letters)

    def extract(self, text: str) -> str | None:
        up = f"[{self.choices}]"
        opt = f"[{self.choices}{self.choices.lower()}]"
        # After a marker: "(b)", "B", or a lower-case letter only when it stands alone
        # ("answer: c."), so "the answer is a car" is not read as choice A.
        after_marker = re.compile(
            rf"\s*(?:(?i:option|choice)\s+)?\**"
            rf"(?:[(\[]\s*({opt})\s*[)\]]|({up})\b|({opt})(?=\s*(?:[.,:;)!*]|$)))"
        )
        for spans in _after_markers(text):
            for span in spans:
                m = after_marker.match(span)
                if m:
                    return next(g for g in m.groups() if g).upper()
        found = re.findall(rf"[(\[]({opt})[)\]]", text)
        if found:
            return found[-1].upper()
        m = re.match(rf"\s*(?:option\s+|choice\s+)?([{self.choices}])\s*(?:[.:)]|$)", text)
        if m:
            return m.group(1)
        return None

    def normalize(self, answer: str) -> str | None:
        stripped = answer.strip().strip("()[]. ").upper()
        if len(stripped) == 1 and stripped in self.choices:
            return stripped
        return self.extract(answer)


# ---------------------------------------------------------------------------------------------
# custom


@dataclass(frozen=True)
class RegexExtractor(Extractor):
    """Answer = ``group`` of the last (or first) match of ``pattern``, stripped, then passed
    through ``post`` (e.g. ``str.lower``) so equivalent spellings vote together."""

    pattern: str
    group: int | str = 1
    flags: int = 0
    last: bool = True
    post: Callable[[str], str | None] | None = None
    _re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = re.compile(self.pattern, self.flags)
        if isinstance(self.group, int) and self.group > compiled.groups:
            raise ValueError(f"pattern {self.pattern!r} has no group {self.group}")
        object.__setattr__(self, "_re", compiled)

    def extract(self, text: str) -> str | None:
        matches = list(self._re.finditer(text))
        if not matches:
            return None
        value = (matches[-1] if self.last else matches[0]).group(self.group)
        if value is None:
            return None
        value = value.strip()
        if self.post is not None:
            return self.post(value)
        return value or None


@dataclass(frozen=True)
class CallableExtractor(Extractor):
    """Wrap a plain function ``text -> answer | None``; ``normalize`` applies the same
    function to the gold label unless ``normalize_fn`` is given."""

    fn: Callable[[str], str | None]
    normalize_fn: Callable[[str], str | None] | None = None

    def extract(self, text: str) -> str | None:
        return self.fn(text)

    def normalize(self, answer: str) -> str | None:
        return (self.normalize_fn or self.fn)(answer)


# ---------------------------------------------------------------------------------------------
# plain functions with the default settings, for callers that just want an answer


def extract_number(text: str) -> str | None:
    """:class:`NumberExtractor` with defaults: canonical number or ``None``."""
    return _DEFAULT_NUMBER(text)


def extract_yes_no(text: str) -> str | None:
    """:class:`YesNoExtractor` with defaults: ``"yes"``, ``"no"`` or ``None``."""
    return _DEFAULT_YES_NO(text)


def extract_choice(text: str) -> str | None:
    """:class:`ChoiceExtractor` with defaults (A-E): a letter or ``None``."""
    return _DEFAULT_CHOICE(text)


_DEFAULT_NUMBER = NumberExtractor()
_DEFAULT_YES_NO = YesNoExtractor()
_DEFAULT_CHOICE = ChoiceExtractor()
