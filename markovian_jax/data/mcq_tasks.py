"""Multiple-choice tasks: ARC, MMLU, AQuA-RAT, MathQA.

Every item becomes `"{question}\\n\\nChoices:\\nA. ...\\nB. ..."` (the reference's format) with the
gold letter as the answer and the option texts in `Example.choices`.
"""

from __future__ import annotations

import ast
import glob
import os
import re
import string
from typing import Optional, Sequence

from markovian_jax.data import records
from markovian_jax.data.records import DataError, Example

LETTERS = string.ascii_uppercase


def format_mcq(question: str, choices: Sequence[str]) -> str:
  lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
  return f"{question}\n\nChoices:\n" + "\n".join(lines)


def _mcq(question: str, choices: Sequence[str], letter: str, where: str, item_id: str) -> Example:
  if not choices:
    raise DataError(f"{where}: item has no answer options")
  if letter not in LETTERS[: len(choices)]:
    raise DataError(
      f"{where}: gold answer {letter!r} is not one of the {len(choices)} options "
      f"{list(LETTERS[: len(choices)])}"
    )
  return Example(
    question=format_mcq(question, choices), answer=letter, choices=tuple(choices), id=item_id
  )


def _check_split(task: str, split: str, splits) -> None:
  if split not in splits:
    raise DataError(f"{task}: unknown split {split!r}; choose one of {sorted(splits)}")


# ----------------------------------------------------------------------------------------------
# ARC: AI2's ARC-V1-Feb2018 `ARC-{Challenge,Easy}/ARC-*-{Train,Dev,Test}.jsonl`;
# hub allenai/ai2_arc.
ARC_SUBSETS = ("ARC-Challenge", "ARC-Easy")
ARC_FILE_SPLIT = {"train": "Train", "validation": "Dev", "test": "Test"}


def _arc_subset(subset: str) -> str:
  for s in ARC_SUBSETS:
    if subset.lower() in (s.lower(), s.lower()[4:]):
      return s
  raise DataError(
    f"arc: unknown subset {subset!r}; choose one of {list(ARC_SUBSETS)} (or 'challenge' / 'easy')"
  )


def _arc_letter(label: str, labels: Sequence[str], where: str) -> str:
  """Maps a label to its letter by position: a few items are labelled 1-4 instead of A-D, which
  the reference dropped; we keep them."""
  if label not in labels:
    raise DataError(f"{where}: answerKey {label!r} is not among the choice labels {list(labels)}")
  return LETTERS[list(labels).index(label)]


def _arc_example(row, where: str, item_id: str) -> Example:
  question = records.field(row, "question", where, (str, dict))
  if isinstance(question, dict):  # the original release nests stem + choices
    stem = records.field(question, "stem", where)
    raw = records.field(question, "choices", where, list)
    labels = [records.field(c, "label", where) for c in raw]
    texts = [records.field(c, "text", where) for c in raw]
  else:  # the hub flattens them: choices = {"text": [...], "label": [...]}
    stem = question
    choices = records.field(row, "choices", where, dict)
    labels = records.field(choices, "label", where, list)
    texts = records.field(choices, "text", where, list)
  expected = [LETTERS[: len(labels)], [str(i + 1) for i in range(len(labels))]]
  if list(labels) not in [list(e) for e in expected]:
    raise DataError(f"{where}: choice labels {labels} are neither A, B, ... nor 1, 2, ...")
  letter = _arc_letter(records.field(row, "answerKey", where), labels, where)
  return _mcq(stem, [t.strip() for t in texts], letter, where, item_id)


def load_arc(
  split: str, path: Optional[str] = None, *, subset: str = "ARC-Challenge"
) -> list[Example]:
  """ARC. Splits: train / validation (the release's Dev) / test. Challenge: 1,119 / 299 / 1,172;
  Easy: 2,251 / 570 / 2,376. `path`: the release's directory (holding ARC-Challenge/ and
  ARC-Easy/), one subset's directory, or one .jsonl file."""
  subset = _arc_subset(subset)
  _check_split("arc", split, ARC_FILE_SPLIT)
  if path is None:
    rows = records.hub_rows("allenai/ai2_arc", subset, split)
  elif os.path.isfile(path):
    rows = records.read_jsonl(path)
  else:
    name = f"{subset}-{ARC_FILE_SPLIT[split]}.jsonl"
    candidates = [os.path.join(path, subset, name), os.path.join(path, name)]
    file = next((c for c in candidates if os.path.isfile(c)), None)
    if file is None:
      raise FileNotFoundError(f"{path}: found neither {subset}/{name} nor {name} (arc {split})")
    rows = records.read_jsonl(file)
  out = []
  for i, (where, row) in enumerate(rows):
    item_id = row.get("id") if isinstance(row, dict) and isinstance(row.get("id"), str) else None
    out.append(_arc_example(row, where, item_id or f"arc/{subset}/{split}/{i}"))
  return out


# ----------------------------------------------------------------------------------------------
# MMLU: hendrycks/test `data/{dev,val,test}/<subject>_<split>.csv` (no header:
# question,A,B,C,D,answer); hub cais/mmlu "all" (splits auxiliary_train, dev, validation, test).
MMLU_DIRS = {"dev": "dev", "validation": "val", "test": "test"}
MMLU_HUB_SPLITS = ("auxiliary_train", "dev", "validation", "test")
MMLU_TRAIN_SPLITS = ("dev", "validation")


def _mmlu_local(split: str, path: str, subject: Optional[str]) -> list[Example]:
  if os.path.isfile(path):
    files = [path]
  else:
    directory = os.path.join(path, MMLU_DIRS[split])
    if not os.path.isdir(directory):
      raise FileNotFoundError(
        f"{directory}: MMLU {split} directory not found "
        f"(expected <subject>_{MMLU_DIRS[split]}.csv files)"
      )
    pattern = f"{subject or '*'}_{MMLU_DIRS[split]}.csv"
    files = sorted(glob.glob(os.path.join(directory, pattern)))
    if not files:
      raise FileNotFoundError(f"{directory}: no {pattern} files")
  suffix = f"_{MMLU_DIRS[split]}.csv"
  out = []
  for file in files:
    name = os.path.basename(file)
    subj = name[: -len(suffix)] if name.endswith(suffix) else os.path.splitext(name)[0]
    for i, (where, row) in enumerate(records.read_csv_rows(file)):
      if len(row) != 6:
        raise DataError(f"{where}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
      letter = row[5].strip()
      out.append(_mcq(row[0], row[1:5], letter, where, f"mmlu/{subj}/{split}/{i}"))
  return out


def _mmlu_hub(split: str, subject: Optional[str]) -> list[Example]:
  out = []
  for i, (where, row) in enumerate(records.hub_rows("cais/mmlu", "all", split)):
    subj = records.field(row, "subject", where)
    if subject is not None and subj != subject:
      continue
    choices = records.field(row, "choices", where, list)
    answer = records.field(row, "answer", where, int)
    if not 0 <= answer < len(choices):
      raise DataError(f"{where}: answer index {answer} out of range for {len(choices)} choices")
    out.append(
      _mcq(
        records.field(row, "question", where),
        choices,
        LETTERS[answer],
        where,
        f"mmlu/{subj or 'auxiliary'}/{split}/{i}",
      )
    )
  return out


def load_mmlu(
  split: str,
  path: Optional[str] = None,
  *,
  subject: Optional[str] = None,
  train_splits: Sequence[str] = MMLU_TRAIN_SPLITS,
) -> list[Example]:
  """MMLU (57 subjects, or one `subject`). Splits: dev (5 per subject), validation, test, and
  train = the concatenation of `train_splits` (default dev + validation; add "auxiliary_train"
  on the hub). Report on test; the reference trained and reported on validation.

  Choice texts are kept verbatim (the reference does not strip them)."""
  if split == "train":
    bad = [s for s in train_splits if s not in MMLU_HUB_SPLITS or s == "test"]
    if bad or not train_splits:
      raise DataError(
        f"mmlu: train_splits {list(train_splits)} must be a non-empty subset of "
        f"{[s for s in MMLU_HUB_SPLITS if s != 'test']}"
      )
    return [e for s in train_splits for e in load_mmlu(s, path, subject=subject)]
  _check_split("mmlu", split, ("train",) + MMLU_HUB_SPLITS)
  if path is None:
    return _mmlu_hub(split, subject)
  if split == "auxiliary_train" and not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path}: MMLU auxiliary_train is not part of the local release; "
      "load it from the hub (path=None) or pass the CSV file itself"
    )
  return _mmlu_local(split, path, subject)


# ----------------------------------------------------------------------------------------------
# AQuA-RAT: google-deepmind/AQuA `{train,dev,test}.json` (JSONL despite the name); hub
# deepmind/aqua_rat "raw".
AQUA_FILES = {"train": ("train.json",), "validation": ("dev.json",), "test": ("test.json",)}
_OPTION_PREFIX = re.compile(r"^[A-E][\)\.\:]\s*")


def load_aqua(split: str, path: Optional[str] = None) -> list[Example]:
  """AQuA-RAT. Splits: train (97,467; hub only in practice) / validation (dev, 254) / test (254).
  Options "A)125" lose their label prefix and are relabelled "A. 125"."""
  _check_split("aqua", split, AQUA_FILES)
  if path is None:
    rows = records.hub_rows("deepmind/aqua_rat", "raw", split)
  elif os.path.isfile(path):
    rows = records.read_json_records(path)
  else:
    rows = records.read_json_records(
      records.first_existing(path, AQUA_FILES[split], f"aqua {split}")
    )
  out = []
  for i, (where, row) in enumerate(rows):
    options = records.field(row, "options", where, list)
    choices = [_OPTION_PREFIX.sub("", str(o).strip()) for o in options]
    letter = records.field(row, "correct", where).strip()
    out.append(
      _mcq(records.field(row, "question", where), choices, letter, where, f"aqua/{split}/{i}")
    )
  return out


# ----------------------------------------------------------------------------------------------
# MathQA: the release's {train,dev,test}.json (JSON arrays: Problem, options, correct, ...) or the
# math-evaluation-harness subset test.jsonl (problem, options, correct); hub allenai/math_qa.
MATHQA_FILES = {
  "train": ("train.json", "train.jsonl"),
  "validation": ("dev.json", "dev.jsonl", "validation.jsonl"),
  "test": ("test.json", "test.jsonl"),
}
_MATHQA_OPTION = re.compile(r"([a-e])\s*\)\s*(.*?)\s*(?=,\s*[a-e]\s*\)|$)")
_MATHQA_ITEM = re.compile(r"^\s*([a-e])\s*\)\s*(.*?)\s*$")


def parse_mathqa_options(options: str, where: str) -> list[str]:
  """ "a ) 12 , b ) 16 , ..." (or the list form "['a ) 12', ...]") -> ["12", "16", ...].

  The reference's parser expected "a)" without the space and split on every comma, which breaks
  on this data ("a ) 1,600"); we split only before the next label."""
  text = options.strip()
  if text.startswith("["):
    try:
      items = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
      raise DataError(f"{where}: unreadable MathQA options list {options!r:.80} ({e})") from None
    pairs = [_MATHQA_ITEM.match(str(item)) for item in items]
    if not all(pairs):
      raise DataError(f"{where}: MathQA options {options!r:.80} are not all 'x ) text'")
    pairs = [m.groups() for m in pairs]
  else:
    pairs = _MATHQA_OPTION.findall(text)
  letters = [p[0] for p in pairs]
  if not pairs or letters != list("abcde"[: len(letters)]):
    raise DataError(f"{where}: cannot parse MathQA options {options!r:.100} (labels {letters})")
  return [p[1] for p in pairs]


def load_mathqa(split: str, path: Optional[str] = None) -> list[Example]:
  """MathQA. Hub splits: train 29,837 / validation 4,475 / test 2,985. The local copy here is the
  harness's 1,000-item test subset."""
  _check_split("mathqa", split, MATHQA_FILES)
  if path is None:
    rows = records.hub_rows("allenai/math_qa", None, split)
  elif os.path.isfile(path):
    rows = records.read_json_records(path)
  else:
    rows = records.read_json_records(
      records.first_existing(path, MATHQA_FILES[split], f"mathqa {split}")
    )
  out = []
  for i, (where, row) in enumerate(rows):
    key = "Problem" if isinstance(row, dict) and "Problem" in row else "problem"
    problem = records.field(row, key, where)
    choices = parse_mathqa_options(records.field(row, "options", where), where)
    letter = records.field(row, "correct", where).strip().upper()
    out.append(_mcq(problem, choices, letter, where, f"mathqa/{split}/{i}"))
  return out
