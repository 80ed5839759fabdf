"""The selection (validation) split: where it comes from per task, disjoint from train and test,
seeded subsets that ignore file order, and MMLU subsets that cover the subjects."""

import importlib
import random

import pytest

from markovian_jax.data import DataError, Example, load_task, selection


@pytest.mark.parametrize(
  "task, options, eval_split, split, carved",
  [
    ("gsm8k", {}, "test", "train", True),
    ("svamp", {}, "test", "train", True),
    ("arc", {}, "test", "validation", False),
    ("arc", {}, "validation", "train", True),  # the reported split is never the selection split
    ("mmlu", {"train_splits": ("dev", "validation")}, "test", "train", True),
    ("mmlu", {"train_splits": ("dev",)}, "test", "validation", False),
    ("aqua", {}, "test", "validation", False),
    ("arithmetic", {}, "test", "validation", False),
  ],
)
def test_selection_source(task, options, eval_split, split, carved):
  src = selection.selection_source(
    task, train_split="train", eval_split=eval_split, size=50, seed=3, task_options=options
  )
  assert (src.split, src.carved) == (split, carved)
  assert src.to_json() == {"task": task, "split": split, "carved": carved, "size": 50, "seed": 3}
  assert ("carve-out" in src.describe()) == carved


def _loader(task, path, **options):
  cache = {}

  def load(split):
    if split not in cache:
      cache[split] = load_task(task, split, path, **options)
    return cache[split]

  return load


def _ids(examples):
  return [e.id for e in examples]


@pytest.mark.parametrize(
  "task, options",
  [
    ("gsm8k", {}),
    ("svamp", {}),
    ("arc", {}),
    ("mmlu", {}),
    ("mmlu", {"train_splits": ("dev",)}),
  ],
)
def test_selection_and_test_are_disjoint_from_each_other_and_from_train(shared_data, task, options):
  load = _loader(task, shared_data, **options)
  s = selection.run_splits(
    task,
    load,
    train_split="train",
    eval_split="test",
    selection_size=60,
    test_size=80,
    seed=11,
    task_options=options,
  )
  assert len(s.selection) == 60 and len(s.test) == 80
  sel, test, train = set(_ids(s.selection)), set(_ids(s.test)), set(_ids(s.train))
  assert not sel & test and not sel & train and not test & train
  questions = lambda xs: {" ".join(e.question.split()).casefold() for e in xs}  # noqa: E731
  assert not questions(s.selection) & questions(s.test)
  assert not questions(s.selection) & questions(s.train)
  if s.source.carved:  # the carve-out leaves training
    assert len(s.train) <= len(load("train")) - 60
    assert sel <= set(_ids(load("train")))
  else:
    assert sel <= set(_ids(load(s.source.split)))
  record = s.record()
  assert record["selection_ids"] == _ids(s.selection) and record["test_ids"] == _ids(s.test)
  assert record["num_train"] == len(s.train) and record["selection"]["carved"] == s.source.carved
  # The same seed gives the same sets; another seed other ones.
  again = selection.run_splits(
    task,
    load,
    train_split="train",
    eval_split="test",
    selection_size=60,
    test_size=80,
    seed=11,
    task_options=options,
  )
  assert _ids(again.selection) == _ids(s.selection) and _ids(again.test) == _ids(s.test)
  other = selection.run_splits(
    task,
    load,
    train_split="train",
    eval_split="test",
    selection_size=60,
    test_size=80,
    seed=12,
    task_options=options,
  )
  assert _ids(other.test) != _ids(s.test)


def test_mmlu_subsets_cover_the_subjects(shared_data):
  load = _loader("mmlu", shared_data)
  subjects = {e.id.split("/")[1] for e in load("test")}
  assert len(subjects) == 57
  s = selection.run_splits(
    "mmlu",
    load,
    train_split="train",
    eval_split="test",
    selection_size=200,
    test_size=200,
    seed=1234,
    task_options={"train_splits": ("dev", "validation")},
  )
  for subset in (s.test, s.selection):
    covered = {e.id.split("/")[1] for e in subset}
    assert covered == subjects, sorted(subjects - covered)
  # The first 200 test questions, what a plain [:200] evaluated, are three subjects.
  assert len({e.id.split("/")[1] for e in load("test")[:200]}) <= 3
  # Larger subjects get proportionally more questions.
  per_subject = {}
  for e in s.test:
    per_subject[e.id.split("/")[1]] = per_subject.get(e.id.split("/")[1], 0) + 1
  assert per_subject["professional_law"] > per_subject["abstract_algebra"]


def _toy(n, subjects=("a", "b", "c")):
  return [
    Example(question=f"q{i}", answer="A", id=f"mmlu/{subjects[i % len(subjects)]}/test/{i}")
    for i in range(n)
  ]


def test_eval_subset_is_seeded_and_ignores_file_order():
  items = _toy(100)
  shuffled = items[:]
  random.Random(0).shuffle(shuffled)
  a = selection.eval_subset(items, 10, seed=5)
  assert len(a) == 10 and [e.id for e in a] == [e.id for e in items if e in a]  # file order kept
  assert {e.id for e in selection.eval_subset(shuffled, 10, seed=5)} == {e.id for e in a}
  assert {e.id for e in selection.eval_subset(items, 10, seed=6)} != {e.id for e in a}
  assert selection.eval_subset(items, 500, seed=5) == items
  # An item keeps its rank when the split grows: the subset of the larger split is drawn from
  # the same order.
  bigger = selection.eval_subset(_toy(120), 10, seed=5)
  assert len({e.id for e in bigger} & {e.id for e in a}) >= 7


def test_stratified_allocation():
  by = selection.strata("mmlu")
  items = _toy(90, ("a",) * 8 + ("b",) + ("c",))  # a: 72, b: 9, c: 9
  sub = selection.eval_subset(items, 10, seed=0, stratify_by=by)
  counts = {s: sum(by(e) == s for e in sub) for s in "abc"}
  assert sum(counts.values()) == 10 and min(counts.values()) >= 1 and counts["a"] >= 6
  two = selection.eval_subset(items, 2, seed=0, stratify_by=by)  # fewer items than subjects
  assert len(two) == 2 and len({by(e) for e in two}) == 2
  assert selection.strata("gsm8k") is None


def test_a_carve_out_cannot_take_half_the_train_split():
  items = _toy(30)
  load = lambda split: {"train": items[:20], "test": items[20:]}[split]  # noqa: E731
  with pytest.raises(DataError, match="more than 50% of the 20"):
    selection.run_splits(
      "gsm8k", load, train_split="train", eval_split="test", selection_size=11, test_size=5, seed=0
    )


def test_an_explicit_carve_out_beyond_auto_s_share_is_said_with_the_numbers(caplog):
  """Auto carves at most 10% of the train split; an explicit eval.selection_size above that
  (and under the 50% refusal) is warned about with the numbers; at 10% or less, nothing."""
  items = _toy(130)
  load = lambda split: {"train": items[:100], "test": items[100:]}[split]  # noqa: E731
  with caplog.at_level("WARNING", logger=selection.__name__):
    selection.run_splits(
      "gsm8k", load, train_split="train", eval_split="test", selection_size=10, test_size=5, seed=0
    )
  assert not caplog.records
  with caplog.at_level("WARNING", logger=selection.__name__):
    s = selection.run_splits(
      "gsm8k", load, train_split="train", eval_split="test", selection_size=30, test_size=5, seed=0
    )
  assert len(s.selection) == 30 and len(s.train) == 70
  (record,) = caplog.records
  assert record.getMessage() == (
    "eval.selection_size=30 carves 30% of the 100 gsm8k 'train' "
    "items out of training (auto carves at most 10%, 10 items)"
  )


def test_generated_tasks_are_disjoint_by_id():
  """The demo's sums (2 terms in [1, 20]) repeat across the seeded streams by design; ids keep
  the splits apart and nothing is dropped for a shared question."""
  load = _loader("arithmetic", None, num_terms=2, max_value=20, num_examples=2000)
  s = selection.run_splits(
    "arithmetic",
    load,
    train_split="train",
    eval_split="test",
    selection_size=100,
    test_size=100,
    seed=0,
  )
  assert len(s.train) == 2000 and not s.source.carved
  assert not set(_ids(s.selection)) & set(_ids(s.test))
  questions = {e.question for e in s.train}
  assert any(e.question in questions for e in s.test)  # repeated questions, kept


def test_check_disjoint_names_the_sets():
  a, b = _toy(3), _toy(5)
  with pytest.raises(DataError, match="3 item.*of the train set also appear in the test set"):
    selection.check_disjoint(train=a, test=b)
  selection.check_disjoint(train=a[:1], test=b[3:])


@pytest.mark.parametrize("num_examples", [50, 300])
def test_carve_out_has_its_own_small_size(shared_data, num_examples):
  """SVAMP has no validation split: its selection set is carved out of the 700 training
  questions. Its size is eval.selection_size (auto: at most 10% of the train split), never the
  reported eval size, and the carve-out is the same whatever eval.num_examples is."""
  from markovian_jax.training import config_validation
  from markovian_jax.training.run_context import run_splits

  c = importlib.import_module("configs.svamp").get_config()
  c.data.path = str(shared_data)
  c.eval.num_examples = num_examples
  s = run_splits(config_validation.validate(c))
  train_size = len(s.train) + len(s.selection)
  assert s.source.carved and len(s.test) == min(num_examples, 300)
  assert len(s.selection) == s.source.size == int(0.1 * train_size), (len(s.selection), train_size)
  c.eval.num_examples = 7
  assert _ids(run_splits(config_validation.validate(c)).selection) == _ids(s.selection)
  record = s.record()
  assert record["selection"]["size"] == len(s.selection) and "70 items" in record["description"]
  # An explicit size is taken as given; GSM8K's auto size is 200 (2.7% of 7,473).
  c.eval.selection_size = 30
  assert len(run_splits(config_validation.validate(c)).selection) == 30
