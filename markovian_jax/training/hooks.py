"""Work that runs between training steps, every N steps: logging, samples, guards, evaluation,
checkpoints. The step itself (`pipeline`) knows none of it.

    trainer.add_hook(fn, every=100, name="eval", at_end=True)   # fn(info: StepInfo)

A hook reads what it needs from its `StepInfo`: the run's state after the step (`info.state`, a
`training.state.TrainState`) and the step's outputs (rollout, scores, targets, per-update
metrics); the default hooks are wired by `markovian_jax.trainer.add_default_hooks`, which the
train CLI calls. Hooks run in the order they were added, after the step whose count they divide,
and later hooks see what earlier ones set (the evaluation hook's `info.eval` is the score the
checkpoint hook saves with). A hook can end the round early (`info.halt = True`, e.g. a guard that
rolled the run back to an earlier step, so the hooks after it must not evaluate or checkpoint the
discarded step) or stop the run by raising.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation of the adapter at `step`: `score`, the selection split's primary score (it
  ranks checkpoints for train.keep_best), and `summary`, the reported test split's summary."""

  step: int
  score: float
  summary: dict


@dataclasses.dataclass
class StepInfo:
  """What the hooks see after a step.

  step: training steps completed (1 after the first step); `state.step` when a state is given.
  scalars: this step's TensorBoard scalars, tag -> float.
  state: the run's `TrainState` after the step (adapter, optimizer state, rng, baseline state).
  rollout: the step's pipeline.Rollout (CoT texts and tokens, host arrays).
  scores: the step's pipeline.Scores (rewards r float32 [N] on the device, baseline b [Q]).
  targets: the step's objectives.Targets (advantages float32 [N], ...).
  updates: one dict of float metrics per optimizer update (empty when none was made).
  eval: set by the evaluation hook when it ran this round.
  last: the run's final step.
  halt: set by a hook to skip the hooks after it this round.
  """

  step: int
  scalars: dict
  state: Any = None
  rollout: Any = None
  scores: Any = None
  targets: Any = None
  updates: list = dataclasses.field(default_factory=list)
  eval: Optional[Evaluation] = None
  last: bool = False
  halt: bool = False


@dataclasses.dataclass(frozen=True)
class Hook:
  fn: Callable[[StepInfo], None]
  every: int
  name: str
  at_start: bool = False  # also after the first step
  at_end: bool = False  # also after the final step

  def due(self, info: StepInfo) -> bool:
    return (
      info.step % self.every == 0
      or (self.at_start and info.step == 1)
      or (self.at_end and info.last)
    )


class Hooks:
  """An ordered list of hooks with their periods."""

  def __init__(self):
    self._hooks: list[Hook] = []

  def add(
    self,
    fn: Callable[[StepInfo], None],
    every: int = 1,
    *,
    name: Optional[str] = None,
    at_start: bool = False,
    at_end: bool = False,
  ) -> Hook:
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"hook {name or fn}: every must be a positive integer, got {every!r}")
    hook = Hook(fn, every, name or getattr(fn, "__name__", "hook"), at_start, at_end)
    self._hooks.append(hook)
    return hook

  @property
  def names(self) -> list[str]:
    return [h.name for h in self._hooks]

  def run(self, info: StepInfo) -> None:
    for hook in self._hooks:
      if hook.due(info):
        hook.fn(info)
        if info.halt:
          return
