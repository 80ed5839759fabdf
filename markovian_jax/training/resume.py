"""Resuming a run after it was killed: from its newest complete checkpoint, with nothing that the
lost steps wrote left to mislead the report.

A run killed after its checkpoint of step s may have written, for steps after s: TensorBoard
scalars, rows of samples.jsonl and eval/[selection/]step_N.jsonl files. The resumed run takes those
steps again, so on resume:
  - TensorBoard: a SessionLog START at step s+1 (`SummaryWriter.purge_after`), TensorBoard's own
    mechanism, makes every reader (TensorBoard, `summary.read_scalars`, the report) drop the
    earlier events of steps > s;
  - samples.jsonl keeps its rows of steps <= s; the others, and eval files of steps > s, move to
    <workdir>/superseded/ (kept, never read by the report), to be written again by the resumed run.
A checkpoint that is damaged (`checkpointing.BrokenCheckpoint`) is set aside with one warning
naming it, and the run resumes from the one before it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable

from absl import logging
from etils import epath
import jax

from markovian_jax.runtime import checkpointing, distributed

SUPERSEDED = "superseded"
_EVAL_FILE = re.compile(r"step_(\d+)\.jsonl$")


def resume(ckpt, restore: Callable[[int], None], workdir, writer) -> int:
  """Restores the run from the newest complete checkpoint of `ckpt` (a
  `checkpointing.Checkpointer`) by calling `restore(step)`, moves aside what later steps wrote
  under `workdir` and purges `writer`'s (`summary.SummaryWriter`) events past it; returns the
  step."""
  for step in reversed(ckpt.all_steps()):
    try:
      restore(step)
    except checkpointing.BrokenCheckpoint as e:
      moved = ckpt.set_aside(step)
      logging.warning(
        "%s: moved to %s (kept, not deleted); resuming from the checkpoint before it", e, moved
      )
      continue
    if jax.process_index() == 0:
      discard_after(workdir, step)
      writer.purge_after(step)
    distributed.sync("resume files")
    return step
  raise checkpointing.CheckpointError(
    f"config.train.resume: no complete checkpoint in {ckpt.directory} (the broken ones "
    f"are in {ckpt.directory.parent / checkpointing.BROKEN_DIR}); give a new "
    "--config.workdir to start over"
  )


def discard_after(workdir, step: int) -> list[str]:
  """Moves what the run wrote for steps > `step` into <workdir>/superseded/ (see module doc);
  returns the files touched."""
  workdir = epath.Path(workdir)
  out = workdir / SUPERSEDED
  touched = []
  samples = workdir / "samples.jsonl"
  if samples.exists():
    keep, late = [], []
    for line in samples.read_text().splitlines(keepends=True):
      try:
        later = json.loads(line)["step"] > step
      except (ValueError, KeyError, TypeError):  # a line cut short by the kill
        later = True
      (late if later else keep).append(line)
    if late:
      out.mkdir(parents=True, exist_ok=True)
      with (out / "samples.jsonl").open("a") as f:
        f.write("".join(late))
      tmp = workdir / "samples.jsonl.tmp"
      tmp.write_text("".join(keep))
      tmp.replace(samples)  # a rename: a kill now leaves the old file or the new, never half
      touched.append(os.fspath(samples))
  for folder in (workdir / "eval", workdir / "eval" / "selection"):
    for path in sorted(folder.glob("step_*.jsonl")) if folder.is_dir() else []:
      m = _EVAL_FILE.search(path.name)
      if m and int(m.group(1)) > step:
        dest = out / folder.relative_to(workdir)
        dest.mkdir(parents=True, exist_ok=True)
        path.rename(dest / path.name)
        touched.append(os.fspath(path))
  if touched:
    logging.info(
      "resume at step %d: moved what later, lost steps wrote to %s: %s", step, out, touched
    )
  return touched
