"""Stability guards, run as training hooks: non-finite updates and collapse signals.

A non-finite loss or gradient already leaves the LoRA and optimizer state unchanged inside the
update (`train_step.update`); `NonFiniteGuard` counts such steps and, after `train.nan_patience`
in a row, stops the run with the last good state saved or (`train.nonfinite_action=rollback`) rolls
back to the last checkpoint before the step and goes on with fresh data, up to
`train.max_rollbacks` times in a row. `CollapseGuard` watches the signals of the
collapse seen in the published runs (CoTs of "4444...", sequence-level PPO ratios of 21x, a
runaway KL) and, per
`train.collapse_action`, warns, stops with the state saved, or rolls back to the last checkpoint
before the step (moving on to fresh data) up to `train.max_rollbacks` times in a row.

The guards know nothing of the Trainer: they are given the callables they act through (save the
current state, roll back to a checkpoint, list the checkpointed steps, write a scalar).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from absl import logging

from markovian_jax.reporting import diagnoses
from markovian_jax.training.hooks import StepInfo

COLLAPSE_ACTIONS = ("warn", "stop", "rollback")  # config.train.collapse_action
NONFINITE_ACTIONS = ("stop", "rollback")  # config.train.nonfinite_action


class TrainingStopped(RuntimeError):
  """Training cannot continue (non-finite updates, collapse with action=stop)."""


def kl_scale(spec, scalars: Optional[dict] = None) -> float:
  """What policy/kl is in units of the per-token KL: 1 for `mean`; for the `sum` reduction, which
  aggregates the KL over a sequence's tokens, the CoT length: K, or the step's mean length
  (policy/cot_length in `scalars`) when EOS may end a CoT (sampling.cot_stops_at_eos)."""
  if spec.objective.loss.logprob_reduction != "sum":
    return 1.0
  length = float(spec.sampling.cot_length)
  if spec.sampling.cot_stops_at_eos and scalars:
    length = float(scalars.get("policy/cot_length", length))
  return max(length, 1.0)


def collapse_alarms(scalars: dict, spec) -> list[str]:
  """The collapse signals of one step's scalars above the thresholds of run spec `spec`.

  train.collapse_ppo_ratio applies to policy/ppo_seq_ratio_max, the largest per-sequence
  geometric-mean ratio (the quantity it was set on: the reference's sequence ratio to the base,
  21.75 in its collapsed ARC run), not to the per-token maximum, which multi-epoch PPO moves far
  from 1 token by token without anything collapsing; scalars without it are read as the report
  reads a run logged before it existed (`diagnoses.sequence_ratio_tag`). train.collapse_kl is
  nats per CoT token.
  """
  t = spec.train
  alarms = []
  rep = scalars.get("policy/repetition_rate", 0.0)
  if rep > t.collapse_repetition:
    alarms.append(f"repetition rate {rep:.2f} > {t.collapse_repetition}")
  o = spec.objective.loss
  tag = diagnoses.sequence_ratio_tag(
    "policy/ppo_seq_ratio_max" in scalars, o.ppo_ratio_reference, o.logprob_reduction
  )
  ratio = scalars.get(tag, 0.0)
  if ratio > t.collapse_ppo_ratio:
    alarms.append(f"PPO sequence ratio max {ratio:.1f} > {t.collapse_ppo_ratio:g}")
  kl, scale = scalars.get("policy/kl", 0.0), kl_scale(spec, scalars)
  if kl > t.collapse_kl * scale:
    per = f" ({kl / scale:.2f} per token)" if scale != 1 else ""
    alarms.append(f"KL {kl:.2f}{per} > {t.collapse_kl:g} per token")
  return alarms


def roll_back(
  info: StepInfo,
  msg: str,
  rollbacks: int,
  max_rollbacks: int,
  *,
  rollback: Callable[[int], None],
  saved_steps: Callable[[], list],
  still: str = "failing",
) -> bool:
  """Rolls the run back to its last checkpoint before `info.step` (rollback number `rollbacks` in
  a row) by calling `rollback(step)`; False when `saved_steps()` holds none before it. Raises
  TrainingStopped past `max_rollbacks`."""
  good = [s for s in saved_steps() if s < info.step]
  if not good:
    logging.warning(msg + "; no earlier checkpoint to roll back to")
    return False
  if rollbacks > max_rollbacks:
    raise TrainingStopped(
      msg + f"; still {still} after {max_rollbacks} rollbacks to step {good[-1]}: stopping"
    )
  rollback(good[-1])
  info.halt = True  # the rolled-back step is neither evaluated nor checkpointed
  logging.warning(msg + f"; rolled back to step {good[-1]}")
  return True


class NonFiniteGuard:
  """Acts after `patience` consecutive steps whose update was skipped as non-finite: stops the
  run (action "stop") or rolls back to the last checkpoint (action "rollback").

  save(): checkpoints the run's current state. rollback(step): restores checkpoint `step`,
  keeping the data cursor. saved_steps(): the checkpointed steps, ascending. checkpoint_every:
  train.checkpoint_every (a good step that reaches a checkpoint ends a run of rollbacks).
  """

  def __init__(
    self,
    *,
    save: Callable[[], Any],
    rollback: Callable[[int], None],
    saved_steps: Callable[[], list],
    checkpoint_every: int,
    patience: int,
    action: str = "stop",
    max_rollbacks: int = 3,
  ):
    self.save, self.rollback, self.saved_steps = save, rollback, saved_steps
    self.checkpoint_every, self.patience, self.count = checkpoint_every, patience, 0
    self.action, self.max_rollbacks, self.rollbacks = action, max_rollbacks, 0

  def __call__(self, info: StepInfo) -> None:
    if not info.scalars.get("guard/nonfinite_update"):
      self.count = 0
      if info.step % self.checkpoint_every == 0:
        self.rollbacks = 0  # a good step that reaches a checkpoint ends a run of rollbacks
      return
    self.count += 1
    logging.warning(
      "step %d: non-finite loss or gradient (loss=%s grad_norm=%s); update skipped (%d in a row)",
      info.step,
      info.scalars.get("train/loss"),
      info.scalars.get("train/grad_norm"),
      self.count,
    )
    if self.count < self.patience:
      return
    if self.action == "rollback":
      self.rollbacks += 1
      if roll_back(
        info,
        f"step {info.step}: {self.count} consecutive non-finite updates",
        self.rollbacks,
        self.max_rollbacks,
        rollback=self.rollback,
        saved_steps=self.saved_steps,
      ):
        self.count = 0
        return
    self.save()
    raise TrainingStopped(
      f"{self.count} consecutive non-finite updates at step {info.step}: "
      "stopping (last good state saved; see config.train.nan_patience)"
    )


class CollapseGuard:
  """Acts on collapse signals as `train.collapse_action` says (module docstring).

  spec: the run's RunSpec (thresholds in spec.train, the KL's units from the objective).
  write_scalars(step, {tag: value}): logs guard/collapse_alarm (1.0 on a step that alarmed).
  save, rollback, saved_steps: as `NonFiniteGuard`'s.
  """

  def __init__(
    self,
    spec,
    *,
    write_scalars: Callable[[int, dict], Any],
    save: Callable[[], Any],
    rollback: Callable[[int], None],
    saved_steps: Callable[[], list],
  ):
    self.run_spec, self.spec, self.rollbacks = spec, spec.train, 0
    self.write_scalars, self.save = write_scalars, save
    self.rollback, self.saved_steps = rollback, saved_steps

  def __call__(self, info: StepInfo) -> None:
    alarms = collapse_alarms(info.scalars, self.run_spec)
    self.write_scalars(info.step, {"guard/collapse_alarm": float(bool(alarms))})
    if not alarms:
      self.rollbacks = 0
      return
    msg = f"step {info.step}: collapse signal: " + "; ".join(alarms)
    action = self.spec.collapse_action
    if action == "warn":
      logging.warning(msg)
      return
    if action == "stop":
      self.save()
      raise TrainingStopped(msg + " (train.collapse_action=stop; state saved)")
    if any(s < info.step for s in self.saved_steps()):
      self.rollbacks += 1
    roll_back(
      info,
      msg,
      self.rollbacks,
      self.spec.max_rollbacks,
      rollback=self.rollback,
      saved_steps=self.saved_steps,
      still="collapsing",
    )
