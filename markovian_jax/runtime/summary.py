"""TensorBoard writing (tensorboardX, no TensorFlow), from process 0 only.

The log directory may be local or a URI (gs://bucket/run): URIs go through etils epath, as orbax's
checkpoints do, so one filesystem layer (gcsfs for gs://) serves the whole workdir.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from typing import Mapping, Optional

from etils import epath
import jax
import numpy as np

from markovian_jax.runtime.errors import is_disk_full


class _RecordFile:
  """One event file as tensorboardX's writer thread sees it (write, flush, close), none of which
  raises: an OSError (a full disk, a lost bucket) is kept in `error` and what follows is dropped.

  A raise would kill tensorboardX's thread, print its traceback, and leave its bounded event queue
  undrained, so the training loop's next events would block in `put` forever (a full disk hung a
  run this way). The SummaryWriter reads `error` when it closes the file, in the main thread.
  Local files are appended as written; a URI (object stores cannot append) keeps the file's bytes
  and rewrites the object on flush, as tensorboardX's own GCS writer does."""

  def __init__(self, path: str):
    self.path = path
    self.error: Optional[OSError] = None
    self._local = "://" not in path
    self._buffer = None if self._local else io.BytesIO()
    self._file = None
    if self._local:
      try:  # opened in the caller's thread: only a full disk waits for `error`
        self._file = open(path, "wb")
      except OSError as e:
        if not is_disk_full(e):
          raise
        self.error = e

  def _guard(self, fn) -> None:
    if self.error is None:
      try:
        fn()
      except OSError as e:
        self.error = e

  def write(self, data: bytes) -> None:
    self._guard(lambda: (self._file if self._local else self._buffer).write(data))

  def flush(self) -> None:
    if self._local:
      self._guard(lambda: (self._file.flush(), os.fsync(self._file.fileno())))
    else:
      self._guard(lambda: epath.Path(self.path).write_bytes(self._buffer.getvalue()))

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      try:
        self._file.close()
      except OSError as e:  # what the failed flush left in the buffer
        self.error = self.error or e
      self._file = None


class _RecordFiles:
  """A tensorboardX writer factory (`record_writer.register_writer_factory`) for one
  SummaryWriter: tensorboardX picks a factory by the path's text before the first ':', so the
  writer's logdir is handed to tensorboardX as '<prefix>:<logdir>' and every event file it opens
  comes here, local or a URI (through etils epath, as orbax's checkpoints)."""

  _ids = itertools.count()

  def __init__(self):
    self.prefix = f"markovian-events-{next(self._ids)}"
    self.files: list[_RecordFile] = []
    from tensorboardX import record_writer

    record_writer.register_writer_factory(self.prefix, self)

  def wrap(self, logdir: str) -> str:
    return f"{self.prefix}:{logdir}"

  def _unwrap(self, path: str) -> str:
    return path[len(self.prefix) + 1 :]

  def open(self, path: str) -> _RecordFile:
    self.files.append(_RecordFile(self._unwrap(path)))
    return self.files[-1]

  def directory_check(self, path: str) -> None:
    epath.Path(self._unwrap(path)).mkdir(parents=True, exist_ok=True)


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
    self._warned = False
    if jax.process_index() == 0:
      epath.Path(self._logdir).mkdir(parents=True, exist_ok=True)
      _tensorboardx_writer()  # before the factory imports tensorboardX's record_writer
      self._files = _RecordFiles()
      self._writer = self._open()

  def _open(self):
    _Writer = _tensorboardx_writer()
    return _Writer(
      self._files.wrap(self._logdir), filename_suffix=f".{os.getpid()}.{next(_FILES):06d}"
    )

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
    """Closes the event file. A full disk is logged (once per writer), not raised: the
    checkpoint that follows reports it (checkpointing.DiskFull), and lost scalars must not hide
    that. Any other write error is raised here, in the caller's thread."""
    self._writer.close()
    errors = [f.error for f in self._files.files if f.error is not None]
    self._files.files.clear()
    for e in errors:
      if not is_disk_full(e):
        raise e
    if errors and not self._warned:
      self._warned = True
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
