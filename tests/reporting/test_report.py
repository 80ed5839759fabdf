"""The report: diagnoses fire on synthetic logs built to show each failure (and stay silent on a
healthy one); figures and report.md for one run, for a parent of runs, and for two real runs of
the training loop; bad input exits 2 with one line."""

import os
import pathlib

import pytest

from markovian_jax.reporting import diagnoses as ra
from markovian_jax.reporting import markdown as report
from markovian_jax.reporting import runs as report_runs
from tests.helpers import one_error_line, run_module
from tests.run_fixtures import synthetic_run, table_run

COLLAPSE_RATIO = "collapse: PPO ratio blow-up"
COLLAPSE_REPEAT = "collapse: repetitive CoTs"
COLLAPSE_CRASH = "collapse: reward crash"
NO_EVAL = "no evaluation during training"
BELOW_BASE = "accuracy below the base model"
DIVERGE = "reward rising while held-out accuracy falls"


def _diagnoses(path) -> dict:
  return {d.kind: d for d in ra.diagnose(report_runs.load_run(str(path)))}


def test_a_healthy_run_has_no_diagnosis(tmp_path):
  for seed in range(3):
    assert _diagnoses(synthetic_run(tmp_path / f"healthy{seed}", seed=seed)) == {}


@pytest.mark.parametrize(
  "kw, kinds, began",
  [
    (dict(ppo_blowup_at=120), {COLLAPSE_RATIO}, (120, 120)),
    (dict(repeat_from=151), {COLLAPSE_REPEAT}, (151, 151)),
    (dict(crash_at=130), {COLLAPSE_CRASH}, (128, 130)),
    (dict(evaluate=False), {NO_EVAL}, (0, 0)),
    (
      dict(accuracy={0: 0.3, 40: 0.45, 80: 0.6, 120: 0.5, 160: 0.42, 200: 0.38}),
      {DIVERGE},
      (80, 80),
    ),
  ],
)
def test_each_failure_is_diagnosed_with_the_step_it_began(tmp_path, kw, kinds, began):
  found = _diagnoses(synthetic_run(tmp_path / "run", **kw))
  assert set(found) == kinds, {k: d.detail for k, d in found.items()}
  d = found[next(iter(kinds))]
  assert began[0] <= d.began <= began[1], d.detail


def test_accuracy_below_the_base_model(tmp_path):
  curve = {0: 0.30, 40: 0.33, 80: 0.28, 120: 0.26, 160: 0.22, 200: 0.20}
  found = _diagnoses(synthetic_run(tmp_path / "run", accuracy=curve))
  # The reward rose meanwhile, so the divergence is diagnosed as well.
  assert set(found) == {BELOW_BASE, DIVERGE}
  assert found[BELOW_BASE].began == 80 and "significantly" in found[BELOW_BASE].detail


def test_milestones_scale_with_the_run_length(tmp_path):
  run = report_runs.load_run(synthetic_run(tmp_path / "run", steps=100))
  assert ra.milestones(100) == [0, 10, 40, 100]
  assert ra.milestones(10000) == [0, 1000, 4000, 10000]
  rows = ra.dynamics(run)
  assert [m for m, _ in rows] == [0, 10, 40, 100]
  assert rows[-1][1]["normalised reward R"] > rows[0][1]["normalised reward R"]


def test_report_of_a_parent_directory(tmp_path):
  synthetic_run(tmp_path / "healthy")
  synthetic_run(
    tmp_path / "collapsed",
    ppo_blowup_at=120,
    repeat_from=151,
    crash_at=160,
    eval_size=50,
    config={"prompt.markovian": False, "optim.lr": 1e-3},
  )
  (tmp_path / "notes").mkdir()  # not a run: ignored
  out = report.write_report(str(tmp_path))
  names = sorted(os.path.relpath(p, tmp_path) for p in out.figures)
  assert names == [
    "report_figures/collapsed/eval.png",
    "report_figures/collapsed/training.png",
    "report_figures/compare_eval.png",
    "report_figures/compare_reward.png",
    "report_figures/healthy/eval.png",
    "report_figures/healthy/training.png",
  ]
  for p in out.figures:
    assert os.path.getsize(p) > 10_000
  text = open(out.path).read()
  for section in (
    "## Summary",
    "## Hyperparameters",
    "## Results",
    "## Dynamics at milestones",
    "## Diagnoses",
    "## Figures",
    "## Example CoTs",
  ):
    assert section in text
  assert "| prompt.markovian | False | True |" in text and "| optim.lr | 0.001 | 0.0001 |" in text
  assert "The runs differ in `eval.num_examples`, `optim.lr`, `prompt.markovian`" in text
  assert "test 50 ⚠" in text and "collapsed (test: 50)" in text
  assert "healthy (test: 500)" not in text
  assert f"**{COLLAPSE_RATIO}**, began at step 120" in text
  assert f"**{COLLAPSE_REPEAT}**, began at step 151" in text
  assert f"**{COLLAPSE_CRASH}**, began at step 160" in text
  assert "**healthy**: none found." in text
  assert "4444" in text  # the collapsed run's example CoTs


def _run_report(*args):
  return run_module("markovian_jax.report", *args)


@pytest.mark.slow
def test_report_cli_on_two_runs_of_the_training_loop(demo_runs):
  proc = _run_report(f"--workdir={demo_runs['parent']}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  parent = demo_runs["parent"]
  for run in ("markovian", "non_markovian"):
    for fig in ("training.png", "eval.png"):
      assert os.path.isfile(os.path.join(parent, "report_figures", run, fig))
  text = open(os.path.join(parent, "report.md")).read()
  assert "| prompt.markovian | True | False |" in text
  assert "first_number" in text and "CoT contains answer" in text
  assert "Training CoTs at step 1" in text and "Held-out CoTs at step 4" in text
  # The methods compared, from what the trainer wrote: K from its config.json (CoTs are exactly
  # sampling.cot_length tokens), its answer/logprob, its steps.
  import json

  k = json.load(open(os.path.join(demo_runs["markovian"], "config.json")))["sampling"]["cot_length"]
  methods = open(os.path.join(parent, "methods_table.md")).read()
  assert "## Methods compared" in text and methods.strip() in text
  assert "| Answer log-prob (train, last steps) | CoT tokens (K fixed) | Steps |" in methods
  assert f"| {float(k):.1f} | 4 |" in methods
  # One run alone: the report lands in that run's directory.
  single = _run_report(f"--workdir={demo_runs['markovian']}")
  assert single.returncode == 0, single.stderr[-3000:]
  assert os.path.isfile(os.path.join(demo_runs["markovian"], "report_figures", "training.png"))


def test_report_bad_input(tmp_path):
  (tmp_path / "empty").mkdir()
  line = one_error_line(_run_report(f"--workdir={tmp_path / 'empty'}"))
  assert "no TensorBoard events" in line and "--workdir" in line
  line = one_error_line(_run_report(f"--workdir={tmp_path / 'missing'}"))
  assert "no such directory" in line
  assert "--workdir is required" in one_error_line(_run_report())
  # A config.json cut short (a crash under an older writer, a hand edit): one line naming it.
  torn = pathlib.Path(synthetic_run(tmp_path / "torn"))
  text = (torn / "config.json").read_text()
  (torn / "config.json").write_text(text[: len(text) // 2])
  line = one_error_line(_run_report(f"--workdir={torn}"))
  assert line.startswith(f"error: {torn / 'config.json'} is not valid JSON (") and line.endswith(
    "): repair it or restore it from a copy"
  ), line


def test_report_of_a_live_run(tmp_path):
  """A run still being written: its event file and samples.jsonl end in a half-written record."""
  import glob

  path = synthetic_run(tmp_path / "live", steps=60, evaluate=False)
  with open(os.path.join(path, "samples.jsonl"), "a") as f:
    f.write('{"step": 61, "cots": ["half a li')
  events = glob.glob(os.path.join(path, "events.out.tfevents.*"))[0]
  with open(events, "rb") as f:
    data = f.read()
  with open(events, "wb") as f:
    f.write(data[:-7])  # the last scalar's record cut short
  out = report.write_report(path)
  run = out.runs[0]
  assert run.samples[-1]["step"] == 51 and 55 <= run.last_step <= 60
  text = open(out.path).read()
  assert f"{run.last_step} of 60 steps" in text and f"**{NO_EVAL}**" in text


def test_best_checkpoint_by_the_selection_split(tmp_path):
  from tensorboardX import SummaryWriter

  path = synthetic_run(tmp_path / "run")
  writer = SummaryWriter(path, filename_suffix=".selection")
  for step, acc in ((0, 0.30), (100, 0.60), (160, 0.60), (200, 0.50)):
    for key, v in (("accuracy", acc), ("ci95_low", acc - 0.05), ("ci95_high", acc + 0.05)):
      writer.add_scalar(f"selection/anchor/{key}", v, step)
  writer.close()
  res = ra.results(report_runs.load_run(path))
  assert res.best[:2] == (100, pytest.approx(0.60))  # ties: the earliest
  assert res.best[2] == pytest.approx(188 / 500)  # the reported split's accuracy at that step
  out = report.write_report(path)
  assert "step 100: 0.600 → test 0.376" in open(out.path).read()


@pytest.mark.parametrize("reference,legacy_blowup", [("behaviour", False), ("base", True)])
def test_ppo_blowup_reads_the_sequence_ratio_not_the_token_maximum(
  tmp_path, reference, legacy_blowup
):
  """Multi-epoch PPO moves single tokens' ratios to the sampling policy far past 10 while each
  sequence's geometric-mean ratio stays near 1: not a collapse. The threshold (10) was set on
  the published runs' sequence-level ratio (21.75 in the collapsed ARC run): that is what fires."""
  cfg = {"objective.ppo_ratio_reference": reference, "objective.ppo_epochs": 4}
  quiet = _diagnoses(synthetic_run(tmp_path / "quiet", token_ratio_max=30.0, config=cfg))
  assert quiet == {}, {k: d.detail for k, d in quiet.items()}
  found = _diagnoses(synthetic_run(tmp_path / "blowup", ppo_blowup_at=120, config=cfg))
  assert set(found) == {COLLAPSE_RATIO} and found[COLLAPSE_RATIO].began == 120
  assert "policy/ppo_seq_ratio_max" in found[COLLAPSE_RATIO].detail
  # A run logged before the sequence tag existed: its per-token maximum is that same quantity
  # only for the ratio to the base (mean-reduced), and is read only then.
  legacy = _diagnoses(
    synthetic_run(tmp_path / "legacy", ppo_blowup_at=120, config=cfg, sequence_ratio=False)
  )
  if legacy_blowup:
    assert set(legacy) == {COLLAPSE_RATIO} and legacy[COLLAPSE_RATIO].began == 120
    assert legacy[COLLAPSE_RATIO].detail.startswith("policy/ppo_ratio_max first exceeded 10")
  else:
    assert legacy == {}, {k: d.detail for k, d in legacy.items()}
  summed = _diagnoses(
    synthetic_run(
      tmp_path / "summed",
      ppo_blowup_at=120,
      sequence_ratio=False,
      config={**cfg, "objective.logprob_reduction": "sum"},
    )
  )
  assert summed == {}, {k: d.detail for k, d in summed.items()}


def test_results_table_over_a_parent_of_variant_runs(tmp_path):
  """Tasks x variants in the paper's column order; each cell the test accuracy at the run's best
  step by selection (neither its first nor its last evaluation), with a bootstrap interval that
  matches the normal approximation of a proportion, n per cell, the base model from step 0, and a
  note where neighbours' intervals overlap."""
  from markovian_jax.reporting import results_table as rt

  sel = {0: 0.2, 20: 0.7, 40: 0.5}  # best at step 20
  table_run(tmp_path / "g_nm", "gsm8k", "non_markovian", {0: 0.2, 20: 0.62, 40: 0.3}, sel)
  table_run(tmp_path / "g_m", "gsm8k", "markovian", {0: 0.2, 20: 0.60, 40: 0.1}, sel)
  table_run(tmp_path / "g_ei", "gsm8k", "ei", {0: 0.2, 20: 0.45, 40: 0.9}, sel)
  table_run(
    tmp_path / "s_m",
    "svamp",
    "markovian",
    {0: 0.1, 20: 0.3, 40: 0.35},
    {0: 0.1, 20: 0.3, 40: 0.31},
    n=100,
  )
  runs = [report_runs.load_run(p, os.path.basename(p)) for p in report_runs.find_runs(tmp_path)]
  table = rt.results_table(runs)
  assert table.columns == ["base", "ei", "markovian", "non_markovian"]
  assert table.tasks == ["gsm8k", "svamp"]
  assert table.rows == [("gsm8k", "llama"), ("svamp", "llama")]
  m = table.cells[("gsm8k", "llama", "markovian")][0]
  assert (m.step, m.value, m.n, m.how, m.source) == (20, 0.60, 200, "selection", "periodic")
  half = 1.96 * (0.6 * 0.4 / 200) ** 0.5
  assert m.low == pytest.approx(0.6 - half, abs=0.01) and m.high == pytest.approx(
    0.6 + half, abs=0.01
  )
  assert table.cells[("svamp", "llama", "markovian")][0].step == 40
  assert table.cells[("gsm8k", "llama", "base")][0].value == 0.2
  assert ("svamp", "llama", "ei") not in table.cells
  text = rt.format_results_table(table)
  assert "| Task | Base | EI | Markovian | Non-Markovian |" in text
  row = next(line for line in text.splitlines() if line.startswith("| GSM8K |"))
  assert "| 60.0 [" in row and "n=200" in row and "| 45.0 [" in row and "| 20.0 [" in row
  assert "GSM8K: Markovian and Non-Markovian overlap" in text
  assert "GSM8K: Base and EI overlap" not in text and "EI and Markovian overlap" not in text
  assert "| SVAMP | 10.0 [" in text and "| – | 35.0 [" in text


@pytest.mark.slow
def test_report_of_a_parent_writes_the_results_table(tmp_path):
  sel = {0: 0.2, 20: 0.7, 40: 0.5}
  table_run(tmp_path / "m", "gsm8k", "markovian", {0: 0.2, 20: 0.60, 40: 0.1}, sel)
  table_run(tmp_path / "nm", "gsm8k", "non_markovian", {0: 0.2, 20: 0.62, 40: 0.3}, sel)
  report.write_report(str(tmp_path))
  table = (tmp_path / "results_table.md").read_text()
  assert "| Task | Base | Markovian | Non-Markovian |" in table and "| 62.0 [" in table
  assert "## Results table (the paper's layout)" in (tmp_path / "report.md").read_text()


def test_figures_plot_the_runs_series(tmp_path, monkeypatch):
  """The figures hold the run's numbers: every panel's raw line is the tag's series read back
  with TensorBoard's own EventAccumulator, its smoothed line the trailing mean of the window
  its label states, and the eval panel's points the logged accuracies (checked by content, not
  by file size)."""
  import re

  import numpy as np
  from tensorboard.backend.event_processing import event_accumulator

  from markovian_jax.reporting import figures as rf

  path = synthetic_run(tmp_path / "run", steps=60, eval_every=20)
  drawn = {}
  original = rf.save_png

  def spy(fig, plt, out):
    drawn[os.path.basename(out)] = {
      ax.get_title(): [
        (line.get_label(), np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
        for line in ax.get_lines()
      ]
      for ax in fig.axes
    }
    return original(fig, plt, out)

  monkeypatch.setattr(rf, "save_png", spy)
  run = report_runs.load_run(path)
  rf.training_figure(run, str(tmp_path / "training.png"))
  rf.eval_figure(run, str(tmp_path / "eval.png"))
  events = event_accumulator.EventAccumulator(path, size_guidance={"scalars": 0})
  events.Reload()

  def logged(tag):
    points = events.Scalars(tag)
    return (
      np.asarray([p.step for p in points], float),
      np.asarray([p.value for p in points], float),
    )

  for title, tag in (
    ("Normalised reward R = r - b", "answer/normalized_reward"),
    ("KL to the reference model", "policy/kl"),
    ("PPO ratio pi / pi_behaviour", "policy/ppo_seq_ratio_max"),
  ):
    lines = drawn["training.png"][title]
    x, y = logged(tag)
    raw = [ln for ln in lines if ln[1].size == x.size and np.allclose(ln[2], y)]
    assert raw and np.array_equal(raw[0][1], x), (title, [ln[0] for ln in lines])
    smooth = [ln for ln in lines if "average" in ln[0] and np.allclose(ln[1], x)]
    for label, _, values in smooth:
      w = int(re.search(r"\((\d+)-step average\)", label).group(1))
      want = [y[max(0, i - w + 1) : i + 1].mean() for i in range(y.size)]
      if np.allclose(values, want):
        break
    else:
      raise AssertionError(f"{title}: no line is the trailing {tag} average")
  x, y = logged("eval/anchor/accuracy")
  panel = next(v for k, v in drawn["eval.png"].items() if "reported" in k)
  assert any(np.array_equal(ln[1], x) and np.allclose(ln[2], y) for ln in panel)
  assert np.allclose(y, [round((0.30 + 0.15 * s / 60) * 500) / 500 for s in x])
