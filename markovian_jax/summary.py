"""TensorBoard writing (tensorboardX, no TensorFlow), from process 0 only."""

from __future__ import annotations

import os
from typing import Mapping, Optional

import jax
import numpy as np


class SummaryWriter:
  """Scalars, histograms and text under `logdir`; a no-op on processes other than 0."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter as _Writer
      os.makedirs(logdir, exist_ok=True)
      self._writer = _Writer(logdir)

  def scalars(self, step: int, values: Mapping[str, float], prefix: str = ""):
    if self._writer is None:
      return
    for k, v in values.items():
      v = float(v)
      self._writer.add_scalar(prefix + k, v, step)

  def histogram(self, step: int, tag: str, values):
    if self._writer is not None:
      values = np.asarray(values, np.float64)
      if values.size and np.all(np.isfinite(values)):
        self._writer.add_histogram(tag, values, step)

  def text(self, step: int, tag: str, text: str):
    if self._writer is not None:
      self._writer.add_text(tag, text, step)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """All scalar series in an event directory, for tests and reports."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
