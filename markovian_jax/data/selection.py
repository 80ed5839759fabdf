"""The three disjoint example sets of a run: train, selection (validation) and the reported test.

    splits = selection.run_splits(task, load, train_split="train", eval_split="test",
                                  selection_size=0, test_size=200, seed=1234,
                                  task_options={...})    # selection_size 0 = auto_size
    splits.train       what training draws from (the train split minus any carve-out)
    splits.selection   what checkpoint selection (keep_best, --best) is scored on
    splits.test        the reported split's eval subset
    splits.record()    JSON for the run directory: where selection came from and every id

Selection reads the task's own validation split where it has one that neither the train nor the
eval split contains (`VALIDATION_SPLITS`); otherwise it is a seeded carve-out of the train split,
removed from training. MMLU's default train split is dev + validation, so its selection set is a
carve-out unless data.mmlu_train_splits leaves validation out. The sets never share an item id;
for datasets they never share a question text either (a train item that repeats a test or
selection question is dropped from training). Generated tasks (arithmetic) are disjoint by
construction, one seeded stream per split, and are compared by id only: small configurations
(the demo's 2 terms in [1, 20]) repeat questions across streams by design.

Subsets (`eval_subset`) rank items by a hash of (seed, item id): the same seed gives the same
subset whatever the file order, across steps and across runs, and an item's rank does not change
when the split grows. MMLU subsets are stratified by subject (`strata`), so 200 questions cover
all 57 subjects instead of the first three alphabetically.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
from typing import Callable, Optional, Sequence

from markovian_jax.data.records import DataError, Example
from markovian_jax.runtime import files

# The task's own held-out split for checkpoint selection; gsm8k and svamp have none.
VALIDATION_SPLITS = {
  "arc": "validation",
  "mmlu": "validation",
  "aqua": "validation",
  "mathqa": "validation",
  "arithmetic": "validation",
  "wiki_continuation": "validation",
}
# A carve-out may take at most this fraction of the train split.
MAX_CARVE_FRACTION = 0.5
# selection_size=0 (auto): AUTO_SELECTION_SIZE items, and a carve-out no more than
# AUTO_CARVE_FRACTION of the train split (SVAMP: 70 of 700, GSM8K: 200 of 7,473).
AUTO_SELECTION_SIZE = 200
AUTO_CARVE_FRACTION = 0.1
_GENERATED = ("arithmetic",)  # compared by id only (module docstring)
# The config keys the selection set and the training stream are drawn with: a resumed run keeps
# the values it started with (its config.json), or both would change mid-run.
RESUME_KEYS = ("seed", "selection_size")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SelectionSource:
  """Where the selection set comes from.

  split: the split read (the task's validation split, or the train split when carved).
  carved: True when the set is a seeded carve-out of the train split, removed from training.
  size: how many examples selection evaluates. seed: the subset / carve-out seed.
  """

  task: str
  split: str
  carved: bool
  size: int
  seed: int

  def describe(self) -> str:
    if self.carved:
      return (
        f"a seeded carve-out (seed {self.seed}) of {self.size} items of the {self.task} "
        f"{self.split!r} split, removed from training"
      )
    if self.size == 0:
      return f"the {self.task} {self.split!r} split (auto size, seed {self.seed})"
    return f"the {self.task} {self.split!r} split ({self.size} items, seed {self.seed})"

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _parts(task: str, split: str, task_options: dict) -> set:
  """The source splits a split is made of (MMLU's train is dev + validation by default)."""
  if task == "mmlu" and split == "train":
    return set(task_options.get("train_splits") or ("dev", "validation"))
  if task == "svamp" and split == "all":
    return {"train", "test"}
  return {split}


def selection_source(
  task: str,
  *,
  train_split: str,
  eval_split: str,
  size: int,
  seed: int,
  task_options: Optional[dict] = None,
) -> SelectionSource:
  """The task's validation split when it is kept apart from `train_split` and `eval_split`,
  otherwise a carve-out of `train_split`. size 0 = auto (`auto_size`, once the split is read)."""
  if size < 0:
    raise DataError(f"selection needs at least one example (0 = auto), got size={size}")
  options = task_options or {}
  used = _parts(task, train_split, options) | _parts(task, eval_split, options)
  validation = VALIDATION_SPLITS.get(task)
  if validation is not None and validation not in used:
    return SelectionSource(task, validation, False, int(size), int(seed))
  return SelectionSource(task, train_split, True, int(size), int(seed))


def auto_size(carved: bool, train_size: int) -> int:
  """The selection size of selection_size=0: AUTO_SELECTION_SIZE, and for a carve-out no more
  than AUTO_CARVE_FRACTION of the `train_size` items it is cut from (at least 1)."""
  if not carved:
    return AUTO_SELECTION_SIZE
  return max(1, min(AUTO_SELECTION_SIZE, int(AUTO_CARVE_FRACTION * train_size)))


def strata(task: str) -> Optional[Callable[[Example], str]]:
  """The stratum of an example for stratified subsets: MMLU's subject (from its id
  "mmlu/<subject>/<split>/<i>"); None for tasks sampled at random."""
  if task == "mmlu":
    return lambda ex: (ex.id or "").split("/")[1] if (ex.id or "").count("/") >= 2 else ""
  return None


def _keys(examples: Sequence[Example]) -> list:
  """A stable key per example: its id, or (position, question) when ids are missing or shared."""
  ids = [e.id for e in examples]
  if all(ids) and len(set(ids)) == len(ids):
    return ids
  return [f"{i}/{e.question}" for i, e in enumerate(examples)]


def _rank(key: str, seed: int) -> bytes:
  return hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()


def _allocate(sizes: dict, n: int, seed: int) -> dict:
  """Items per stratum: one each first (so every stratum is covered when n allows), the rest in
  proportion to what is left (largest remainders). With fewer items than strata, n strata chosen
  by the seeded hash get one each."""
  if n < len(sizes):
    chosen = sorted(sizes, key=lambda s: _rank(f"stratum/{s}", seed))[:n]
    return {s: int(s in chosen) for s in sizes}
  take = {s: 1 for s in sizes}
  rest = {s: sizes[s] - 1 for s in sizes}
  left, total = n - len(sizes), sum(rest.values())
  if left <= 0 or total == 0:
    return take
  shares = {s: left * rest[s] / total for s in sizes}
  for s in sizes:
    take[s] += int(shares[s])
  spare = n - sum(take.values())
  by_remainder = sorted(sizes, key=lambda s: (-(shares[s] - int(shares[s])), str(s)))
  for s in by_remainder[:spare]:
    take[s] += 1
  return {s: min(take[s], sizes[s]) for s in sizes}


def eval_subset(
  examples: Sequence[Example],
  n: int,
  seed: int,
  stratify_by: Optional[Callable[[Example], str]] = None,
) -> list:
  """A seeded sample of `n` examples, in their original order (all of them when n >= len).

  Items are ranked by a hash of (seed, id); the lowest-ranked n are taken, per stratum when
  `stratify_by` is given (every stratum gets one first, then shares in proportion to its size).
  """
  examples = list(examples)
  if n >= len(examples):
    return examples
  ranks = [_rank(k, seed) for k in _keys(examples)]
  if stratify_by is None:
    chosen = set(sorted(range(len(examples)), key=ranks.__getitem__)[:n])
  else:
    groups = collections.defaultdict(list)
    for i, ex in enumerate(examples):
      groups[stratify_by(ex)].append(i)
    quota = _allocate({s: len(v) for s, v in groups.items()}, n, seed)
    chosen = set()
    for s, members in groups.items():
      chosen.update(sorted(members, key=ranks.__getitem__)[: quota[s]])
  return [ex for i, ex in enumerate(examples) if i in chosen]


def _question_key(ex: Example) -> str:
  return " ".join(ex.question.split()).casefold()


def _without(
  examples: Sequence[Example], *others: Sequence[Example], by_question: bool = True
) -> list:
  """`examples` minus any whose id (or, with `by_question`, question text) is in `others`."""
  ids = {e.id for o in others for e in o if e.id}
  questions = {_question_key(e) for o in others for e in o} if by_question else set()
  return [
    e
    for e in examples
    if (not e.id or e.id not in ids) and not (by_question and _question_key(e) in questions)
  ]


def check_disjoint(by_question: bool = True, **sets: Sequence[Example]) -> None:
  """Raises DataError when two of the named example lists share an item id (or, with
  `by_question`, a question text)."""
  names = list(sets)
  for i, a in enumerate(names):
    for b in names[i + 1 :]:
      shared = len(sets[a]) - len(_without(sets[a], sets[b], by_question=by_question))
      if shared:
        what = "id or question" if by_question else "id"
        raise DataError(f"{shared} item(s) of the {a} set also appear in the {b} set (same {what})")


@dataclasses.dataclass
class RunSplits:
  """The example sets of a run; see the module docstring."""

  source: SelectionSource
  train: list
  selection: list
  test: list

  def record(self) -> dict:
    """JSON for `<workdir>/selection.json`: the source and the ids of every evaluated item."""
    return {
      "selection": self.source.to_json(),
      "description": self.source.describe(),
      "num_train": len(self.train),
      "selection_ids": [e.id for e in self.selection],
      "test_ids": [e.id for e in self.test],
    }


def from_record(record: dict, load: Callable[[str], list]) -> list:
  """The selection set a run recorded (`RunSplits.record()`, its selection.json): the items of
  the recorded split with the recorded ids, in the recorded order. Raises DataError when the
  data no longer holds one of them (a different data.path or file)."""
  split, ids = record["selection"]["split"], record["selection_ids"]
  if not ids or not all(ids):
    raise DataError(
      "selection.json lists items without ids; the selection set cannot be rebuilt from it"
    )
  by_id = {e.id: e for e in load(split)}
  missing = [i for i in ids if i not in by_id]
  if missing:
    raise DataError(
      f"{len(missing)} of the {len(ids)} selection items recorded in "
      f"selection.json (e.g. {missing[0]!r}) are not in the {split!r} split of "
      "this data; point config.data.path at the data the run trained on"
    )
  return [by_id[i] for i in ids]


def run_splits(
  task: str,
  load: Callable[[str], list],
  *,
  train_split: str,
  eval_split: str,
  selection_size: int,
  test_size: int,
  seed: int,
  task_options: Optional[dict] = None,
) -> RunSplits:
  """Loads and separates a run's train, selection and test sets.

  load: split name -> every example of that split (e.g. `run_context.read_examples` without a
    limit). The test set is `eval_subset(load(eval_split), test_size, seed, strata(task))`; the
    selection set is drawn the same way from the validation split, or carved out of the train
    split (then removed from it). Raises DataError when a carve-out would take more than
    MAX_CARVE_FRACTION of the train split, or when a set ends up empty.
  """
  source = selection_source(
    task,
    train_split=train_split,
    eval_split=eval_split,
    size=selection_size,
    seed=seed,
    task_options=task_options,
  )
  by, by_question = strata(task), task not in _GENERATED
  test = eval_subset(load(eval_split), test_size, seed, by)
  train_all = _without(load(train_split), test, by_question=by_question)
  if selection_size == 0:
    selection_size = auto_size(source.carved, len(train_all))
    source = dataclasses.replace(source, size=selection_size)
  if source.carved:
    if selection_size > AUTO_CARVE_FRACTION * len(train_all):
      # An explicit size beyond what auto would carve: said with the numbers, as auto's cap is.
      log.warning(
        "eval.selection_size=%d carves %.0f%% of the %d %s %r items out of training "
        "(auto carves at most %.0f%%, %d items)",
        selection_size,
        100 * selection_size / max(1, len(train_all)),
        len(train_all),
        task,
        train_split,
        100 * AUTO_CARVE_FRACTION,
        auto_size(True, len(train_all)),
      )
    if selection_size > MAX_CARVE_FRACTION * len(train_all):
      raise DataError(
        f"a selection carve-out of {selection_size} items would take more than "
        f"{MAX_CARVE_FRACTION:.0%} of the {len(train_all)} {task} {train_split!r} "
        "items; lower the selection size"
      )
    selection = eval_subset(train_all, selection_size, seed, by)
    train = _without(train_all, selection, by_question=by_question)
  else:
    candidates = _without(load(source.split), test, by_question=by_question)
    selection = eval_subset(candidates, selection_size, seed, by)
    train = _without(train_all, selection, by_question=by_question)
  for name, items in (("train", train), ("selection", selection), ("test", test)):
    if not items:
      raise DataError(f"the {task} {name} set is empty (selection from {source.describe()})")
  check_disjoint(by_question, train=train, selection=selection, test=test)
  return RunSplits(source, train, selection, test)


def check_resume(recorded_config: dict, seed: int, selection_size: int, where: str) -> None:
  """Raises DataError when a resumed run's eval.seed or eval.selection_size differs from what it
  started with (`recorded_config`: its config.json, nested; `where`: that file, for the
  message). The selection set and the training stream are drawn with them."""
  recorded = recorded_config.get("eval") or {}
  now = {"seed": seed, "selection_size": selection_size}
  changed = [k for k in RESUME_KEYS if k in recorded and recorded[k] != now[k]]
  if changed:
    what = ", ".join(f"eval.{k}={recorded[k]} (now {now[k]})" for k in changed)
    raise DataError(
      f"config.eval.{changed[0]}: the run being resumed started with {what} "
      f"({where}); resuming with other values would change its selection set "
      "and training stream: keep its values, or start a new --config.workdir"
    )


def write_record(path, splits: RunSplits, resuming: bool) -> None:
  """Writes `splits.record()` to `path` (selection.json, an etils/pathlib path) at a run's start.
  On resume the run's record stays as it is, never rewritten: the selection set rebuilt now must
  be the recorded one, else DataError (the data changed under the run)."""
  if resuming and path.is_file():
    recorded = files.read_json(path).get("selection_ids")
    now = [e.id for e in splits.selection]
    if recorded != now:
      raise DataError(
        f"the selection set rebuilt from this data differs from the one {path} "
        "records for the run being resumed; point config.data.path at the data "
        "the run trained on"
      )
    return
  files.write_atomic(path, json.dumps(splits.record(), indent=1))
