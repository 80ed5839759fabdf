"""The report: diagnoses fire on synthetic logs built to show each failure (and stay silent on a
healthy one); figures and report.md for one run, for a parent of runs, and for two real runs of
the training loop; bad input exits 2 with one line."""

import os

import pytest

from markovian_jax.reporting import markdown as report
from markovian_jax.reporting import diagnoses as ra
from markovian_jax.reporting import runs as report_runs
from tests.test_cli import one_error_line, run_module
from tests.run_fixtures import demo_runs, synthetic_run  # noqa: F401 (a fixture)

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


@pytest.mark.parametrize("kw, kinds, began", [
    (dict(ppo_blowup_at=120), {COLLAPSE_RATIO}, (120, 120)),
    (dict(repeat_from=151), {COLLAPSE_REPEAT}, (151, 151)),
    (dict(crash_at=130), {COLLAPSE_CRASH}, (128, 130)),
    (dict(evaluate=False), {NO_EVAL}, (0, 0)),
    (dict(accuracy={0: 0.3, 40: 0.45, 80: 0.6, 120: 0.5, 160: 0.42, 200: 0.38}), {DIVERGE},
     (80, 80)),
])
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
  synthetic_run(tmp_path / "collapsed", ppo_blowup_at=120, repeat_from=151, crash_at=160,
                eval_size=50, config={"prompt.markovian": False, "optim.lr": 1e-3})
  (tmp_path / "notes").mkdir()  # not a run: ignored
  out = report.write_report(str(tmp_path))
  names = sorted(os.path.relpath(p, tmp_path) for p in out.figures)
  assert names == ["report_figures/collapsed/eval.png", "report_figures/collapsed/training.png",
                   "report_figures/compare_eval.png", "report_figures/compare_reward.png",
                   "report_figures/healthy/eval.png", "report_figures/healthy/training.png"]
  for p in out.figures:
    assert os.path.getsize(p) > 10_000
  text = open(out.path).read()
  for section in ("## Summary", "## Hyperparameters", "## Results", "## Dynamics at milestones",
                  "## Diagnoses", "## Figures", "## Example CoTs"):
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


@pytest.mark.parametrize("reference", ["behaviour", "base"])
def test_ppo_blowup_reads_the_sequence_ratio_not_the_token_maximum(tmp_path, reference):
  """Multi-epoch PPO moves single tokens' ratios to the sampling policy far past 10 while each
  sequence's geometric-mean ratio stays near 1: not a collapse. The threshold (10) was set on
  the published runs' sequence-level ratio (21.75 in the collapsed ARC run): that is what fires."""
  cfg = {"objective.ppo_ratio_reference": reference, "objective.ppo_epochs": 4}
  quiet = _diagnoses(synthetic_run(tmp_path / "quiet", token_ratio_max=30.0, config=cfg))
  assert quiet == {}, {k: d.detail for k, d in quiet.items()}
  found = _diagnoses(synthetic_run(tmp_path / "blowup", ppo_blowup_at=120, config=cfg))
  assert set(found) == {COLLAPSE_RATIO} and found[COLLAPSE_RATIO].began == 120
  assert "policy/ppo_seq_ratio_max" in found[COLLAPSE_RATIO].detail
