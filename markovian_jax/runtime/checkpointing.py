"""Orbax checkpoints of a training run: LoRA, optimizer state and the run's JSON state; for a run
that keeps an EMA-lagged adapter copy (NOVER's scorer) that copy too, as the item "ema_lora".

Never the base weights (they are re-loaded from `config.model.path`). The JSON part holds the step,
the data cursor, the RNG key, the EMA/EI baseline state and the config, so `resume` continues a run
exactly. Retention: the latest `max_to_keep` checkpoints, plus the best one by validation score when
`keep_best` (checkpoints saved with an eval score compete for it).

Multi-process: every process calls `save` and `restore` (orbax writes and reads each process's
shards, process 0 the metadata and the JSON state). The directory may be local or a URI such as
gs://bucket/run/checkpoints (etils epath, which orbax itself uses); it must be one directory that
every process sees.

Faults: orbax writes each checkpoint into a temporary directory and renames it into place only when
complete, so a run killed mid-write leaves no half checkpoint among the steps. A checkpoint that was
complete and is damaged later (a truncated or missing array file, broken JSON) raises
BrokenCheckpoint naming the step; `set_aside` moves it out of the way without deleting it. A save
that runs out of disk space raises DiskFull naming the directory and the bytes the checkpoint needs.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging as pylogging
import os
import shutil
import sys
import time
from typing import Any, Optional

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from markovian_jax.runtime import faults
from markovian_jax.runtime.errors import CheckpointError, UserError, is_disk_full

__all__ = ["BrokenCheckpoint", "CheckpointError", "Checkpointer", "DiskFull"]

ITEMS = ("lora", "opt_state", "state")
# Saved only by a run whose method's scorer is an EMA copy of the adapter: checkpoints without it
# (every other run's, and those written before it existed) load as they always did.
EMA_ITEM = "ema_lora"
BROKEN_DIR = "broken_checkpoints"  # beside the checkpoints directory


class BrokenCheckpoint(CheckpointError):
  """A saved checkpoint whose files cannot be read as stored (truncated, missing, broken JSON)."""

  def __init__(self, step: int, directory, reason: str):
    self.step = step
    super().__init__(f"checkpoint step {step} in {directory} is broken ({reason})")


class DiskFull(UserError, OSError):
  """A checkpoint that did not fit on its filesystem."""


def run_disk_full(e: BaseException, workdir, step: int, saved: list) -> Optional[DiskFull]:
  """The one-line DiskFull for a full disk met outside a checkpoint write (samples, evaluation
  rows, TensorBoard, the run's config) in a run that has done `step` training steps; None when
  `e` is not a full disk. `saved`: the checkpoint steps on disk, which stay intact."""
  if isinstance(e, DiskFull) or not is_disk_full(e):
    return None
  what = getattr(e, "filename", None) or "a run file"
  return DiskFull(
    f"no space left on device writing {what} after step {step}: free space in {workdir} or give "
    f"the run another --config.workdir and resume; the checkpoints already there are intact: "
    f"{saved}"
  )


class _DropStorageErrors(pylogging.Filter):
  """Drops the log records of a failed read or write that we report ourselves in one line:
  orbax logs each failed file write with its TensorStore spec, and asyncio a traceback for every
  parallel read that failed after the first."""

  def filter(self, record) -> bool:
    text = record.getMessage()
    return not (
      "No space left on device" in text
      or "RESOURCE_EXHAUSTED" in text
      or "Task exception was never retrieved" in text
      or "Handler Commit operations" in text
      or "Save Finalize thread" in text
    )


@contextlib.contextmanager
def _reported_here():
  """Within: the storage errors above are not logged (the exception raised names them). A
  failed read also leaves orbax's other pending reads to die as 'unraisable' exceptions (a
  traceback each, printed as their coroutines are collected): those are dropped too."""
  drop = _DropStorageErrors()
  loggers = [pylogging.getLogger(n) for n in ("absl", "asyncio")]
  for logger in loggers:
    logger.addFilter(drop)
  hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
  failed = []  # the caller appends to it when it caught a failure itself
  try:
    yield failed
  except BaseException:
    failed.append(True)
    raise
  finally:
    if failed:
      gc.collect()  # abandoned reads end here, not later in someone else's output
      time.sleep(0.1)
      gc.collect()
    sys.unraisablehook = hook
    for logger in loggers:
      logger.removeFilter(drop)


def _short(e: BaseException) -> str:
  """The first sentence of an error; TensorStore appends its whole spec to every message."""
  text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text[:200]}"


def absolute(path) -> epath.Path:
  """`path` as an epath.Path: a URI (gs://...) as it is, a local path absolute (orbax wants
  that), never a URI turned into a local path as os.path.abspath would."""
  text = os.fspath(path)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _check_same_everywhere(state: dict) -> None:
  """Fails loudly when processes would save different run states (data cursor, RNG, ...): only
  process 0's copy is written, so a divergence would otherwise surface as a wrong resume."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).digest()
  multihost_utils.assert_equal(
    np.frombuffer(digest, np.uint8), "the run state to checkpoint differs between processes"
  )


def _score(metrics) -> float:
  return float(metrics["score"])


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with our three items: lora, opt_state, state (and
  ema_lora, for a run that keeps an EMA adapter copy)."""

  def __init__(
    self, directory, *, max_to_keep: int = 3, keep_best: bool = True, create: bool = True
  ):
    self.directory = absolute(directory)
    keep = [policies.LatestN(n=max_to_keep)]
    if keep_best:
      keep.append(policies.BestN(get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False))
    # best_fn makes orbax write each step's metrics to disk, so the score survives a restart and
    # `export --best` can read it; which steps are kept is the preservation policy's alone.
    options = ocp.CheckpointManagerOptions(
      create=create,
      preservation_policy=policies.AnyPreservationPolicy(keep),
      best_fn=_score,
      best_mode="max",
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=ITEMS + (EMA_ITEM,)
    )

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(
    self,
    step: int,
    lora_params,
    opt_state,
    state: dict[str, Any],
    score: Optional[float] = None,
    force: bool = False,
    ema_params=None,
  ) -> bool:
    """Saves collectively (every process calls it). `score`: validation metric, higher is better.
    `ema_params`: the EMA adapter copy's params tree (item ema_lora), or None to save none."""
    _check_same_everywhere(state)
    items = dict(
      lora=ocp.args.StandardSave(lora_params),
      opt_state=ocp.args.StandardSave(opt_state),
      state=ocp.args.JsonSave(state),
    )
    if ema_params is not None:
      items[EMA_ITEM] = ocp.args.StandardSave(ema_params)
    args = ocp.args.Composite(**items)
    metrics = None if score is None else {"score": float(score)}
    try:
      with _reported_here():
        saved = self._manager.save(step, args=args, metrics=metrics, force=force)
        faults.at("checkpoint", step, self.directory)  # tests only: mid-write, not finalised
        self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - anything else is re-raised as it was
      if not is_disk_full(e):
        raise
      need = sum(
        np.asarray(x).nbytes for x in jax.tree.leaves((lora_params, opt_state, ema_params))
      )
      need += len(json.dumps(state, default=str))
      free = (
        "" if "://" in str(self.directory) else f", {shutil.disk_usage(self.directory).free} free"
      )
      raise DiskFull(
        f"checkpoint of step {step} not saved: no space left on device in "
        f"{self.directory} (it needs about {need} bytes{free}); the checkpoints "
        f"already there are intact: {self.all_steps()}"
      ) from e
    return saved

  def _restore(self, step: int, args):
    """The manager's restore, with a damaged checkpoint reported as BrokenCheckpoint (a
    checkpoint that reads but does not fit the targets keeps orbax's error)."""
    with _reported_here() as failed:
      try:
        return self._manager.restore(step, args=args)
      except Exception as e:  # noqa: BLE001
        error = e
        failed.append(True)
      reason = self.broken(step)
      if reason is not None:
        error = None  # its traceback holds orbax's abandoned reads: let them go, quietly, here
    if error is not None:
      raise error
    raise BrokenCheckpoint(step, self.directory, reason)

  def broken(self, step: int) -> Optional[str]:
    """Why checkpoint `step` cannot be read as it was stored, or None when every item reads
    (arrays as host numpy arrays, independent of the run's shapes and devices)."""
    root = self.directory / str(step)
    arrays = ITEMS[:2] + ((EMA_ITEM,) if (root / EMA_ITEM).exists() else ())
    for item in arrays:
      try:
        handler = ocp.PyTreeCheckpointHandler()
        meta = handler.metadata(root / item).tree
        restore_args = jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
          meta,
          is_leaf=lambda x: hasattr(x, "shape"),
        )
        handler.restore(root / item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
      except Exception as e:  # noqa: BLE001 - whatever the storage layer raises
        return f"{item}: {_short(e)}"
    try:
      self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      return f"state: {_short(e)}"
    return None

  def set_aside(self, step: int) -> epath.Path:
    """Moves checkpoint `step` to <workdir>/broken_checkpoints/<step> (kept for the user to
    inspect or delete; a resumed run would otherwise collide with it when it saves that step).
    Process 0 moves it; every process then sees the steps without it."""
    target = self.directory.parent / BROKEN_DIR / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target = target.parent / f"{step}.{len(list(target.parent.iterdir()))}"
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()
    return target

  def restore(self, step: Optional[int], lora_target, opt_target):
    """Restores into the shapes/dtypes/shardings of the targets (arrays or ShapeDtypeStructs).

    Returns (lora_params, opt_state, state dict).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoints in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(
        f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}"
      )
    as_struct = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)
    out = self._restore(
      step,
      ocp.args.Composite(
        lora=ocp.args.StandardRestore(as_struct(lora_target)),
        opt_state=ocp.args.StandardRestore(as_struct(opt_target)),
        state=ocp.args.JsonRestore(),
      ),
    )
    return out["lora"], out["opt_state"], out["state"]

  def has_ema(self, step: int) -> bool:
    """Whether checkpoint `step` holds an EMA adapter copy (item ema_lora)."""
    return (self.directory / str(step) / EMA_ITEM).exists()

  def restore_ema(self, step: int, ema_target):
    """The EMA adapter copy's params of checkpoint `step`, into the shapes/dtypes/shardings of
    `ema_target`. A checkpoint saved without one raises CheckpointError (one line): its run kept
    no EMA copy, and a fresh one would silently score as another run."""
    if not self.has_ema(step):
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory} holds no EMA adapter copy "
        f"({EMA_ITEM}): it was saved by a run whose method's scorer is not an EMA copy, and "
        "this run's objective.method scores with one (nover); resume it with the method it "
        "was trained with, or give a new --config.workdir to start over"
      )
    return self._restore(
      step,
      ocp.args.Composite(
        **{
          EMA_ITEM: ocp.args.StandardRestore(
            jax.tree.map(ocp.utils.to_shape_dtype_struct, ema_target)
          )
        }
      ),
    )[EMA_ITEM]

  def restore_state(self, step: Optional[int] = None) -> dict:
    """Only the JSON state (config, step, ...), e.g. to rebuild the LoRA shapes before restoring."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoints in {self.directory}")
    return self._restore(step, ocp.args.Composite(state=ocp.args.JsonRestore()))["state"]

  def restore_lora(self, step: Optional[int], lora_target):
    """Only the LoRA tree (evaluation needs no optimizer state)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoints in {self.directory}")
    return self._restore(
      step,
      ocp.args.Composite(
        lora=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, lora_target))
      ),
    )["lora"]

  def close(self):
    self._manager.close()
