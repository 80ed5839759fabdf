"""A run keeps its protocol. The results table's cells are the paper's cells: the evaluate CLI's
rows at the task's full test size, read under the run's own protocol, keyed by model; training's
periodic evaluation says so. A resumed run keeps the selection set and training stream it started
with.

The runs are the session's `demo_runs` (the real training loop on the tiny model), copied before
anything is written into them; the table's inputs are also written directly where the test needs
a layout training does not produce (two models, a foreign protocol).
"""

import json
import os
import shutil

import pytest

from markovian_jax.reporting import results_table as rt
from markovian_jax.reporting import runs as report_runs
from tests.helpers import one_error_line, run_module

FULL = 8  # the copied run's configured full test size (eval.final_num_examples)


def _table(parent):
  runs = [report_runs.load_run(p, os.path.basename(p)) for p in report_runs.find_runs(parent)]
  return rt.results_table(runs)


def _copy(demo_runs, name, parent, full=None) -> str:
  dst = os.path.join(parent, name)
  shutil.copytree(demo_runs[name], dst, ignore=shutil.ignore_patterns("analysis", "report*"))
  if full is not None:  # the run as configured with a full test size of `full` questions
    path = os.path.join(dst, "config.json")
    config = json.loads(open(path).read())
    config["eval"]["final_num_examples"] = full
    open(path, "w").write(json.dumps(config))
  return dst


def _evaluate(model_dir, run, *extra):
  # The tiny run's own sizes (tests/helpers.make_config); the protocol keys left at demo's.
  return run_module(
    "markovian_jax.evaluate",
    "--config=configs/demo.py",
    f"--config.model.path={model_dir}",
    "--config.host_allocator=system",
    "--config.sampling.cot_length=8",
    "--config.sampling.prompt_bucket=64",
    "--config.eval.batch_size=4",
    "--config.eval.answer_max_tokens=4",
    f"--config.eval.final_num_examples={FULL}",
    f"--checkpoint_dir={run}/checkpoints",
    *extra,
  )


@pytest.mark.slow  # the demo runs (training loops)
def test_a_runs_cells_come_from_periodic_evaluation_and_say_so(demo_runs, tmp_path):
  """Before any `evaluate`, a run's cells are training's periodic evaluation (eval.num_examples
  = 4 questions), marked as such, and the Base column too."""
  _copy(demo_runs, "markovian", tmp_path)
  table = _table(tmp_path)
  (row,) = table.rows
  for col in ("base", "markovian"):
    (cell,) = table.cells[row + (col,)]
    assert (cell.source, cell.n) == ("periodic", 4), (col, cell)
  text = rt.format_results_table(table)
  assert text.count("n=4 (periodic)") == 2, text
  assert "(periodic): training's periodic evaluation" in text


@pytest.mark.slow
def test_evaluate_refuses_another_protocol_and_fills_cells_at_the_full_size(
  demo_runs, tiny_model_dir, tmp_path
):
  """A non-Markovian run evaluated with the bare task config is refused with one line and its
  cell stays as it was; the Markovian run evaluated with its own config (`--best --base_model`)
  gives cells of n = its configured full test size, Base included, and training's periodic
  files are left alone."""
  nm = _copy(demo_runs, "non_markovian", tmp_path, full=FULL)
  before = rt.format_results_table(_table(tmp_path))
  files = sorted(os.listdir(os.path.join(nm, "eval")))
  line = one_error_line(_evaluate(tiny_model_dir, nm, "--best"))
  assert "prompt.markovian=False (--config: True)" in line, line
  assert sorted(os.listdir(os.path.join(nm, "eval"))) == files
  assert rt.format_results_table(_table(tmp_path)) == before

  m = _copy(demo_runs, "markovian", tmp_path, full=FULL)
  periodic = {
    f: open(os.path.join(m, "eval", f)).read()
    for f in os.listdir(os.path.join(m, "eval"))
    if f.endswith(".jsonl")
  }
  proc = _evaluate(tiny_model_dir, m, "--best", "--base_model")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert periodic == {f: open(os.path.join(m, "eval", f)).read() for f in periodic}
  table = _table(tmp_path)
  row = next(r for r in table.rows)
  for col in ("base", "markovian"):
    (cell,) = table.cells[row + (col,)]
    assert (cell.source, cell.n, cell.full) == ("test", FULL, FULL), (col, cell)
  # Evaluations of another protocol (here a subset) are never written into the same place.
  final = os.path.join(m, report_runs.FINAL_EVAL_DIR)
  protocol = report_runs.read_protocol(final)
  assert protocol["num_examples"] == FULL and protocol["prompt.markovian"] is True
  assert report_runs.foreign_directory(final, protocol) is None
  refusal = report_runs.foreign_directory(final, dict(protocol, num_examples=3))
  assert "holds evaluations of another protocol (num_examples 8 there, 3 here)" in refusal


def _final(run_dir, protocol: dict, step: int, n: int, k: int, base_k=None):
  """The evaluate CLI's files in a run: rows of n questions, the first k right, at `step` (and
  base.jsonl with base_k right)."""
  out = os.path.join(run_dir, report_runs.FINAL_EVAL_DIR)
  os.makedirs(out, exist_ok=True)
  for name, right in ((f"step_{step}", k), ("base", base_k)):
    if right is None:
      continue
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
      for i in range(n):
        f.write(json.dumps({"id": f"q{i}", "correct": {"anchor": i < right}}) + "\n")
  with open(os.path.join(out, "protocol.json"), "w") as f:
    json.dump(protocol, f)


def test_cells_are_keyed_by_model_and_read_under_the_runs_protocol(tmp_path):
  """Two models on one task are two rows, each with its own Base; the evaluate CLI's rows are
  used only when their protocol.json is the run's own."""
  from tests.run_fixtures import table_run

  sel = {0: 0.2, 20: 0.7, 40: 0.5}
  llama = table_run(
    tmp_path / "llama_m",
    "gsm8k",
    "markovian",
    {0: 0.2, 20: 0.6, 40: 0.1},
    sel,
    n=10,
    model="meta-llama/Llama-3.1-8B-Instruct",
    full=50,
  )
  qwen = table_run(
    tmp_path / "qwen_m",
    "gsm8k",
    "markovian",
    {0: 0.1, 20: 0.7, 40: 0.3},
    sel,
    n=10,
    model="Qwen/Qwen3-4B",
    full=50,
  )
  own = {"task": "gsm8k", "model.path": "meta-llama/Llama-3.1-8B-Instruct", "variant": "markovian"}
  _final(llama, own, 20, 50, 29, base_k=11)
  _final(
    qwen,
    dict(own, **{"model.path": "Qwen/Qwen3-4B", "variant": "non_markovian"}),
    20,
    50,
    45,
    base_k=40,
  )
  table = _table(tmp_path)
  lrow, qrow = ("gsm8k", "meta-llama/Llama-3.1-8B-Instruct"), ("gsm8k", "Qwen/Qwen3-4B")
  assert table.rows == [lrow, qrow]
  (cell,) = table.cells[lrow + ("markovian",)]
  assert (cell.value, cell.n, cell.source, cell.step) == (29 / 50, 50, "test", 20)
  # Where step 20's checkpoint is gone (evaluate --best scored step 40, the best saved one),
  # the cell is step 40's full-size evaluation, not step 20's periodic one.
  final = os.path.join(llama, report_runs.FINAL_EVAL_DIR)
  os.rename(os.path.join(final, "step_20.jsonl"), os.path.join(final, "step_40.jsonl"))
  (cell,) = _table(tmp_path).cells[lrow + ("markovian",)]
  assert (cell.value, cell.n, cell.source, cell.step) == (29 / 50, 50, "test", 40)
  (cell,) = table.cells[lrow + ("base",)]
  assert (cell.value, cell.n, cell.source) == (11 / 50, 50, "test")
  # Qwen's final files were read under another variant: its periodic cells, and its own Base.
  (cell,) = table.cells[qrow + ("markovian",)]
  assert (cell.value, cell.n, cell.source) == (0.7, 10, "periodic")
  (cell,) = table.cells[qrow + ("base",)]
  assert (cell.value, cell.source) == (0.1, "periodic")
  text = rt.format_results_table(table)
  assert "| GSM8K (Llama-3.1-8B-Instruct) | 22.0 [" in text
  assert "| GSM8K (Qwen3-4B) | 10.0 [" in text and "n=10 (periodic)" in text
  assert "n=50 |" in text and "n=50 (of" not in text
  # A run configured with a full size of 60 whose evaluation read 50 questions says so.
  config = json.loads(open(os.path.join(llama, "config.json")).read())
  config["eval"]["final_num_examples"] = 60
  open(os.path.join(llama, "config.json"), "w").write(json.dumps(config))
  text = rt.format_results_table(_table(tmp_path))
  assert text.count("n=50 (of 60)") == 2, text  # Base and Markovian


def _resume_config(model_dir, workdir, **overrides):
  from tests.helpers import make_config

  return make_config(model_dir, workdir, **{"train.resume": True, **overrides})


@pytest.mark.parametrize("key,value", [("eval.seed", 7), ("eval.selection_size", 16)])
def test_resuming_with_another_selection_seed_or_size_is_refused(
  tiny_model_dir, tmp_path, key, value
):
  """Refused from the run's config.json and its checkpoint listing, before anything loads."""
  from markovian_jax.runtime.errors import UserError
  from markovian_jax.trainer import Trainer
  from tests.helpers import make_config

  run = tmp_path / "run"
  (run / "checkpoints" / "2").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(make_config(tiny_model_dir, run).to_dict()))
  with pytest.raises(UserError) as raised:
    Trainer(_resume_config(tiny_model_dir, run, **{key: value}))
  line = " ".join(str(raised.value).split())
  assert line.startswith(f"config.{key}: the run being resumed started with {key}=") and (
    f"(now {value})" in line
  ), line
  assert not (run / "selection.json").exists()


@pytest.mark.slow  # the demo runs (training loops)
def test_resuming_never_rewrites_selection_json(demo_runs, tiny_model_dir, tmp_path):
  """The record is the run's own from its first start: a resume (same seed and size) leaves
  the file byte for byte, and one whose data gives another selection set is refused."""
  from markovian_jax.data import selection
  from markovian_jax.data.records import DataError
  from markovian_jax.trainer import Trainer

  run = _copy(demo_runs, "markovian", tmp_path)
  path = os.path.join(run, "selection.json")
  record = json.loads(open(path).read())
  compact = json.dumps(record)  # the run's record, in a layout a rewrite would not produce
  open(path, "w").write(compact)
  trainer = Trainer(_resume_config(tiny_model_dir, run))
  trainer.writer.close()
  assert open(path).read() == compact
  assert [e.id for e in trainer.selection_examples] == record["selection_ids"]
  # The same rebuilt splits against a record of another selection set: refused, file kept.
  from etils import epath

  other = dict(record, selection_ids=record["selection_ids"][::-1])
  open(path, "w").write(json.dumps(other))
  with pytest.raises(DataError, match="differs from the one .* records"):
    selection.write_record(epath.Path(path), trainer.splits, resuming=True)
  assert json.loads(open(path).read()) == other
