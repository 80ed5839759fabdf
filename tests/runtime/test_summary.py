"""The TensorBoard writer (markovian_jax/runtime/summary.py): what it writes reads back through
TensorBoard's own event reader, and a process that has not loaded torch does not load it for
tensorboardX (which imports torch whenever it is installed)."""

import os
import sys

import pytest

from tests import helpers

_WRITE = """
import sys
import numpy as np
from markovian_jax.runtime import summary
w = summary.SummaryWriter(sys.argv[1])
w.scalars(3, {"loss": 0.25, "kl": 1.5}, prefix="train/")
w.histogram(3, "policy/lengths", np.arange(8.0))
w.text(3, "samples", "12 + 7 = 19")
w.close()
print("torch" in sys.modules)
"""


def test_events_read_back_and_torch_stays_unloaded(tmp_path):
  helpers.require("torch")  # the claim is about a machine where torch is installed
  from tensorboard.backend.event_processing import event_accumulator

  out = helpers.run_script(_WRITE, str(tmp_path), timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == "False"
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(3, 0.25)]
  assert [(e.step, e.value) for e in acc.Scalars("train/kl")] == [(3, 1.5)]
  hist = acc.Histograms("policy/lengths")[0].histogram_value
  assert (hist.min, hist.max, hist.num, hist.sum) == (0.0, 7.0, 8.0, 28.0)


def test_a_process_with_torch_keeps_it():
  torch = pytest.importorskip("torch")
  from markovian_jax.runtime import summary

  assert summary._tensorboardx_writer() is not None
  assert sys.modules["torch"] is torch


_FULL_DISK = """
import builtins, logging, sys
from markovian_jax.runtime import summary
# Event files opened while `full` is set go to /dev/full, where every write fails with ENOSPC.
full, _open = [True], builtins.open
builtins.open = lambda f, *a, **k: _open(
  "/dev/full" if full[0] and "tfevents" in str(f) else f, *a, **k
)
w = summary.SummaryWriter(sys.argv[1])
for step in (1, 2, 3):  # each step more than tensorboardX's queue holds (10 events, 600 KB)
  for i in range(30):
    w.text(step, f"samples/{i}", "x" * 20000)
  w.scalars(step, {"loss": 0.5})
  w.flush()
full[0] = False  # room again: the file the next flush opens is written
w.flush()
w.scalars(4, {"loss": 0.25})
w.close()
print("done")
"""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_neither_hangs_nor_prints_tracebacks(tmp_path):
  """tensorboardX writes events from its own thread through a 10-event queue: a write error there
  killed the thread (its traceback on stderr, more at exit) and the training loop's next `put`
  blocked forever. Now: one warning line, no traceback, and events are written again once there
  is room."""
  out = helpers.run_script(_FULL_DISK, str(tmp_path), timeout=90)
  assert out.returncode == 0 and out.stdout.split() == ["done"], out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "Exception" not in out.stderr, out.stderr[-3000:]
  warned = [ln for ln in out.stderr.splitlines() if "TensorBoard events not all written" in ln]
  assert len(warned) == 1 and str(tmp_path) in warned[0], out.stderr[-3000:]
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(4, 0.25)]
