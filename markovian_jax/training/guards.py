"""Stability guards, run as training hooks: non-finite updates and collapse signals.

A non-finite loss or gradient already leaves the LoRA and optimizer state unchanged inside the
update (`train_step.update`); `NonFiniteGuard` counts such steps and stops the run, with the last
good state saved, after `train.nan_patience` in a row. `CollapseGuard` watches the signals of the
collapse seen in the published runs (CoTs of "4444...", sequence-level PPO ratios of 21x, a
runaway KL) and, per
`train.collapse_action`, warns, stops with the state saved, or rolls back to the last checkpoint
before the step (moving on to fresh data) up to `train.max_rollbacks` times in a row.
"""

from __future__ import annotations

from absl import logging

from markovian_jax.training.hooks import StepInfo

COLLAPSE_ACTIONS = ("warn", "stop", "rollback")  # config.train.collapse_action


class TrainingStopped(RuntimeError):
  """Training cannot continue (non-finite updates, collapse with action=stop)."""


def kl_scale(spec) -> float:
  """What policy/kl is in units of the per-token KL: 1 for `mean`, K (the CoT length) for the
  `sum` reduction, which aggregates the KL over a sequence's K tokens."""
  return (float(spec.sampling.cot_length) if spec.objective.loss.logprob_reduction == "sum"
          else 1.0)


def collapse_alarms(scalars: dict, spec) -> list[str]:
  """The collapse signals of one step's scalars above the thresholds of run spec `spec`.

  train.collapse_ppo_ratio applies to policy/ppo_seq_ratio_max, the largest per-sequence
  geometric-mean ratio (the quantity it was set on: the reference's sequence ratio to the base,
  21.75 in its collapsed ARC run), not to the per-token maximum, which multi-epoch PPO moves far
  from 1 token by token without anything collapsing. train.collapse_kl is nats per CoT token.
  """
  t = spec.train
  alarms = []
  rep = scalars.get("policy/repetition_rate", 0.0)
  if rep > t.collapse_repetition:
    alarms.append(f"repetition rate {rep:.2f} > {t.collapse_repetition}")
  ratio = scalars.get("policy/ppo_seq_ratio_max", 0.0)
  if ratio > t.collapse_ppo_ratio:
    alarms.append(f"PPO sequence ratio max {ratio:.1f} > {t.collapse_ppo_ratio:g}")
  kl, scale = scalars.get("policy/kl", 0.0), kl_scale(spec)
  if kl > t.collapse_kl * scale:
    per = f" ({kl / scale:.2f} per token)" if scale != 1 else ""
    alarms.append(f"KL {kl:.2f}{per} > {t.collapse_kl:g} per token")
  return alarms


class NonFiniteGuard:
  """Stops the run after `patience` consecutive steps whose update was skipped as non-finite."""

  def __init__(self, trainer, patience: int):
    self.trainer, self.patience, self.count = trainer, patience, 0

  def __call__(self, info: StepInfo) -> None:
    if not info.scalars.get("guard/nonfinite_update"):
      self.count = 0
      return
    self.count += 1
    logging.warning("step %d: non-finite loss or gradient (loss=%s grad_norm=%s); update skipped "
                    "(%d in a row)", info.step, info.scalars.get("train/loss"),
                    info.scalars.get("train/grad_norm"), self.count)
    if self.count >= self.patience:
      self.trainer.save()
      raise TrainingStopped(f"{self.count} consecutive non-finite updates at step {info.step}: "
                            "stopping (last good state saved; see config.train.nan_patience)")


class CollapseGuard:
  """Acts on collapse signals as `train.collapse_action` says (module docstring)."""

  def __init__(self, trainer, spec):
    """spec: the run's RunSpec (thresholds in spec.train, the KL's units from the objective)."""
    self.trainer, self.run_spec, self.spec, self.rollbacks = trainer, spec, spec.train, 0

  def __call__(self, info: StepInfo) -> None:
    alarms = collapse_alarms(info.scalars, self.run_spec)
    self.trainer.writer.scalars(info.step, {"guard/collapse_alarm": float(bool(alarms))})
    if not alarms:
      self.rollbacks = 0
      return
    msg = f"step {info.step}: collapse signal: " + "; ".join(alarms)
    action = self.spec.collapse_action
    if action == "warn":
      logging.warning(msg)
      return
    if action == "stop":
      self.trainer.save()
      raise TrainingStopped(msg + " (train.collapse_action=stop; state saved)")
    good = [s for s in self.trainer.ckpt.all_steps() if s < info.step]
    if not good:
      logging.warning(msg + "; no earlier checkpoint to roll back to")
      return
    self.rollbacks += 1
    if self.rollbacks > self.spec.max_rollbacks:
      raise TrainingStopped(msg + f"; still collapsing after {self.spec.max_rollbacks} rollbacks "
                            f"to step {good[-1]}: stopping")
    self.trainer.rollback(good[-1])
    info.halt = True  # the rolled-back step is neither evaluated nor checkpointed
    logging.warning(msg + f"; rolled back to step {good[-1]}")
