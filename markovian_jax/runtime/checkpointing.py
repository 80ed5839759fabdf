"""Orbax checkpoints of a training run: LoRA, optimizer state and the run's JSON state.

Never the base weights (they are re-loaded from `config.model.path`). The JSON part holds the step,
the data cursor, the RNG key, the EMA/EI baseline state and the config, so `resume` continues a run
exactly. Retention: the latest `max_to_keep` checkpoints, plus the best one by validation score when
`keep_best` (checkpoints saved with an eval score compete for it).

Multi-process: every process calls `save` and `restore` (orbax writes and reads each process's
shards, process 0 the metadata and the JSON state). The directory may be local or a URI such as
gs://bucket/run/checkpoints (etils epath, which orbax itself uses); it must be one directory that
every process sees.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from markovian_jax.runtime.errors import CheckpointError


__all__ = ["CheckpointError", "Checkpointer"]


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
  multihost_utils.assert_equal(np.frombuffer(digest, np.uint8),
                               "the run state to checkpoint differs between processes")


def _score(metrics) -> float:
  return float(metrics["score"])


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with our three items: lora, opt_state, state."""

  def __init__(self, directory, *, max_to_keep: int = 3, keep_best: bool = True,
               create: bool = True):
    self.directory = absolute(directory)
    keep = [policies.LatestN(n=max_to_keep)]
    if keep_best:
      keep.append(policies.BestN(get_metric_fn=_score, n=1,
                                 keep_checkpoints_without_metrics=False))
    # best_fn makes orbax write each step's metrics to disk, so the score survives a restart and
    # `export --best` can read it; which steps are kept is the preservation policy's alone.
    options = ocp.CheckpointManagerOptions(
        create=create, preservation_policy=policies.AnyPreservationPolicy(keep), best_fn=_score,
        best_mode="max")
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("lora", "opt_state", "state"))

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, lora_params, opt_state, state: dict[str, Any],
           score: Optional[float] = None, force: bool = False) -> bool:
    """Saves collectively (every process calls it). `score`: validation metric, higher is better."""
    _check_same_everywhere(state)
    args = ocp.args.Composite(lora=ocp.args.StandardSave(lora_params),
                              opt_state=ocp.args.StandardSave(opt_state),
                              state=ocp.args.JsonSave(state))
    metrics = None if score is None else {"score": float(score)}
    saved = self._manager.save(step, args=args, metrics=metrics, force=force)
    self._manager.wait_until_finished()
    return saved

  def restore(self, step: Optional[int], lora_target, opt_target):
    """Restores into the shapes/dtypes/shardings of the targets (arrays or ShapeDtypeStructs).

    Returns (lora_params, opt_state, state dict).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoints in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"available: {self.all_steps()}")
    as_struct = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)
    out = self._manager.restore(step, args=ocp.args.Composite(
        lora=ocp.args.StandardRestore(as_struct(lora_target)),
        opt_state=ocp.args.StandardRestore(as_struct(opt_target)),
        state=ocp.args.JsonRestore()))
    return out["lora"], out["opt_state"], out["state"]

  def restore_state(self, step: Optional[int] = None) -> dict:
    """Only the JSON state (config, step, ...), e.g. to rebuild the LoRA shapes before restoring."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoints in {self.directory}")
    return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.JsonRestore()))["state"]

  def restore_lora(self, step: Optional[int], lora_target):
    """Only the LoRA tree (evaluation needs no optimizer state)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoints in {self.directory}")
    return self._manager.restore(step, args=ocp.args.Composite(
        lora=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, lora_target))
    ))["lora"]

  def close(self):
    self._manager.close()
