"""The fault matrix (benchmarks/faults.py), one test per row with fewer trials than the script:
every trial survived, every resume exact (bit for bit on CPU against an uninterrupted run), no
file lost."""

import pytest

from benchmarks import faults


@pytest.fixture(scope="module")
def ref(tiny_model_dir, tmp_path_factory):
  return faults.Reference(tiny_model_dir, str(tmp_path_factory.mktemp("faults")))


def _check(row: faults.Row, trials: int, exact: bool = True):
  assert row.trials == trials, row
  assert row.survived == trials and row.lost == 0, "\n".join(row.notes)
  if exact:
    assert row.exact == trials, "\n".join(row.notes)


@pytest.mark.slow
def test_kill9_in_sampling_and_mid_checkpoint_resumes_exactly(ref, tmp_path):
  """Two CLI runs killed -9: while sampling step 3 (its scalars and samples half written, the
  step-2 evaluation's events only in tensorboardX's buffer unless the checkpoint flushed them),
  and in the middle of the step-3 checkpoint write. The script adds the update, the evaluation
  and random moments."""
  row = faults.kill9(ref, str(tmp_path), 2, modes=("kill@sample:3", "kill@checkpoint:3"))
  _check(row, 2)


def test_torn_checkpoint_falls_back_and_clis_name_it(ref, tmp_path):
  """A truncated array file (export names it: one line, exit 2) and a broken JSON state; the
  script adds a missing array file and `evaluate`."""
  _check(faults.torn(ref, str(tmp_path), 1, clis=("export",)), 1)
  _check(faults.torn(ref, str(tmp_path / "json"), 1, clis=(), kinds=("json",)), 1)


def test_full_disk_one_line_previous_checkpoint_intact(ref, tmp_path):
  _check(faults.disk_full(ref, str(tmp_path), 1), 1)


def test_bad_rows_named_before_training(ref, tmp_path):
  _check(faults.bad_rows(ref, str(tmp_path), 3), 3, exact=False)


def test_nonfinite_loss_rolls_back_or_stops(ref, tmp_path):
  _check(faults.nonfinite(ref, str(tmp_path), 2), 2, exact=False)


def test_sigterm_during_eval_and_checkpoint_write(ref, tmp_path):
  _check(faults.sigterm(ref, str(tmp_path), 2), 2)


def test_second_run_refused_stale_lock_taken_over(ref, tmp_path):
  _check(faults.two_runs(ref, str(tmp_path), 1), 1, exact=False)


@pytest.mark.slow
def test_one_of_two_processes_killed_the_other_exits_and_the_job_resumes(ref, tmp_path):
  """Process 1 of a two-process job killed -9: process 0 exits within faults.PEER_BOUND_S with
  one line, and the restarted job finishes (its exactness against an uninterrupted two-process
  job is measured by the script, not here: that is one more two-process job)."""
  row = faults.multiprocess(ref, str(tmp_path), 1, reference=False, **{"train.eval_every": 100})
  assert row.trials == 1 and row.survived == 1 and row.lost == 0, "\n".join(row.notes)
