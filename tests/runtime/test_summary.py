"""The TensorBoard writer (markovian_jax/runtime/summary.py): what it writes reads back through
TensorBoard's own event reader, and a process that has not loaded torch does not load it for
tensorboardX (which imports torch whenever it is installed)."""

import subprocess
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

  out = subprocess.run(
    [sys.executable, "-c", _WRITE, str(tmp_path)],
    capture_output=True,
    text=True,
    cwd=helpers.REPO,
    timeout=120,
  )
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
