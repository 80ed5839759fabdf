"""One step of the objective: advantages once per step, then the differentiable loss.

  r_i   = answer_reward(answer log-probs_i)                         (rewards.py, reward_kind)
  R_i   = r_i - b_q(i)                                              (normalize_reward)
  A_i   = baseline(R)_i                                             (baselines.py)
  a_i   = R_i > mean + k * std of past R   (expert iteration; all True when off)
  l_it  = policy loss (pg | ppo, losses.py) + kl_penalty * kl_it - entropy_bonus * H_it
  loss  = aggregate over active i of l  - w * mean_{i active} (r_i - sg(mu_g)) / sg(sigma_g)
          (the w term only with reward_grad="paper")

`reduce_t` (`logprob_reduction`: `mean` the reference code, `sum` the paper) applies to every
per-token term, so `-mean_t(lp_it) * A_i` (reference) and `-sum_t(lp_it) * A_i` (paper: the
log-probability of the whole CoT) are both the per-sequence PG loss.

The step splits in two so that PPO can make several passes over minibatches with one set of
advantages and one baseline-state update per step: `advantage_targets` (no gradient, once per step,
on the whole batch; jit-able with the config static) and `loss_from_targets` (differentiable, per
(mini)batch). `markovian_loss` composes them for the common single-pass case.

Metrics are float32 scalars, emitted only where the config makes them meaningful: always
reward_mean, normalized_reward_mean, advantage_{mean,std,min,max}, loss, pg_loss; kl / entropy /
behaviour_logprob_diff_{mean,max} when the inputs carry them; frac_reward_zero_std for group
baselines; ema_baseline for `ema` and `ema_batch`; ei_threshold and active_fraction with expert
iteration; ppo_ratio_{mean,max}, ppo_seq_ratio_max (the largest per-sequence geometric-mean ratio)
and ppo_clip_fraction for `ppo`; reward_grad_loss for reward_grad="paper".
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from markovian_jax.objectives import losses
from markovian_jax.objectives.baselines import BASELINE_REGISTRY, BaselineState
from markovian_jax.objectives.config import ObjectiveConfig
from markovian_jax.objectives.expert_iteration import ei_threshold, ei_update
from markovian_jax.objectives.inputs import LossInputs, Targets, check_shape, require
from markovian_jax.objectives.kl import kl_per_token
from markovian_jax.objectives.reductions import aggregate, f32, masked_mean
from markovian_jax.objectives.rewards import answer_reward, normalized_reward


def advantage_targets(
  rewards: jax.Array,
  baseline_scores: Optional[jax.Array],
  cfg: ObjectiveConfig,
  state: Optional[BaselineState] = None,
) -> tuple[Targets, BaselineState, dict]:
  """Advantages, the expert-iteration mask and the reward standardisation for one step.

  jit-compatible with `cfg` static (`jax.jit(advantage_targets, static_argnums=2)`): every branch
  is on the config or on shapes. With expert iteration on, metrics["active_fraction"] is the
  float32 fraction of samples kept; at 0 (e.g. during the warm-up) the caller should skip the
  optimizer update, as the reference does (`jnp.any(targets.active)` is the same test in jit).

  Args:
    rewards: [N] float r (answer_reward); treated as a constant here.
    baseline_scores: [N] or [Q] float b, or None when not normalize_reward.
    cfg: ObjectiveConfig.
    state: BaselineState before this step (None = fresh).

  Returns:
    (Targets, the BaselineState after this step, metrics dict of float32 scalars).
  """
  state = BaselineState.init() if state is None else state
  r = jax.lax.stop_gradient(f32(rewards))
  if r.ndim != 1:
    raise ValueError(f"rewards must be [N], got shape {r.shape}")
  n = r.shape[0]
  if cfg.uses_groups and n % cfg.group_size:
    raise ValueError(f"{n} samples do not split into groups of {cfg.group_size}")
  big_r = normalized_reward(
    r,
    None if baseline_scores is None else jax.lax.stop_gradient(baseline_scores),
    cfg.normalize_reward,
    cfg.group_size,
  )
  metrics = {"reward_mean": jnp.mean(r), "normalized_reward_mean": jnp.mean(big_r)}

  adv, ema, baseline_metrics = BASELINE_REGISTRY.lookup(cfg.baseline)(big_r, state.ema, cfg)
  metrics.update(baseline_metrics)

  ei = state.ei
  if cfg.ei_std is None:
    active = jnp.ones((n,), bool)
  else:
    threshold = ei_threshold(ei, cfg.ei_std, cfg.ei_skip_initial)
    active = big_r > threshold
    ei = ei_update(ei, big_r)
    metrics.update(ei_threshold=threshold, active_fraction=jnp.mean(active.astype(jnp.float32)))

  mu, scale = losses.reward_standardisation(r, cfg)
  metrics.update(
    advantage_mean=jnp.mean(adv),
    advantage_std=jnp.std(adv),
    advantage_min=jnp.min(adv),
    advantage_max=jnp.max(adv),
  )
  return Targets(adv, active, mu, scale), state._replace(ema=ema, ei=ei), metrics


def _check_inputs(inputs: LossInputs, targets: Targets) -> None:
  shape = jnp.shape(inputs.cot_logprobs)
  if len(shape) != 2:
    raise ValueError(f"cot_logprobs must be [N, K], got shape {shape}")
  n = shape[0]
  for name in ("cot_mask", "behaviour_logprobs", "ref_logprobs", "kl", "entropy"):
    check_shape(name, getattr(inputs, name), shape)
  check_shape("answer_mask", inputs.answer_mask, jnp.shape(inputs.answer_logprobs))
  if jnp.shape(inputs.answer_logprobs)[0] != n:
    raise ValueError(
      f"answer_logprobs has {jnp.shape(inputs.answer_logprobs)[0]} rows, cot_logprobs {n}"
    )
  for name, x in zip(Targets._fields, targets):
    check_shape(f"targets.{name}", x, (n,))


def loss_from_targets(
  inputs: LossInputs, targets: Targets, cfg: ObjectiveConfig
) -> tuple[jax.Array, dict]:
  """The differentiable loss of one (mini)batch given the step's Targets.

  Every term is averaged over the active (expert-iteration) sequences, as the reference masks the
  whole per-sample loss; KL/entropy *metrics* cover all sequences, to watch for drift. With no
  active sequence the loss is exactly 0.

  Args:
    inputs: LossInputs for these N sequences.
    targets: Targets rows for the same sequences.
    cfg: ObjectiveConfig.

  Returns:
    (float32 scalar loss, metrics dict of float32 scalars, `loss` among them).
  """
  _check_inputs(inputs, targets)
  mask, red, mode = inputs.cot_mask, cfg.logprob_reduction, cfg.loss_aggregation
  agg = lambda x: aggregate(x, mask, mode, red, targets.active)  # noqa: E731
  metrics = {}

  kl_tok = kl_per_token(inputs, cfg)
  if kl_tok is not None:
    metrics["kl"] = aggregate(kl_tok, mask, mode, red)
  if cfg.entropy_bonus != 0:
    require(inputs, "entropy", "entropy_bonus != 0")
  if inputs.entropy is not None:
    metrics["entropy"] = aggregate(inputs.entropy, mask, mode, red)

  if inputs.behaviour_logprobs is not None:
    # Sampler/trainer disagreement on the same tokens: PPO's first-pass ratio is exp of it.
    valid = jnp.asarray(mask).astype(bool)
    diff = jnp.abs(f32(inputs.cot_logprobs) - f32(inputs.behaviour_logprobs))
    metrics["behaviour_logprob_diff_mean"] = masked_mean(diff, valid)
    metrics["behaviour_logprob_diff_max"] = jnp.max(jnp.where(valid, diff, 0.0))

  policy = losses.POLICY_LOSS_REGISTRY.lookup(cfg.kind)(inputs, targets, cfg, agg)
  metrics.update(policy.metrics)
  metrics["pg_loss"] = policy.loss
  total = policy.loss
  if not policy.standalone:
    if cfg.kl_penalty > 0:
      total = total + cfg.kl_penalty * agg(kl_tok)
    if cfg.entropy_bonus != 0:
      total = total - cfg.entropy_bonus * agg(f32(inputs.entropy))
    if losses.has_reward_gradient(cfg):
      r = answer_reward(inputs.answer_logprobs, inputs.answer_mask, red, cfg.reward_kind)
      reward_term = losses.reward_gradient_term(r, targets, cfg)
      metrics["reward_grad_loss"] = reward_term
      total = total + reward_term

  metrics["loss"] = total
  return total, metrics


def markovian_loss(
  inputs: LossInputs, cfg: ObjectiveConfig, state: Optional[BaselineState] = None
) -> tuple[jax.Array, tuple[dict, BaselineState]]:
  """The whole objective of one batch: `advantage_targets` then `loss_from_targets`.

  For `jax.value_and_grad(..., has_aux=True)`: differentiate w.r.t. whatever produced
  `inputs.cot_logprobs` / `kl` / `entropy` (and `answer_logprobs` with reward_grad="paper").
  The reward enters the advantages only through stop_gradient, so with reward_grad="none" the
  answer log-probs get an exactly zero gradient (the reference's behaviour).

  Args:
    inputs: LossInputs of the whole step's batch (N = Q * G, question-major).
    cfg: ObjectiveConfig (static under jit).
    state: BaselineState before this step (EMA / expert iteration); None = fresh.

  Returns:
    (loss, (metrics, new_state)): float32 scalar loss, dict of float32 scalars (both functions'
    metrics, step module docstring), and the BaselineState to carry to the next step.
  """
  r = answer_reward(
    inputs.answer_logprobs, inputs.answer_mask, cfg.logprob_reduction, cfg.reward_kind
  )
  targets, new_state, metrics = advantage_targets(r, inputs.baseline_scores, cfg, state)
  loss, loss_metrics = loss_from_targets(inputs, targets, cfg)
  return loss, ({**metrics, **loss_metrics}, new_state)
