"""Policy-gradient losses and the paper's reward-gradient term (docs/method.md#policy-losses).

For sequence i and CoT token t, with A_i the step's advantages (never differentiated):

  pg    l_it = -lp_it * sg(A_i)                                       (REINFORCE)
  ppo   l_it = -min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i),  rho_it = pi / sg(behaviour)
  ppo with ppo_ratio_reference="base" (the reference's variant, reproduction only):
        l_i  = -min(rho_i A_i, clip(rho_i, 1-eps, 1+eps) A_i),    rho_i = exp(lp_i - lp_base_i)
        on per-sequence reduced log-probs; it replaces every other term (no KL, entropy, reward
        gradient), as the reference's calculate_losses did.

  reward_grad="paper":  -w * mean_{i active} (r_i - sg(mu_g)) / sg(max(sigma_g, floor) + eps)
        with mu_g, sigma_g the mean and unbiased std of r over sample i's group (r of any
        reward_kind, differentiated through the scorer's answer log-probs).

Registries (each variant one decorated function; the choice tuple is the registry's keys):
  POLICY_LOSS_REGISTRY[kind](inputs, targets, cfg, agg) -> PolicyTerm, where agg maps an [N, K]
    per-token term to the configured scalar aggregate over the active sequences.
  PPO_RATIO_REGISTRY[ppo_ratio_reference](inputs, targets, cfg, agg) -> PolicyTerm (kind="ppo").
  REWARD_GRAD_REGISTRY[reward_grad](r [N], cfg) -> (mu [N], scale [N]), the standardisation of
    the reward-gradient term, or the value None for no term.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from markovian_jax.objectives.baselines import group_stats
from markovian_jax.objectives.inputs import LossInputs, Targets, require
from markovian_jax.objectives.reductions import f32, masked_mean, reduce_tokens
from markovian_jax.objectives.registry import Registry

POLICY_LOSS_REGISTRY = Registry("objective kind")
PPO_RATIO_REGISTRY = Registry("ppo_ratio_reference")
REWARD_GRAD_REGISTRY = Registry("reward_grad")


class PolicyTerm(NamedTuple):
  """A policy loss: float32 scalar `loss` (aggregated over the active sequences), its float32
  scalar `metrics`, and `standalone` (static bool): True when it replaces the KL, entropy and
  reward-gradient terms."""

  loss: jax.Array
  metrics: dict
  standalone: bool = False


# ----------------------------------------------------------------------------- per-token terms


def pg_per_token(logprobs: jax.Array, advantages: jax.Array) -> jax.Array:
  """REINFORCE: l_it = -lp_it * sg(A_i); aggregated with `mean` it is -mean_t(lp_it) * A_i.

  Args:
    logprobs: [N, K] float per-token CoT log-probs under pi (temperature-scaled logits), with grad.
    advantages: [N] float A (never differentiated).

  Returns:
    float32 [N, K].
  """
  return -f32(logprobs) * jax.lax.stop_gradient(f32(advantages))[:, None]


def ppo_per_token(
  logprobs: jax.Array,
  old_logprobs: jax.Array,
  advantages: jax.Array,
  eps: float = 0.2,
  log_ratio_clamp: Optional[float] = 20.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Clipped surrogate per token against the behaviour (sampling) policy.

  Where the clipped branch is the smaller objective (A > 0 and rho > 1+eps, or A < 0 and
  rho < 1-eps) the gradient is exactly zero: the update stops once it moved that token's
  probability far enough in the advantage's direction. On the first pass after sampling rho = 1 and
  this is the PG loss (up to sampler/trainer numerics). The log-ratio clamp (+-20) only guards
  exp() against overflow to inf (and inf * 0 = NaN gradients) when the two log-probs disagree
  wildly, e.g. a token the trainer finds impossible.

  Args:
    logprobs: [N, K] float current policy log-probs of the sampled tokens, with grad.
    old_logprobs: [N, K] float behaviour log-probs (from the sampler, same temperature).
    advantages: [N] float A.
    eps: clip range.
    log_ratio_clamp: bound on |log rho| before exp (None: no clamp).

  Returns:
    (per-token loss, ratio, clipped) -- float32 [N, K], float32 [N, K], bool [N, K]
    (`clipped`: the clipped branch is active, i.e. the token gets no gradient).
  """
  log_ratio = f32(logprobs) - jax.lax.stop_gradient(f32(old_logprobs))
  if log_ratio_clamp is not None:
    log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
  ratio = jnp.exp(log_ratio)
  adv = jax.lax.stop_gradient(f32(advantages))[:, None]
  unclipped = -ratio * adv
  clipped = -jnp.clip(ratio, 1.0 - eps, 1.0 + eps) * adv
  return jnp.maximum(unclipped, clipped), ratio, clipped > unclipped


def ppo_base_per_sequence(
  seq_logprobs: jax.Array,
  seq_ref_logprobs: jax.Array,
  advantages: jax.Array,
  eps: float = 0.2,
  log_ratio_clamp: Optional[float] = 20.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The reference's PPO, for reproduction only: one ratio per sequence against the frozen base.

  With mean-reduced log-probs (the reference) rho_i is a geometric-mean token ratio. It is a trust
  region around the base model rather than PPO: once mean_t log(pi/base) > log(1+eps) = 0.18 nats,
  positive advantages stop pushing, whatever the sampling policy was. The reference run with it
  collapsed (docs/reference-differences.md#ppo-ratio).

  Args:
    seq_logprobs: [N] float reduced CoT log-prob under pi, with grad.
    seq_ref_logprobs: [N] float the same under the base model.
    advantages: [N] float A.

  Returns:
    (per-sequence loss float32 [N], ratio float32 [N], clipped bool [N]).
  """
  per_token, ratio, clipped = ppo_per_token(
    f32(seq_logprobs)[:, None], f32(seq_ref_logprobs)[:, None], advantages, eps, log_ratio_clamp
  )
  return per_token[:, 0], ratio[:, 0], clipped[:, 0]


# ----------------------------------------------------------------------------- policy losses

Aggregate = Callable[[jax.Array], jax.Array]


@POLICY_LOSS_REGISTRY.register("pg")
def _pg(inputs: LossInputs, targets: Targets, cfg, agg: Aggregate) -> PolicyTerm:
  return PolicyTerm(agg(pg_per_token(inputs.cot_logprobs, targets.advantages)), {})


@POLICY_LOSS_REGISTRY.register("ppo")
def _ppo(inputs: LossInputs, targets: Targets, cfg, agg: Aggregate) -> PolicyTerm:
  return PPO_RATIO_REGISTRY.lookup(cfg.ppo_ratio_reference)(inputs, targets, cfg, agg)


@PPO_RATIO_REGISTRY.register("behaviour")
def _ppo_behaviour(inputs: LossInputs, targets: Targets, cfg, agg: Aggregate) -> PolicyTerm:
  require(inputs, "behaviour_logprobs", "kind='ppo'")
  tok, ratio, clipped = ppo_per_token(
    inputs.cot_logprobs,
    inputs.behaviour_logprobs,
    targets.advantages,
    cfg.ppo_eps,
    cfg.ppo_log_ratio_clamp,
  )
  valid = jnp.asarray(inputs.cot_mask).astype(bool)
  metrics = dict(
    ppo_ratio_mean=masked_mean(ratio, valid),
    ppo_ratio_max=jnp.max(jnp.where(valid, ratio, 0.0)),
    ppo_seq_ratio_max=sequence_ratio_max(inputs.cot_logprobs, inputs.behaviour_logprobs, valid),
    ppo_clip_fraction=masked_mean(clipped, valid & targets.active[:, None]),
  )
  return PolicyTerm(agg(tok), metrics)


def sequence_ratio_max(
  logprobs: jax.Array, other_logprobs: jax.Array, mask: jax.Array
) -> jax.Array:
  """float32 scalar max_i exp(mean_t (lp_it - other_it)): the largest per-sequence geometric-mean
  token ratio, the quantity of the reference's PPO ratio (and of the collapse threshold set on
  it), whatever the ratio's reference and logprob_reduction. [N, K] log-probs, [N, K] mask."""
  d = reduce_tokens(jax.lax.stop_gradient(f32(logprobs) - f32(other_logprobs)), mask, "mean")
  return jnp.max(jnp.exp(jnp.minimum(d, 80.0)))


@PPO_RATIO_REGISTRY.register("base")
def _ppo_base(inputs: LossInputs, targets: Targets, cfg, agg: Aggregate) -> PolicyTerm:
  del agg  # one term per sequence: averaged over the active sequences directly
  require(inputs, "ref_logprobs", "ppo_ratio_reference='base'")
  red = cfg.logprob_reduction
  seq_loss, ratio, clipped = ppo_base_per_sequence(
    reduce_tokens(inputs.cot_logprobs, inputs.cot_mask, red),
    reduce_tokens(inputs.ref_logprobs, inputs.cot_mask, red),
    targets.advantages,
    cfg.ppo_eps,
    cfg.ppo_log_ratio_clamp,
  )
  metrics = dict(
    ppo_ratio_mean=jnp.mean(ratio),
    ppo_ratio_max=jnp.max(ratio),
    ppo_seq_ratio_max=sequence_ratio_max(inputs.cot_logprobs, inputs.ref_logprobs, inputs.cot_mask),
    ppo_clip_fraction=jnp.mean(clipped.astype(jnp.float32)),
  )
  return PolicyTerm(masked_mean(seq_loss, targets.active), metrics, standalone=True)


OBJECTIVES = tuple(POLICY_LOSS_REGISTRY)
PPO_RATIO_REFERENCES = tuple(PPO_RATIO_REGISTRY)


# ----------------------------------------------------------------------------- reward gradient

REWARD_GRAD_REGISTRY.add("none", None)  # the reference: r enters only through sg(A)


@REWARD_GRAD_REGISTRY.register("paper", min_group_size=2)
def _paper_standardisation(r: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
  mu, sigma = group_stats(r, cfg.group_size)
  # The floor bounds 1/sigma: a group of near-equal rewards would otherwise blow the term up.
  return mu, jnp.maximum(sigma, cfg.reward_sigma_floor) + cfg.advantage_eps


REWARD_GRADS = tuple(REWARD_GRAD_REGISTRY)


def reward_standardisation(r: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
  """(mu, scale), each r's shape and dtype: the constants of the reward-gradient term, computed
  once per step on the whole batch (0 and 1 when reward_grad has no term)."""
  fn = REWARD_GRAD_REGISTRY.lookup(cfg.reward_grad)
  if fn is None:
    return jnp.zeros_like(r), jnp.ones_like(r)
  return fn(r, cfg)


def has_reward_gradient(cfg) -> bool:
  """Static: whether `cfg.reward_grad` adds a term that differentiates r."""
  return REWARD_GRAD_REGISTRY.lookup(cfg.reward_grad) is not None


def reward_gradient_term(r: jax.Array, targets: Targets, cfg) -> jax.Array:
  """float32 scalar -w * mean_{i active} (r_i - mu_i) / scale_i, differentiable through r [N]."""
  z = (r - targets.reward_mean) / targets.reward_scale
  return -cfg.actor_reward_weight * masked_mean(z, targets.active)
