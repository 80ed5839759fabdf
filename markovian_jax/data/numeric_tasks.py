"""Numeric-answer tasks: GSM8K, SVAMP and the synthetic arithmetic sums.

Gold answers are normalised numbers ("27.0" -> "27", "1,234" -> "1234"), so the reward scores the
same string that a correct prediction normalises to.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import numpy as np

from markovian_jax.data import records
from markovian_jax.data.extraction import normalize_number
from markovian_jax.data.records import DataError, Example


def _gold_number(raw, where: str) -> str:
  if not str(raw).strip():
    raise DataError(f"{where}: empty final answer (nothing after '####' / in the answer field)")
  gold = normalize_number(raw)
  if gold is None:
    raise DataError(f"{where}: answer {raw!r} is not a number")
  return gold


def _local_file(path: str, names: dict, split: str, task: str) -> str:
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such file or directory ({task} data)")
  if split not in names:
    raise DataError(f"{task}: unknown split {split!r}; local files have {sorted(names)}")
  return records.first_existing(path, names[split], f"{task} {split} split")


# GSM8K: openai/grade-school-math `grade_school_math/data/{train,test}.jsonl`;
# hub openai/gsm8k (main).
GSM8K_FILES = {"train": ("train.jsonl",), "test": ("test.jsonl",)}


def load_gsm8k(split: str, path: Optional[str] = None) -> list[Example]:
  """GSM8K. Splits: train (7,473) / test (1,319); the gold is the text after '####'."""
  if path is None:
    if split not in GSM8K_FILES:
      raise DataError(f"gsm8k: unknown split {split!r}; choose one of {sorted(GSM8K_FILES)}")
    rows = records.hub_rows("openai/gsm8k", "main", split)
  else:
    rows = records.read_jsonl(_local_file(path, GSM8K_FILES, split, "gsm8k"))
  out = []
  for i, (where, row) in enumerate(rows):
    question = records.field(row, "question", where)
    solution = records.field(row, "answer", where)
    if "####" not in solution:
      raise DataError(f"{where}: GSM8K answer has no '####' final-answer marker: {solution!r:.80}")
    gold = _gold_number(solution.split("####", 1)[1], where)
    out.append(Example(question=question, answer=gold, id=f"gsm8k/{split}/{i}"))
  return out


# SVAMP: arkilpatel/SVAMP `SVAMP.json` (1,000 items, no split);
# hub ChilleD/SVAMP (train 700 / test 300).
SVAMP_FILES = ("SVAMP.json",)
SVAMP_TEST_SIZE = 300


def _svamp_example(row, where: str, split: str, i: int) -> Example:
  body = records.field(row, "Body", where)
  question = records.field(row, "Question", where)
  answer = records.field(row, "Answer", where, (int, float, str))
  item_id = row.get("ID") if isinstance(row.get("ID"), str) else f"svamp/{split}/{i}"
  # The reference showed only Body (docs/reference-differences.md#svamp-question).
  return Example(
    question=f"{body.strip()} {question.strip()}", answer=_gold_number(answer, where), id=item_id
  )


def _svamp_test_ids(ids) -> set:
  """The local file's held-out 300: the items whose hashed IDs rank lowest (file-order free)."""
  ranked = sorted(ids, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
  return set(ranked[:SVAMP_TEST_SIZE])


def load_svamp(split: str, path: Optional[str] = None) -> list[Example]:
  """SVAMP; question = Body + " " + Question, answer normalised (51.0 -> "51").

  Hub (ChilleD/SVAMP): train 700 / test 300, plus "all" = both. Local SVAMP.json has no split:
  "all" = the 1,000 items (what the SVAMP paper evaluates); "train"/"test" = a fixed 700/300
  partition by hashed item ID (deterministic, but NOT ChilleD's partition).
  """
  if split not in ("train", "test", "all"):
    raise DataError(f"svamp: unknown split {split!r}; choose one of ['all', 'test', 'train']")
  if path is None:
    splits = ("train", "test") if split == "all" else (split,)
    out = []
    for s in splits:
      for i, (where, row) in enumerate(records.hub_rows("ChilleD/SVAMP", None, s)):
        out.append(_svamp_example(row, where, s, i))
    return out
  file = path if os.path.isfile(path) else records.first_existing(path, SVAMP_FILES, "svamp")
  examples = [
    _svamp_example(row, where, "all", i)
    for i, (where, row) in enumerate(records.read_json_records(file))
  ]
  if split == "all":
    return examples
  ids = [e.id for e in examples]
  if len(set(ids)) != len(ids):
    raise DataError(
      f"{file}: SVAMP item IDs are not unique, so no train/test partition can be "
      "derived; use split='all'"
    )
  test_ids = _svamp_test_ids(ids)
  return [e for e in examples if (e.id in test_ids) == (split == "test")]


# Arithmetic: generated. Each split draws from its own seeded stream, so train and test differ.
ARITHMETIC_SPLITS = {"train": 0, "validation": 1, "test": 2}
ARITHMETIC_DEFAULT_SIZE = {"train": 100_000, "validation": 200, "test": 200}


def load_arithmetic(
  split: str,
  path: Optional[str] = None,
  *,
  num_terms: int = 15,
  min_value: int = 1,
  max_value: int = 99,
  num_examples: Optional[int] = None,
  seed: int = 0,
) -> list[Example]:
  """Sums of `num_terms` integers uniform in [min_value, max_value], joined by " + ".

  The reference: 15 terms in [1, 99]; 200 test problems. Default sizes: train 100,000 /
  validation 200 / test 200.
  """
  if path:
    raise DataError(f"arithmetic is generated from a seed and reads no files (got path={path!r})")
  if split not in ARITHMETIC_SPLITS:
    raise DataError(
      f"arithmetic: unknown split {split!r}; choose one of {sorted(ARITHMETIC_SPLITS)}"
    )
  if num_terms < 1 or min_value > max_value:
    raise DataError(
      f"arithmetic: need num_terms >= 1 and min_value <= max_value, got "
      f"num_terms={num_terms}, range [{min_value}, {max_value}]"
    )
  n = ARITHMETIC_DEFAULT_SIZE[split] if num_examples is None else int(num_examples)
  rng = np.random.default_rng([seed, ARITHMETIC_SPLITS[split]])
  terms = rng.integers(min_value, max_value, size=(n, num_terms), endpoint=True)
  return [
    Example(
      question=" + ".join(map(str, row)), answer=str(sum(row)), id=f"arithmetic/{split}/{seed}/{i}"
    )
    for i, row in enumerate(terms.tolist())
  ]
