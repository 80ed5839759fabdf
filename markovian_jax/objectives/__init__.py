"""The Markovian training objective: rewards, baselines/advantages, PG / PPO / KL terms.

Pure functions of arrays (jit-friendly; configuration is a hashable frozen dataclass, so it can be
a static argument). Arithmetic is float32 at least: bf16 inputs are upcast, float64 stays float64
(jax.enable_x64). Notation (docs/method.md#notation):

  N = Q * G sequences, question-major (sample i answers question i // G); K = CoT tokens;
  A = answer tokens; masks are bool or {0, 1} arrays ("valid token" / "active sequence").

One step's loss, for sequence i and CoT token t (docs/method.md#one-training-step):

  r_i   = reduce_t log pi(answer_t | <Redacted> prompt, CoT_i)       (rewards: reward_kind logprob;
                                                                   or prob / mean_token_prob)
  R_i   = r_i - b_q(i)     b = base model's score of its greedy CoT'   (rewards.normalized_reward)
  A_i   = (R_i - mean_g R) / (std_g R + 1e-8)  |  G/(G-1) (R_i - mean_g R)  |  R_i - V_ema  |  R_i
                                                          (baselines: group|rloo|ema[_batch]|none)
  l_it  = -lp_it * sg(A_i)                                      (losses: pg)
        | -min(rho_it * A_i, clip(rho_it, 1-eps, 1+eps) * A_i)    (ppo, rho = pi / behaviour)
        + kl_penalty * kl_it - entropy_bonus * H_it              (kl: full | k1 | k2 | k3)
  loss  = aggregate(l) - w * mean_i (r_i - sg(mu_g)) / sg(sigma_g)
          (the w term only with reward_grad="paper"; aggregate: reductions)

Modules, one job each:
  registry          Registry: name -> variant tables behind every choice tuple
  reductions        reduce_tokens, masked_mean, aggregate (REDUCTIONS, AGGREGATIONS)
  rewards           answer_reward, normalized_reward (REWARD_KINDS)
  baselines         group / rloo / ema / ema_batch / none advantages, EmaState, BaselineState
                    (BASELINES)
  expert_iteration  EiStats and the running-threshold mask
  kl                sampled KL estimators and the per-token KL term (KL_ESTIMATORS)
  losses            pg / ppo policy losses, the reward-gradient term (OBJECTIVES,
                    PPO_RATIO_REFERENCES, REWARD_GRADS)
  inputs            LossInputs, Targets
  config            ObjectiveConfig
  step              advantage_targets, loss_from_targets, markovian_loss
  answer_likelihood the answer-likelihood family's pieces (scores, no-reasoning subtraction,
                    transforms, shaping, advantages, the std filter, answer-term weights)
  methods           METHODS (VeriFree, RLPR, JEPO, LaTRO, NOVER, VR-CLI, DRO and their
                    `_markovian` twins), MethodConfig, method_targets, method_loss
                    (docs/answer-likelihood.md)

The exact full-vocabulary KL and entropy are computed with the log-probs, in
`markovian_jax.models.logprobs` (`full_kl`, `entropy`), and arrive here as LossInputs.kl / .entropy.

May import: nothing else in markovian_jax (pure functions of arrays).
"""

from markovian_jax.objectives.baselines import (
  BASELINE_REGISTRY,
  BASELINES,
  BaselineState,
  EmaState,
  ema_advantages,
  ema_batch_update,
  ema_update,
  group_advantages,
  group_stats,
  rloo_advantages,
)
from markovian_jax.objectives.config import ObjectiveConfig
from markovian_jax.objectives.expert_iteration import EiStats, ei_mask, ei_threshold, ei_update
from markovian_jax.objectives.inputs import LossInputs, Targets
from markovian_jax.objectives.kl import (
  KL_ESTIMATORS,
  SAMPLED_KL_ESTIMATORS,
  SAMPLED_KL_REGISTRY,
  kl_estimate,
  kl_per_token,
)
from markovian_jax.objectives.losses import (
  OBJECTIVES,
  POLICY_LOSS_REGISTRY,
  PPO_RATIO_REFERENCES,
  PPO_RATIO_REGISTRY,
  REWARD_GRAD_REGISTRY,
  REWARD_GRADS,
  PolicyTerm,
  pg_per_token,
  ppo_base_per_sequence,
  ppo_per_token,
)
from markovian_jax.objectives.methods import (
  METHOD_NAMES,
  METHODS,
  MethodConfig,
  MethodTargets,
  method_config,
  method_loss,
  method_loss_from_targets,
  method_of,
  method_targets,
)
from markovian_jax.objectives.reductions import (
  AGGREGATION_REGISTRY,
  AGGREGATIONS,
  REDUCTION_REGISTRY,
  REDUCTIONS,
  aggregate,
  masked_mean,
  reduce_tokens,
)
from markovian_jax.objectives.registry import Registry, check_choice
from markovian_jax.objectives.rewards import (
  REWARD_KIND_REGISTRY,
  REWARD_KINDS,
  answer_reward,
  broadcast_to_samples,
  normalized_reward,
)
from markovian_jax.objectives.step import advantage_targets, loss_from_targets, markovian_loss

__all__ = [
  # choice tuples
  "OBJECTIVES",
  "KL_ESTIMATORS",
  "SAMPLED_KL_ESTIMATORS",
  "REDUCTIONS",
  "AGGREGATIONS",
  "BASELINES",
  "REWARD_GRADS",
  "PPO_RATIO_REFERENCES",
  "REWARD_KINDS",
  # registries
  "Registry",
  "check_choice",
  "BASELINE_REGISTRY",
  "REWARD_KIND_REGISTRY",
  "POLICY_LOSS_REGISTRY",
  "PPO_RATIO_REGISTRY",
  "REWARD_GRAD_REGISTRY",
  "SAMPLED_KL_REGISTRY",
  "REDUCTION_REGISTRY",
  "AGGREGATION_REGISTRY",
  # configuration, containers, state
  "ObjectiveConfig",
  "LossInputs",
  "Targets",
  "BaselineState",
  "EmaState",
  "EiStats",
  "PolicyTerm",
  # the step
  "advantage_targets",
  "loss_from_targets",
  "markovian_loss",
  # building blocks
  "reduce_tokens",
  "masked_mean",
  "aggregate",
  "answer_reward",
  "broadcast_to_samples",
  "normalized_reward",
  "group_stats",
  "group_advantages",
  "rloo_advantages",
  "ema_update",
  "ema_batch_update",
  "ema_advantages",
  "ei_update",
  "ei_threshold",
  "ei_mask",
  "kl_estimate",
  "kl_per_token",
  "pg_per_token",
  "ppo_per_token",
  "ppo_base_per_sequence",
  # the answer-likelihood family
  "METHODS",
  "METHOD_NAMES",
  "MethodConfig",
  "MethodTargets",
  "method_config",
  "method_targets",
  "method_loss_from_targets",
  "method_loss",
  "method_of",
]
