"""TensorBoard writing (tensorboardX, no TensorFlow), from process 0 only.

The log directory may be local or a URI (gs://bucket/run): URIs go through etils epath, as orbax's
checkpoints do, so one filesystem layer (gcsfs for gs://) serves the whole workdir.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import os
from typing import Mapping

from etils import epath
import jax
import numpy as np


class _EpathRecordFile:
  """tensorboardX's record-file interface over epath. Object stores cannot append, so, like
  tensorboardX's own GCS writer, it keeps the file's bytes and rewrites the object on flush."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathFiles:
  """A tensorboardX writer factory (`record_writer.register_writer_factory`) for one URI scheme."""

  def open(self, path: str) -> _EpathRecordFile:
    return _EpathRecordFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _route_uri_through_epath(logdir: str) -> None:
  scheme, sep, _ = logdir.partition("://")
  if sep:
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _EpathFiles())


# Event files of one process, numbered: readers take a directory's files in name order, and two
# files opened in the same second would otherwise share a name (and the second truncate the first).
_FILES = itertools.count()


def _tensorboardx_writer():
  """tensorboardX's SummaryWriter class, imported without torch when torch is not loaded yet.

  tensorboardX imports torch whenever it is installed, only to accept torch tensors as values
  (about 2.5 s of CPU per process); we log Python and numpy values. A torch already imported (a
  process that uses it) is left as it is, and a later `import torch` works as usual."""
  import sys

  if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter as writer

    return writer
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
  try:
    from tensorboardX import SummaryWriter as writer
  finally:
    del sys.modules["torch"]
  return writer


class SummaryWriter:
  """Scalars, histograms and text under `logdir`; a no-op on processes other than 0."""

  def __init__(self, logdir):
    self._writer = None
    self._logdir = os.fspath(logdir)
    if jax.process_index() == 0:
      _route_uri_through_epath(self._logdir)
      epath.Path(self._logdir).mkdir(parents=True, exist_ok=True)
      self._writer = self._open()

  def _open(self):
    _Writer = _tensorboardx_writer()
    return _Writer(self._logdir, filename_suffix=f".{os.getpid()}.{next(_FILES):06d}")

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

  def purge_after(self, step: int):
    """Marks a restart at `step`: TensorBoard's readers drop the events of steps > `step` that
    earlier event files hold (a SessionLog START, what tensorboardX's `purge_step` writes)."""
    if self._writer is None:
      return
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    self._writer.file_writer.add_event(
      Event(step=step + 1, session_log=SessionLog(status=SessionLog.START))
    )
    self.flush()

  def flush(self):
    """Everything logged so far is on disk when this returns. tensorboardX's own flush leaves
    the events its writer thread has not taken from its queue yet (a kill -9 then loses them), so
    the event file is closed, which drains the queue, and the next events go to a new file."""
    if self._writer is not None:
      self._close()
      self._writer = self._open()

  def _close(self):
    """Closes the event file; a full disk is logged, not raised: the checkpoint that follows
    reports it (checkpointing.DiskFull), and lost scalars must not hide that."""
    try:
      self._writer.close()
    except OSError as e:
      if e.errno != errno.ENOSPC:
        raise
      logging.getLogger(__name__).warning(
        "TensorBoard events not all written: no space left on device in %s", self._logdir
      )

  def close(self):
    if self._writer is not None:
      self._close()
      self._writer = None


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """All scalar series in an event directory, for tests and reports."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
