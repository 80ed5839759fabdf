"""Reading a prediction out of the answer model's generated text (docs/method.md#evaluation).

Numeric tasks (gsm8k, svamp, arithmetic):
  simple   if the text has '=', keep what follows the last '='; drop commas; the first number.
  anchor   drop commas; a number right after "answer [is|=|:]" / "final answer" / "correct answer"
           (case-insensitive); else the number of the last '=' segment that holds one; else the
           first number.
  first_number  drop commas; the first number anywhere, ignoring '=' and labels (what a reader
           that answers with the number straight away is scored by; reported beside the two
           above, never instead of them).
  With `robust=True` (default) numbers may carry a decimal part ("2.5"), and "$", "\\boxed{" and
  the Unicode minus are ignored first; with `robust=False` the extractors are the reference's
  integer-only ones, character for character. Either way the prediction is then normalised by
  `normalize_number` ("27.0" -> "27", "1,234" -> "1234", "+5" -> "5").
MCQ tasks (arc, mmlu, aqua, mathqa):
  word_boundary  the first isolated letter A..<last> of the upper-cased text, then of the
                 lower-case letters (the reference's primary metric).
  legacy         the first character A-E anywhere in the upper-cased text: "The answer is B"
                 reads as "E" (from "THE"). Kept to compare with numbers published before the fix.
A method that finds nothing returns None (the reference's "[invalid]" / "X").

`mentions_answer(task, text, gold)` says whether a text (a CoT) states the gold answer as a
number or an isolated option letter, the per-eval "CoT contains the answer" rate.
"""

from __future__ import annotations

import decimal
import re
from typing import Optional

NUMERIC_METHODS = ("anchor", "simple", "first_number")
MCQ_METHODS = ("word_boundary", "legacy")
NUMERIC_TASKS = ("gsm8k", "svamp", "arithmetic")
MCQ_TASKS = {"arc": 4, "mmlu": 4, "aqua": 5, "mathqa": 5}  # reference letter ranges A-D / A-E

_INT = r"-?\d+"
_NUMBER = r"-?\d+(?:\.\d+)?"
_ANCHOR = r"(?i)(?:FINAL\s+ANSWER|CORRECT\s+ANSWER|ANSWER)\s*(?:IS|=|:)?\s*({num})"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize_number(text) -> Optional[str]:
  """A canonical decimal string for a number written in `text`, or None if it is not one number.

  Strips whitespace, `\\boxed{}`, `$`, backslashes, thousands separators, a trailing '.' or '%',
  a leading '+', and maps the Unicode minus: "$1,234.50" -> "1234.5", "27.0" -> "27", "-0" -> "0".
  """
  s = _BOXED.sub(r"\1", str(text).strip())
  s = s.replace("\u2212", "-").replace("$", "").replace("\\", "").replace(",", "")
  s = re.sub(r"\s+", "", s).rstrip(".%")
  if s.startswith("+"):
    s = s[1:]
  if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
    return None
  d = decimal.Decimal(s)
  if d == d.to_integral_value():
    return str(int(d))
  return format(d.normalize(), "f")


def _clean(text: str) -> str:
  return text.replace("\u2212", "-").replace("\\boxed{", " ").replace("$", " ")


def extract_numeric(text: str, method: str = "anchor", *, robust: bool = True) -> Optional[str]:
  """The predicted number in `text` by `method` (`NUMERIC_METHODS`), normalised, or None."""
  text = text or ""
  num = _NUMBER if robust else _INT
  if robust:
    text = _clean(text)
  if method == "simple":
    if "=" in text:
      text = text.split("=")[-1].strip()
    m = re.search(num, text.replace(",", "").strip())
    return normalize_number(m.group(0)) if m else None
  if method == "first_number":
    m = re.search(num, text.replace(",", ""))
    return normalize_number(m.group(0)) if m else None
  if method == "anchor":
    text = text.strip().replace(",", "")
    m = re.search(_ANCHOR.format(num=num), text)
    if m:
      return normalize_number(m.group(1))
    if "=" in text:
      last = None
      for segment in text.split("=")[1:]:
        m = re.search(num, segment)
        if m:
          last = m.group(0)
      if last is not None:
        return normalize_number(last)
    m = re.search(num, text)
    return normalize_number(m.group(0)) if m else None
  raise ValueError(
    f"unknown numeric extraction method {method!r}; choose one of {list(NUMERIC_METHODS)}"
  )


def extract_letter(text: str, method: str = "word_boundary", num_choices: int = 4) -> Optional[str]:
  """The predicted option letter in `text` by `method`, or None.

  num_choices: how many options the item has (letters A.. up to the last one); `legacy` ignores
  it and always reads A-E, as the reference did.
  """
  text = text or ""
  if not 1 <= num_choices <= 26:
    raise ValueError(f"num_choices must be in [1, 26], got {num_choices}")
  if method == "word_boundary":
    last = chr(ord("A") + num_choices - 1)
    m = re.search(rf"\b([A-{last}])\b", text.upper())
    if m:
      return m.group(1)
    m = re.search(rf"\b([a-{last.lower()}])\b", text)
    return m.group(1).upper() if m else None
  if method == "legacy":
    m = re.search(r"[A-E]", text.upper())
    return m.group(0) if m else None
  raise ValueError(f"unknown MCQ extraction method {method!r}; choose one of {list(MCQ_METHODS)}")


def methods(task: str) -> tuple:
  """The extraction methods reported for `task`, primary first."""
  if task in NUMERIC_TASKS:
    return NUMERIC_METHODS
  if task in MCQ_TASKS:
    return MCQ_METHODS
  raise ValueError(
    f"task {task!r} has no answer extraction (known: "
    f"{list(NUMERIC_TASKS) + list(MCQ_TASKS)}; wiki_continuation is scored by "
    "log-probability)"
  )


def extract_all(
  task: str, text: str, num_choices: Optional[int] = None, *, robust: bool = True
) -> dict:
  """Every method's prediction side by side: {method: prediction or None}, primary method first.

  num_choices: for MCQ items with a non-standard number of options (a few ARC items have 3 or 5),
  pass `len(example.choices)`; defaults to the task's reference range.
  """
  if task in NUMERIC_TASKS:
    return {m: extract_numeric(text, m, robust=robust) for m in NUMERIC_METHODS}
  if task in MCQ_TASKS:
    n = num_choices or MCQ_TASKS[task]
    return {m: extract_letter(text, m, n) for m in MCQ_METHODS}
  methods(task)  # raises the explanatory error
  return {}


def mentions_answer(task: str, text: str, gold: str) -> bool:
  """Whether `text` states the gold answer: numeric tasks, any number in it equal to `gold` by
  value ("1,234" and "1234.0" count, "12345" does not hold "234"); MCQ tasks, the gold letter as
  an isolated capital ("(B)", "B." but not the B of "Because").

  Stricter than the training tag answer/cot_contains_answer (the reference's substring test,
  for which "17" holds "7" and any "A" counts for option A).
  """
  text = text or ""
  if task in NUMERIC_TASKS:
    target = normalize_number(gold)
    if target is None:
      raise ValueError(f"gold answer {gold!r} of task {task!r} is not a number")
    # Thousands separators only between digit groups, so "3, 4" stays two numbers.
    flat = re.sub(r"(?<=\d),(?=\d{3}\b)", "", _clean(text))
    return any(
      normalize_number(m) is not None
      and decimal.Decimal(normalize_number(m)) == decimal.Decimal(target)
      for m in re.findall(r"(?<![\d.])" + _NUMBER, flat)
    )
  if task in MCQ_TASKS:
    letter = re.escape(gold.strip().upper())
    return re.search(rf"(?<![A-Za-z]){letter}(?![A-Za-z])", text) is not None
  methods(task)
  return False


def is_correct(pred: Optional[str], gold: str, task: str) -> bool:
  """Whether an extracted prediction matches the gold answer (numbers compared by value)."""
  if pred is None:
    return False
  if task in NUMERIC_TASKS:
    p, g = normalize_number(pred), normalize_number(gold)
    if g is None:
      raise ValueError(f"gold answer {gold!r} of task {task!r} is not a number")
    return p is not None and decimal.Decimal(p) == decimal.Decimal(g)
  if task in MCQ_TASKS:
    return pred.strip().upper() == gold.strip().upper()
  methods(task)
  return False
