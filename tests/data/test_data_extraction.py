"""Answer extraction on realistic answer-model outputs (docs/method.md#evaluation); expected values
worked out by hand."""

import pytest

from markovian_jax.data import (
  extract_all,
  extract_letter,
  extract_numeric,
  is_correct,
  normalize_number,
)
from markovian_jax.data.extraction import mentions_answer


@pytest.mark.parametrize(
  "raw, expected",
  [
    ("18", "18"),
    ("27.0", "27"),
    ("1,234", "1234"),
    ("$1,234.50", "1234.5"),
    ("-0", "0"),
    ("\\boxed{42}", "42"),
    ("+5", "5"),
    ("\u22127", "-7"),
    (" 3.140 ", "3.14"),
    ("18.", "18"),
    ("50%", "50"),
    ("2125", "2125"),
    ("abc", None),
    ("1 2", "12"),
    ("", None),
    ("1.2.3", None),
  ],
)
def test_normalize_number(raw, expected):
  assert normalize_number(raw) == expected


# (generated answer text, simple, anchor, first_number), as the reader writes it after
# " Answer: ".
NUMERIC_CASES = [
  ("18\n\nThe farmer makes $18 per day.", "18", "18", "18"),
  ("9 * 2 = 18 dollars. Final answer: 18", "18", "18", "9"),
  ("16 - 3 - 4 = 9, 9 * 2 = 18", "18", "18", "16"),
  ("The answer is 1,234 apples", "1234", "1234", "1234"),
  ("-5 degrees, since 3 - 8 = -5", "-5", "-5", "-5"),
  ("x = 12 and then 4 more, answer is 16", "12", "16", "12"),  # anchor prefers the label
  ("2.5 hours", "2.5", "2.5", "2.5"),
  ("$1,200.00 in total", "1200", "1200", "1200"),
  ("\\boxed{72}", "72", "72", "72"),
  ("no idea", None, None, None),
  ("", None, None, None),
]


@pytest.mark.parametrize("text, simple, anchor, first", NUMERIC_CASES)
def test_numeric_extractors(text, simple, anchor, first):
  assert extract_numeric(text, "simple") == simple
  assert extract_numeric(text, "anchor") == anchor
  assert extract_numeric(text, "first_number") == first
  assert extract_all("gsm8k", text) == {"anchor": anchor, "simple": simple, "first_number": first}


def test_first_number_reference_mode_is_integer_only():
  assert extract_numeric("2.5 hours, so 3", "first_number", robust=False) == "2"
  assert extract_numeric("costs $1,200 = 2 * 600", "first_number") == "1200"


@pytest.mark.parametrize(
  "task, text, gold, expected",
  [
    ("gsm8k", "so 1,234 apples in all", "1234", True),
    ("gsm8k", "7.0 is what we get", "7", True),
    ("gsm8k", "17 cats", "7", False),  # the training tag's substring test would say True
    ("gsm8k", "12345", "234", False),
    ("gsm8k", "it drops to -5 degrees", "-5", True),
    ("gsm8k", "3, 4 and 5", "4", True),
    ("svamp", "no numbers here", "3", False),
    ("arc", "I think (B) is right", "B", True),
    ("arc", "Because of the heat", "B", False),
    ("mmlu", "B. Paris", "B", True),
  ],
)
def test_mentions_answer(task, text, gold, expected):
  assert mentions_answer(task, text, gold) is expected


def test_reference_exact_mode_is_integer_only():
  # The reference's regexes are `-?\d+`: "2.5" reads as 2, and "$" blocks the anchor label.
  assert extract_numeric("2.5 hours", "simple", robust=False) == "2"
  assert extract_numeric("The answer is $12 and 3 = 3", "anchor", robust=False) == "3"
  assert extract_numeric("The answer is $12 and 3 = 3", "anchor") == "12"
  assert extract_numeric("27.0", "anchor", robust=False) == "27"
  assert extract_numeric("a = 1, b = 2 so", "simple", robust=False) == "2"
  # anchor's second rule: the LAST '=' segment holding a number.
  assert extract_numeric("a = 1 + b = 7 then", "anchor", robust=False) == "7"


def test_mcq_word_boundary_vs_legacy():
  text = "The answer is B"
  assert extract_letter(text, "word_boundary") == "B"
  assert extract_letter(text, "legacy") == "E"  # the 'E' of "THE": the reference's old bug
  assert extract_all("mmlu", text) == {"word_boundary": "B", "legacy": "E"}
  assert extract_all("arc", " C. Planetary days will become shorter.") == {
    "word_boundary": "C",
    "legacy": "C",
  }
  # E is outside A-D for 4-choice tasks, inside for AQuA/MathQA and 5-choice ARC items.
  assert extract_letter("E) none of these", "word_boundary", 4) is None
  assert extract_all("aqua", "E) none of these") == {"word_boundary": "E", "legacy": "E"}
  assert extract_all("arc", "(E) moss", num_choices=5)["word_boundary"] == "E"
  assert extract_letter("b", "word_boundary") == "B"
  assert extract_letter("xyz", "word_boundary") is None and extract_letter("xyz", "legacy") is None
  # Upper-casing makes the article "a" a letter, as in the reference.
  assert extract_letter("it is a D", "word_boundary") == "A"


def test_is_correct():
  assert is_correct("18", "18", "gsm8k")
  assert is_correct("27", "27.0", "svamp") and is_correct("2.50", "2.5", "svamp")
  assert is_correct("1234", "1,234", "gsm8k")
  assert not is_correct("-18", "18", "gsm8k") and not is_correct(None, "18", "gsm8k")
  assert is_correct("b", "B", "arc") and not is_correct("A", "B", "mmlu")
  with pytest.raises(ValueError, match="not a number"):
    is_correct("1", "abc", "gsm8k")
  with pytest.raises(ValueError, match="log-probability"):
    is_correct("x", "y", "wiki_continuation")


def test_bad_methods():
  with pytest.raises(ValueError, match="unknown numeric extraction method 'regex'"):
    extract_numeric("1", "regex")
  with pytest.raises(ValueError, match="unknown MCQ extraction method"):
    extract_letter("A", "anchor")
