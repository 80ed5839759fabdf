"""ObjectiveConfig: the objective's settings, checked against the registered variants.

The choice tuples are defined once, in the module of their registry, and collected here:
  OBJECTIVES (kind), PPO_RATIO_REFERENCES, REWARD_GRADS (losses), KL_ESTIMATORS (kl),
  REDUCTIONS, AGGREGATIONS (reductions), BASELINES (baselines), REWARD_KINDS (rewards).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from markovian_jax.objectives.baselines import BASELINE_REGISTRY, BASELINES
from markovian_jax.objectives.kl import KL_ESTIMATORS
from markovian_jax.objectives.losses import (
  OBJECTIVES,
  PPO_RATIO_REFERENCES,
  REWARD_GRAD_REGISTRY,
  REWARD_GRADS,
)
from markovian_jax.objectives.reductions import AGGREGATIONS, REDUCTIONS
from markovian_jax.objectives.registry import check_choice
from markovian_jax.objectives.rewards import REWARD_KINDS

__all__ = [
  "ObjectiveConfig",
  "OBJECTIVES",
  "KL_ESTIMATORS",
  "REDUCTIONS",
  "AGGREGATIONS",
  "BASELINES",
  "REWARD_GRADS",
  "PPO_RATIO_REFERENCES",
  "REWARD_KINDS",
]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Objective settings (defaults: the reference's "Markovian" run made correct; docs/method.md).

  Frozen and hashable: pass it as a static argument under jit.

  kind: an OBJECTIVES name: `pg` (REINFORCE) or `ppo` (clipped, per token, vs the behaviour policy).
  kl_penalty / kl_estimator / kl_clamp: beta, `full` | k1 | k2 | k3, |log-ratio| bound (k*).
  entropy_bonus: coefficient of -H (0 = off).
  logprob_reduction: `mean` (reference) | `sum` (paper) over tokens, for the CoT terms and the
    `logprob` reward.
  reward_kind: a REWARD_KINDS name: `logprob` (reference) | `prob` | `mean_token_prob`
    (rewards.py); the base model's score b must use the same kind.
  loss_aggregation: `sequence_mean` | `token_mean` (see `aggregate`).
  normalize_reward: R = r - b.
  reward_grad / actor_reward_weight: `none` (reference: r carries no gradient) | `paper`
    (adds -w * mean((r - sg(mu)) / sg(sigma))); reward_sigma_floor bounds that 1/sigma scale.
    actor_reward_weight is that w and nothing else: with `none` it must stay 1.0 (the default;
    there is no term to weigh) and with `paper` it must be > 0 (0 is `none`). The reference's
    actor_reward_weight=0 run also switched who scores the reward and reads the answer: here
    those are their own knobs (objective.reward_scorer, eval.reader; variant `no_reward_grad`).
  baseline / group_size / advantage_eps / ema_decay: a BASELINES name (`group` | `rloo` | `ema` |
    `ema_batch` | `none`) and its settings; ema_decay is per example for `ema` (the reference)
    and per step for `ema_batch`.
  ei_std / ei_skip_initial: expert iteration threshold k (None = off) and warm-up batches.
  ppo_eps / ppo_log_ratio_clamp / ppo_ratio_reference: clip range, exp guard, `behaviour` | `base`.
  method: "" (the Markovian objective above) or an answer-likelihood method name
    (objectives/methods.py METHOD_NAMES; docs/answer-likelihood.md): its MethodConfig
    (`methods.method_of`) then decides rewards, advantages and the answer term, and its policy
    loss is this config with the method's settings.
  scorer_ema_decay / scorer_ema_every: a method whose scorer is `ema` (NOVER): the weight d of
    the old copy in copy <- d * copy + (1 - d) * policy over the adapter's params, applied after
    every `scorer_ema_every`-th optimizer step (the trainer keeps the copy; the loss does not
    read these).
  method_answer_weight / method_length_penalty: a method's answer-term weight (VeriFree's factor,
    JEPO's beta_sup, LaTRO's weight: 0 in its released code, 1 in its paper) and DRO's length
    penalty coefficient; -1 keeps the method's own value (objectives/methods.py METHODS).
  """

  kind: str = "pg"
  kl_penalty: float = 0.1
  kl_estimator: str = "full"
  kl_clamp: Optional[float] = 20.0
  entropy_bonus: float = 0.0
  logprob_reduction: str = "mean"
  reward_kind: str = "logprob"
  loss_aggregation: str = "sequence_mean"
  normalize_reward: bool = True
  reward_grad: str = "none"
  actor_reward_weight: float = 1.0
  reward_sigma_floor: float = 1e-2
  baseline: str = "group"
  group_size: int = 12
  advantage_eps: float = 1e-8
  ema_decay: float = 0.9
  ei_std: Optional[float] = None
  ei_skip_initial: int = 25
  ppo_eps: float = 0.2
  ppo_log_ratio_clamp: Optional[float] = 20.0
  ppo_ratio_reference: str = "behaviour"
  method: str = ""
  scorer_ema_decay: float = 0.6
  scorer_ema_every: int = 100
  method_answer_weight: float = -1.0
  method_length_penalty: float = -1.0

  def __post_init__(self):
    check_choice("objective kind", self.kind, OBJECTIVES)
    check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
    check_choice("logprob_reduction", self.logprob_reduction, REDUCTIONS)
    check_choice("reward_kind", self.reward_kind, REWARD_KINDS)
    check_choice("loss_aggregation", self.loss_aggregation, AGGREGATIONS)
    check_choice("reward_grad", self.reward_grad, REWARD_GRADS)
    check_choice("baseline", self.baseline, BASELINES)
    check_choice("ppo_ratio_reference", self.ppo_ratio_reference, PPO_RATIO_REFERENCES)
    if self.method:
      # Imported here: methods.py builds on this module.
      from markovian_jax.objectives import methods

      methods.split_name(self.method)

    def need(ok: bool, field: str, what: str):
      if not ok:
        raise ValueError(f"ObjectiveConfig.{field}: {what}, got {getattr(self, field)!r}")

    def finite(field):
      v = getattr(self, field)
      need(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        field,
        "must be a finite number",
      )

    for f in (
      "kl_penalty",
      "entropy_bonus",
      "actor_reward_weight",
      "reward_sigma_floor",
      "advantage_eps",
      "ema_decay",
      "ppo_eps",
      "scorer_ema_decay",
      "method_answer_weight",
      "method_length_penalty",
    ):
      finite(f)
    for f in ("group_size", "ei_skip_initial", "scorer_ema_every"):
      v = getattr(self, f)
      need(isinstance(v, int) and not isinstance(v, bool), f, "must be an integer")
    need(self.kl_penalty >= 0, "kl_penalty", "must be >= 0")
    need(self.actor_reward_weight >= 0, "actor_reward_weight", "must be >= 0")
    if self.reward_grad == "none" and self.actor_reward_weight != 1.0:
      need(
        False,
        "actor_reward_weight",
        "weighs the reward-gradient term, which only reward_grad='paper' adds (set "
        "objective.reward_grad='paper'); with reward_grad='none' every weight trains the same. "
        "The reference's weight-0 run (frozen model scores the reward and reads the answer) "
        "is objective.reward_scorer='base' with eval.reader='base' (config variant "
        "no_reward_grad)",
      )
    if self.reward_grad != "none" and self.actor_reward_weight == 0:
      need(
        False,
        "actor_reward_weight",
        f"0 turns off the term reward_grad={self.reward_grad!r} adds; set "
        "objective.reward_grad='none' instead",
      )
    need(self.reward_sigma_floor >= 0, "reward_sigma_floor", "must be >= 0")
    need(self.advantage_eps >= 0, "advantage_eps", "must be >= 0")
    need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    need(0 < self.ppo_eps < 1, "ppo_eps", "must be in (0, 1)")
    need(0 <= self.scorer_ema_decay <= 1, "scorer_ema_decay", "must be in [0, 1]")
    need(self.scorer_ema_every >= 1, "scorer_ema_every", "must be >= 1")
    for f in ("method_answer_weight", "method_length_penalty"):
      v = getattr(self, f)
      need(v == -1 or v >= 0, f, "must be >= 0, or -1 for the method's own value")
    need(self.group_size >= 1, "group_size", "must be >= 1")
    need(self.ei_skip_initial >= 0, "ei_skip_initial", "must be >= 0")
    for f in ("kl_clamp", "ppo_log_ratio_clamp"):
      v = getattr(self, f)
      need(v is None or (isinstance(v, (int, float)) and v > 0), f, "must be None or > 0")
    need(
      self.ei_std is None or (isinstance(self.ei_std, (int, float)) and math.isfinite(self.ei_std)),
      "ei_std",
      "must be None (off) or a finite number of standard deviations",
    )
    for field, least in self._group_needs():
      need(
        self.group_size >= least,
        "group_size",
        f"{field}={getattr(self, field)!r} needs >= {least} samples per question",
      )

  def _group_needs(self) -> list[tuple[str, int]]:
    # Variants that standardise or average within a question's group declare how many samples
    # they need when registered (`min_group_size`).
    needs = []
    for field, registry in (("baseline", BASELINE_REGISTRY), ("reward_grad", REWARD_GRAD_REGISTRY)):
      least = registry.meta[getattr(self, field)].get("min_group_size", 1)
      if least > 1:
        needs.append((field, least))
    return needs

  @property
  def uses_groups(self) -> bool:
    """Whether a chosen variant works within each question's G samples (N must be Q * G)."""
    return bool(self._group_needs())
