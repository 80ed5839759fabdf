"""`Example`, the data error type, and readers that remember where every record came from.

Each reader yields `(where, record)`, where `where` names the file and the JSONL line, JSON array
item or CSV row ("test.jsonl:12"), so a loader that finds a malformed record can say exactly which.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any, Iterator, Optional

from markovian_jax.runtime.errors import UserError


class DataError(UserError, ValueError):
  """A dataset record, file or option is not what the task expects; the message says where."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One task item.

  question: the text placed after the task instruction (for MCQ it already lists the choices).
  answer: the gold answer string the reward scores (a normalised number, a letter, or for
    wiki_continuation the target text).
  choices: the option texts of an MCQ item, in letter order; None otherwise.
  id: a stable name for the item ("gsm8k/test/0"), for per-example logs.
  """

  question: str
  answer: str
  choices: Optional[tuple] = None
  id: Optional[str] = None


def first_existing(directory: str, names, what: str) -> str:
  """The first of `names` that exists in `directory`, or a FileNotFoundError listing them all."""
  for name in names:
    candidate = os.path.join(directory, name)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f"{directory}: none of {list(names)} found ({what})")


def read_jsonl(path: str) -> Iterator[tuple[str, Any]]:
  name = os.path.basename(path)
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(
          f"{where}: malformed JSON line in {name} "
          f"({e.msg.removesuffix(' at')} at column {e.colno})"
        ) from None


def read_json_array(path: str) -> Iterator[tuple[str, Any]]:
  with open(path, encoding="utf-8") as f:
    try:
      items = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(
        f"{path}:{e.lineno}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
      ) from None
  if not isinstance(items, list):
    raise DataError(f"{path}: expected a JSON array of records, got {type(items).__name__}")
  for i, item in enumerate(items):
    yield f"{path}: item {i}", item


def read_json_records(path: str) -> Iterator[tuple[str, Any]]:
  """A JSON array file or a JSONL file (AQuA's `.json` files are JSONL), told apart by content."""
  with open(path, encoding="utf-8") as f:
    head = f.read(4096).lstrip()
  return read_json_array(path) if head.startswith("[") else read_jsonl(path)


def read_csv_rows(path: str) -> Iterator[tuple[str, list]]:
  """CSV rows with a real parser (MMLU fields hold quoted commas and newlines)."""
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f)
    row_no = 0
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        raise DataError(
          f"{path}: row {row_no + 1} (line {reader.line_num}): malformed CSV ({e})"
        ) from None
      row_no += 1
      yield f"{path}: row {row_no} (line {reader.line_num})", row


def field(record: Any, key: str, where: str, kind=str):
  """`record[key]`, checked to be of `kind`; a DataError naming the record otherwise."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if key not in record:
    raise DataError(f"{where}: missing field {key!r} (has {sorted(record)})")
  value = record[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    raise DataError(
      f"{where}: field {key!r} should be {'/'.join(k.__name__ for k in kinds)}, "
      f"got {type(value).__name__} {value!r:.60}"
    )
  return value


def hub_rows(hub_id: str, config: Optional[str], split: str, **kwargs) -> Iterator[tuple[str, Any]]:
  """Rows of an HF hub dataset split via `datasets.load_dataset`, named for error messages."""
  try:
    import datasets
  except ImportError as e:
    raise DataError(
      f"loading {hub_id} from the HF hub needs the `datasets` package ({e}); or pass a local path"
    ) from None
  try:
    ds = datasets.load_dataset(hub_id, config, split=split, **kwargs)
  except Exception as e:  # the hub raises many types (offline, gated, missing split...)
    raise DataError(
      f"could not load {hub_id} (config {config!r}, split {split!r}) from the HF "
      f"hub: {type(e).__name__}: {e}. Pass a local path instead (data.path) or "
      "check HF_HUB_OFFLINE / HF_DATASETS_OFFLINE."
    ) from e
  for i, row in enumerate(ds):
    yield f"{hub_id} ({config or 'default'}) {split} row {i}", row
