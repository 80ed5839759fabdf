"""One run per workdir: an advisory lock on <workdir>/.lock, held by process 0 while it trains.

    lock = workdir_lock.acquire(workdir)    # WorkdirBusy (one line, exit 2) if a live run holds it
    ...
    lock.release()

The lock is `fcntl.flock` on the file, which the kernel drops when its holder dies, kill -9
included: a lock file left by a dead run is never stuck. The file records the holder's host, pid
and start time, so a refusal can name it, and a take-over of a stale file is logged. flock works
on local disks (and NFS with lock support); an object store (gs://...) has no locks and is not
guarded. A second acquire in the same process (sequential runs in one interpreter) reuses the
lock it holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

from absl import logging

from markovian_jax.runtime.errors import UserError

LOCK_NAME = ".lock"


class WorkdirBusy(UserError):
  """Another live run holds the workdir."""


class WorkdirLock:
  def __init__(self, path: str, file=None):
    self.path, self._file, self._users = path, file, 1

  def release(self) -> None:
    self._users -= 1
    if self._users > 0 or self._file is None:
      return
    _HELD.pop(self.path, None)
    self._file.seek(0)
    self._file.truncate()  # a clean exit leaves no holder behind to report as stale
    self._file.flush()
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None


_HELD: dict[str, WorkdirLock] = {}


def _holder(f) -> dict:
  f.seek(0)
  try:
    return json.loads(f.read() or "{}")
  except ValueError:
    return {}


def acquire(workdir) -> Optional[WorkdirLock]:
  """Locks `workdir` (created if missing) for this process; None for an object-store URI."""
  text = os.fspath(workdir)
  if "://" in text:
    logging.info("%s: an object store has no file locks; not guarding against a second run", text)
    return None
  os.makedirs(text, exist_ok=True)
  path = os.path.realpath(os.path.join(text, LOCK_NAME))
  if path in _HELD:
    _HELD[path]._users += 1
    return _HELD[path]
  f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    who = _holder(f)
    f.close()
    raise WorkdirBusy(
      f"config.workdir: {text} is in use by another run (pid {who.get('pid', '?')} on "
      f"{who.get('host', '?')}, since {who.get('started', '?')}); wait for it to finish or "
      "give another --config.workdir"
    ) from None
  stale = _holder(f)
  if stale.get("pid"):
    logging.warning(
      "%s: taking over the lock of a run that is gone (pid %s on %s, since %s)",
      text,
      stale.get("pid"),
      stale.get("host"),
      stale.get("started"),
    )
  f.seek(0)
  f.truncate()
  f.write(
    json.dumps(
      {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
      }
    )
  )
  f.flush()
  lock = _HELD[path] = WorkdirLock(path, f)
  return lock
