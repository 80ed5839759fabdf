"""Work that runs between training steps, every N steps: logging, samples, guards, evaluation,
checkpoints. The step itself (`pipeline`) knows none of it.

    trainer.add_hook(fn, every=100, name="eval", at_end=True)   # fn(info: StepInfo)

Hooks run in the order they were added, after the step whose count they divide. A hook can end
the round early (`info.halt = True`, e.g. a guard that rolled the run back to an earlier step, so
the hooks after it must not evaluate or checkpoint the discarded step) or stop the run by raising.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional


@dataclasses.dataclass
class StepInfo:
  """What the hooks see after a step.

  step: training steps completed (1 after the first step).
  scalars: this step's TensorBoard scalars, tag -> float.
  rollout: the step's pipeline.Rollout (CoT texts and tokens).
  last: the run's final step.
  halt: set by a hook to skip the hooks after it this round.
  """
  step: int
  scalars: dict
  rollout: Any = None
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
    return (info.step % self.every == 0 or (self.at_start and info.step == 1)
            or (self.at_end and info.last))


class Hooks:
  """An ordered list of hooks with their periods."""

  def __init__(self):
    self._hooks: list[Hook] = []

  def add(self, fn: Callable[[StepInfo], None], every: int = 1, *, name: Optional[str] = None,
          at_start: bool = False, at_end: bool = False) -> Hook:
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
