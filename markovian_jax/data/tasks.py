"""One entry point for every task: `load_task(name, split, path=None, **options)`.

`path=None` reads the HF hub dataset the reference uses (`datasets.load_dataset`); otherwise a local
copy in the original release's format: a directory laid out like the release (or a parent
directory holding `<task>/`, e.g. the shared benchmark folder), or a single file.

task               hub id (config)                    split -> hub split / local file
gsm8k              openai/gsm8k (main)                train, test -> train.jsonl, test.jsonl
svamp              ChilleD/SVAMP                      train 700, test 300, all (both);
                                                      local SVAMP.json: all = 1,000 items,
                                                      train/test = fixed 700/300 by hashed ID
arc                allenai/ai2_arc (subset)           train, validation, test ->
                                                      ARC-*/ARC-*-{Train,Dev,Test}.jsonl
mmlu               cais/mmlu (all)                    dev, validation, test ->
                                                      {dev,val,test}/<subject>_<split>.csv;
                                                      train = dev + validation (train_splits);
                                                      auxiliary_train (hub only)
aqua               deepmind/aqua_rat (raw)            train, validation, test ->
                                                      train.json, dev.json, test.json
mathqa             allenai/math_qa                    train, validation, test ->
                                                      {train,dev,test}.json or .jsonl
arithmetic         generated (seeded)                 train 100,000 / validation 200 / test 200
wiki_continuation  wikimedia/wikipedia (20231101.en)  disjoint article ranges (wiki.py); local
                                                      train.txt, valid.txt, test.txt

Options (keyword arguments) per task: arc `subset`; mmlu `subject`, `train_splits`; arithmetic
`num_terms`, `min_value`, `max_value`, `num_examples`, `seed`; wiki_continuation `tokenizer`
(required), `question_length`, `target_length`, `num_examples`. A run config's `data` section maps
to them in `specs.DataSpec.task_options`.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Optional

from markovian_jax.data import mcq_tasks, numeric_tasks, wiki
from markovian_jax.data.records import DataError, Example

_LOADERS: dict[str, Callable[..., list[Example]]] = {
  "gsm8k": numeric_tasks.load_gsm8k,
  "svamp": numeric_tasks.load_svamp,
  "arithmetic": numeric_tasks.load_arithmetic,
  "arc": mcq_tasks.load_arc,
  "mmlu": mcq_tasks.load_mmlu,
  "aqua": mcq_tasks.load_aqua,
  "mathqa": mcq_tasks.load_mathqa,
  "wiki_continuation": wiki.load_wiki_continuation,
}
TASKS = tuple(_LOADERS)
_KINDS = {
  "gsm8k": "numeric",
  "svamp": "numeric",
  "arithmetic": "numeric",
  "arc": "mcq",
  "mmlu": "mcq",
  "aqua": "mcq",
  "mathqa": "mcq",
  "wiki_continuation": "continuation",
}
# Directory names of the tasks in a benchmark folder such as ../shared/data.
_LOCAL_DIRS = {"wiki_continuation": ("wikitext2", "wikitext-2", "wiki_continuation")}


def _check_task(name: str) -> None:
  if name not in _LOADERS:
    raise DataError(f"unknown task {name!r}; known tasks: {list(TASKS)}")


def task_kind(name: str) -> str:
  """'numeric' (answer is a number), 'mcq' (answer is a letter) or 'continuation' (wiki)."""
  _check_task(name)
  return _KINDS[name]


def _resolve_path(name: str, path) -> str:
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory ({name} data)")
  if os.path.isdir(path):
    for sub in _LOCAL_DIRS.get(name, (name,)):
      if os.path.isdir(os.path.join(path, sub)):
        return os.path.join(path, sub)
  return path


def load_task(name: str, split: str, path: Optional[Any] = None, **options) -> list[Example]:
  """The examples of task `name`, split `split`, from the hub (path=None) or local files.

  Raises DataError for an unknown task, split or option, or a malformed record (naming the file
  and line), and FileNotFoundError for a missing file.
  """
  _check_task(name)
  loader = _LOADERS[name]
  params = inspect.signature(loader).parameters
  allowed = [p for p, v in params.items() if v.kind == inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise DataError(f"{name}: unknown option(s) {unknown}; it takes {allowed or 'none'}")
  if path is not None and path != "" and name != "arithmetic":
    path = _resolve_path(name, path)
  return loader(split, path or None, **options)
