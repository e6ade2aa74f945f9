"""Answer extractors: numbers, yes/no, multiple choice, custom regex/callable."""

from __future__ import annotations

import re
import subprocess
import sys
from fractions import Fraction

import pytest

from natix.scaling.extract import (
    CallableExtractor,
    ChoiceExtractor,
    NumberExtractor,
    RegexExtractor,
    YesNoExtractor,
    available_extractors,
    canonical_number,
    extract_choice,
    extract_number,
    extract_yes_no,
    get_extractor,
    normalize_number,
    parse_number,
)

num = NumberExtractor()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,234", "1234"),
        ("The total is 1,234,567 apples", "1234567"),
        ("$5.00", "5"),
        ("It costs $1,234.50.", "1234.5"),
        ("\u20ac12", "12"),
        ("3/4", "0.75"),
        ("1/3", "1/3"),
        ("-2/6", "-1/3"),
        ("10/2", "5"),
        ("-2.5", "-2.5"),
        ("x = -$3.50", "-3.5"),
        ("$-3", "-3"),
        ("\u22124", "-4"),  # unicode minus
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("5.", "5"),
        ("007", "7"),
        ("1e3", "1000"),
        ("50%", "50"),
        ("#### 10", "10"),
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("\\boxed{12}", "12"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{\\dfrac{10}{4}}", "2.5"),
        ("The answer is 7.", "7"),
        ("The answer is: $1,234.", "1234"),
        ("Final answer: -12", "-12"),
        ("12 + 5 = 17. 17 - 3 = 14. The answer is 14.", "14"),
        ("12 - 3 = 9", "9"),  # a spaced minus is an operator, not a sign
        ("pages 3-4", "4"),
        ("1,2,3", "3"),  # not a thousands group
        ("I computed 5 then 6", "6"),  # fallback: last number
    ],
)
def test_number_extraction(text: str, expected: str) -> None:
    assert num(text) == expected


@pytest.mark.parametrize("text", ["", "no number here", "the answer is unknown", "x.y"])
def test_number_no_answer(text: str) -> None:
    assert num(text) is None


def test_equivalent_numbers_vote_together() -> None:
    forms = ["5", "5.0", "$5.00", "10/2", "The answer is 5.", "#### 5", "\\boxed{5}", "5.000"]
    assert {num(f) for f in forms} == {"5"}


def test_markers_beat_last_number() -> None:
    # The explicit marker wins even though other numbers come after it.
    assert num("#### 42\nchecked with 7 steps and 3 tries") == "42"
    assert num("\\boxed{8} (because 2 * 4 = 8, not 9)") == "8"
    # \boxed beats "the answer is", #### beats "the answer is"
    assert num("The answer is 3. Correction: \\boxed{4}") == "4"
    assert num("The answer is 3.\n#### 5") == "5"
    # within a kind the last occurrence wins (the model corrected itself)
    assert num("The answer is 3. Wait, the answer is 4.") == "4"
    # a marker without a number falls back to the last number, unless told not to
    assert num("7 + 1 = 8. The answer is eight") == "8"
    assert NumberExtractor(fallback_last_number=False)("7 + 1 = 8. The answer is eight") is None
    assert NumberExtractor(fallback_last_number=False)("blah. The answer is 8") == "8"


def test_nested_boxed_braces() -> None:
    assert num("\\boxed{{12}}") == "12"
    assert num("\\boxed{12") == "12"  # unclosed box: falls back to last number


def test_canonical_number_exact() -> None:
    assert canonical_number(Fraction(1, 8)) == "0.125"
    assert canonical_number(Fraction(-1, 20)) == "-0.05"
    assert canonical_number(Fraction(7, 6)) == "7/6"
    assert canonical_number(Fraction(100)) == "100"
    assert parse_number("0.1") == Fraction(1, 10)  # exact, not float 0.1
    assert normalize_number("  $1,000.00 ") == "1000"
    assert num.normalize("5.0") == "5" and num.normalize("n/a") is None


yn = YesNoExtractor()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", "yes"),
        ("no,", "no"),
        ("YES", "yes"),
        ("No", "no"),
        ("  **Yes** - the lane is closed", "yes"),
        ("The answer is no.", "no"),
        ("Answer: YES", "yes"),
        ("\\boxed{no}", "no"),
        ("Looking at the sign, I think yes", "yes"),
        ("Yes, there is no detour.", "yes"),  # leading word wins over a later "no"
        ("There is no cone, so the answer is yes", "yes"),  # marker wins
    ],
)
def test_yes_no(text: str, expected: str) -> None:
    assert yn(text) == expected


@pytest.mark.parametrize("text", ["", "Nothing to see", "not sure", "maybe", "Yesterday"])
def test_yes_no_none(text: str) -> None:
    assert yn(text) is None


def test_yes_no_options() -> None:
    tf = YesNoExtractor(yes_words=("yes", "true"), no_words=("no", "false"))
    assert tf("True.") == "yes" and tf("false") == "no"
    assert YesNoExtractor(fallback_last=False)("I think yes") is None
    with pytest.raises(ValueError):
        YesNoExtractor(yes_words=("yes",), no_words=("YES",))
    assert yn.normalize("Yes") == "yes"


ch = ChoiceExtractor()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(B)", "B"),
        ("Answer: C", "C"),
        ("answer: c.", "C"),
        ("The answer is (d) because ...", "D"),
        ("The correct answer is **B**.", "B"),
        ("\\boxed{E}", "E"),
        ("Between (A) and (C), I pick (C)", "C"),
        ("B.", "B"),
        ("D) 42", "D"),
        ("A", "A"),
        ("The answer is option B", "B"),
    ],
)
def test_choice(text: str, expected: str) -> None:
    assert ch(text) == expected


@pytest.mark.parametrize(
    "text", ["", "A car is parked", "the answer is a car", "I think it is (F)", "Answer: none"]
)
def test_choice_none(text: str) -> None:
    assert ch(text) is None


def test_choice_custom_letters_and_normalize() -> None:
    four = ChoiceExtractor("abcd")
    assert four.choices == "ABCD" and four("(E)") is None and four("(d)") == "D"
    assert ch.normalize("(b)") == "B" and ch.normalize("C.") == "C"
    with pytest.raises(ValueError):
        ChoiceExtractor("AA")


def test_regex_and_callable() -> None:
    rx = RegexExtractor(r"City:\s*(\w+)", post=str.lower)
    assert rx("City: Paris ... City: Lyon") == "lyon"
    assert RegexExtractor(r"City:\s*(\w+)", last=False)("City: Paris City: Lyon") == "Paris"
    assert rx("no city") is None
    assert RegexExtractor(r"(?P<x>\d+)", group="x")("a 12") == "12"
    with pytest.raises(ValueError):
        RegexExtractor(r"\d+", group=1)
    with pytest.raises(re.error):
        RegexExtractor(r"(")
    assert get_extractor("regex:v=(\\d+)")("v=3") == "3"
    up = CallableExtractor(lambda t: t.strip().upper() or None)
    assert up(" x ") == "X" and up.normalize("y") == "Y" and up("  ") is None


def test_get_extractor() -> None:
    assert {"number", "yesno", "choice"} <= set(available_extractors())
    assert isinstance(get_extractor("yesno"), YesNoExtractor)
    fn = lambda t: "k"  # noqa: E731
    assert get_extractor(fn) is fn
    with pytest.raises(ValueError, match="unknown extractor"):
        get_extractor("nope")
    with pytest.raises(TypeError):
        get_extractor(3)  # type: ignore[arg-type]


def test_import_is_light() -> None:
    code = "import sys, natix.scaling; bad = {'torch', 'transformers', 'numpy'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plain_functions() -> None:
    assert extract_number("12 + 5 = 17. The answer is 17.") == "17"
    assert extract_yes_no("No.") == "no"
    assert extract_choice("Answer: (c)") == "C"
    assert extract_number("none") is extract_yes_no("maybe") is extract_choice("") is None
