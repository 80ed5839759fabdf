"""Fault injection for the fault-matrix tests (`benchmarks/faults.py`,
tests/benchmarks/test_faults.py).

Off unless the environment variable MARKOVIAN_TEST_FAULTS is set, which nothing but those tests
sets: a run never reaches these code paths by accident. Its value is a comma-separated list of
`action@point:step`, each firing once, the first time the run reaches `point` while working on
training step `step` (the step being taken, 1-based; evaluation and checkpoints of step s count as
step s):

  points   sample (rollout), update (the optimizer update), eval (evaluation), checkpoint (after
           orbax started writing the checkpoint, before it is finalised), loss (the step's loss)
  actions  kill      SIGKILL this process (kill -9)
           term      SIGTERM this process (a preemption notice)
           enospc    raise OSError(ENOSPC) (a full disk, where no small filesystem can be mounted)
           fill      fill the filesystem holding the workdir (a real full disk on a small tmpfs)
           nonfinite make the step's loss non-finite (point `loss` only)

e.g. MARKOVIAN_TEST_FAULTS="kill@checkpoint:3" or "nonfinite@loss:2,nonfinite@loss:3".
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
from typing import Optional

ENV = "MARKOVIAN_TEST_FAULTS"
POINTS = ("sample", "update", "eval", "checkpoint", "loss")
ACTIONS = ("kill", "term", "enospc", "fill", "nonfinite")


@dataclasses.dataclass
class Fault:
  action: str
  point: str
  step: int
  fired: bool = False


def parse(text: str) -> list[Fault]:
  """The faults of a MARKOVIAN_TEST_FAULTS value; ValueError naming a malformed entry."""
  faults = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    action, _, rest = item.partition("@")
    point, _, step = rest.partition(":")
    if action not in ACTIONS or point not in POINTS or not step.isdigit():
      raise ValueError(
        f"{ENV}: {item!r} is not action@point:step with action in {ACTIONS} and point in {POINTS}"
      )
    faults.append(Fault(action, point, int(step)))
  return faults


_PLAN: Optional[list] = None


def _plan() -> list[Fault]:
  global _PLAN
  if _PLAN is None:
    _PLAN = parse(os.environ.get(ENV, ""))
  return _PLAN


def _due(point: str, step: int) -> list[Fault]:
  if not os.environ.get(ENV):
    return []
  due = [f for f in _plan() if not f.fired and f.point == point and f.step == step]
  for f in due:
    f.fired = True
  return due


def fill_filesystem(directory) -> None:
  """Writes `directory`/.fill until its filesystem has no space left; never raises ENOSPC itself.

  Unbuffered: a buffered file keeps the tail of a write the disk took only in part and raises
  ENOSPC again when it is closed, so the filler itself, not the run it fills the disk under,
  would fail (whenever the free space was not a whole number of blocks).
  """
  block = b"\0" * (1 << 16)
  for name, size in ((".fill", len(block)), (".fill2", 1)):  # .fill2: the last partial block
    try:
      with open(os.path.join(os.fspath(directory), name), "ab", buffering=0) as f:
        while True:
          f.write(block[:size])
    except OSError as e:
      if e.errno != errno.ENOSPC:
        raise


def at(point: str, step: int, directory=None) -> bool:
  """Acts on the faults due at `point` of step `step`; True when the step's loss must be made
  non-finite (action `nonfinite`). `directory`: where `fill` and `enospc` apply."""
  poison = False
  for f in _due(point, step):
    if f.action == "kill":
      os.kill(os.getpid(), signal.SIGKILL)
    elif f.action == "term":
      os.kill(os.getpid(), signal.SIGTERM)
    elif f.action == "fill":
      fill_filesystem(directory)
    elif f.action == "enospc":
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(directory))
    elif f.action == "nonfinite":
      poison = True
  return poison
