"""The Markovian training objective: rewards, baselines/advantages, PG / PPO / KL / entropy terms.

Pure functions of arrays (jit-friendly; configuration is a hashable frozen dataclass, so it can be
a static argument). Arithmetic is float32 at least: bf16 inputs are upcast, float64 stays float64
(jax.enable_x64). Notation (ALGORITHM.md §1):

  N = Q * G sequences, question-major (sample i answers question i // G); K = CoT tokens;
  A = answer tokens; masks are bool or {0, 1} arrays ("valid token" / "active sequence").

One step's loss, for sequence i and CoT token t (ALGORITHM.md §1.4-1.6):

  r_i   = reduce_t log pi(answer_t | <Redacted> prompt, CoT_i)           (answer_reward)
  R_i   = r_i - b_q(i)     b = base model's score of its greedy CoT'      (normalized_reward)
  A_i   = (R_i - mean_g R) / (std_g R + 1e-8)  |  R_i - V_ema  |  R_i       (advantages)
  l_it  = -lp_it * sg(A_i)                                      (pg)
        | -min(rho_it * A_i, clip(rho_it, 1-eps, 1+eps) * A_i)    (ppo, rho = pi / behaviour)
        + kl_penalty * kl_it - entropy_bonus * H_it
  loss  = [aggregate(l) - w * mean_i (r_i - sg(mu_g)) / sg(sigma_g)] / accumulation_steps
          (the w term only with reward_grad="paper")

`reduce_t` is `logprob_reduction` (`mean`: the reference code; `sum`: the paper). The same reduction
applies to every per-token term, so `-mean_t(lp_it) * A_i` (reference) and `-sum_t(lp_it) * A_i`
(paper: the log-probability of the whole CoT) are both the per-sequence PG loss.

Column t of every [N, K] input is about CoT token t: the log-prob (or KL, entropy) of the
distribution that *produced* CoT token t. In a teacher-forced pass over `[prompt ; CoT]` whose CoT
ends the sequence, those distributions are the logits at positions `[-K-1:-1]` (position j predicts
token j+1). The reference's KL took `[-K:]`, one position late: it skipped the distribution of the
first CoT token and included the one after the last (REFERENCE.md §7.4); do not copy that.

The step splits in two so that PPO can make several passes over minibatches with one set of
advantages and one baseline-state update per step: `advantage_targets` (no gradient, once per step,
on the whole batch) and `loss_from_targets` (differentiable, per (mini)batch). `markovian_loss`
composes them for the common single-pass case.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

OBJECTIVES = ("pg", "ppo")
KL_ESTIMATORS = ("full", "k1", "k2", "k3")
REDUCTIONS = ("mean", "sum")
AGGREGATIONS = ("sequence_mean", "token_mean")
BASELINES = ("group", "ema", "none")
REWARD_GRADS = ("none", "paper")
PPO_RATIO_REFERENCES = ("behaviour", "base")


def _f32(x) -> jax.Array:
  # At least float32 (bf16 log-probs are upcast); float64 stays float64 under jax.enable_x64.
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


# ----------------------------------------------------------------------------- reductions

def reduce_tokens(x: jax.Array, mask: jax.Array, how: str = "mean") -> jax.Array:
  """Per-sequence reduction over the last (token) axis.

  Args:
    x: [..., T] float values (log-probs, per-token losses). Masked entries may be anything, even
      -inf or NaN: they are selected away, never multiplied by zero (which would keep a NaN).
    mask: [..., T] bool or {0, 1}: valid tokens.
    how: `mean` (over the valid tokens; 0 for a row with none) or `sum`.

  Returns:
    float32 [...].
  """
  _check_choice("reduction", how, REDUCTIONS)
  valid = jnp.asarray(mask).astype(bool)
  total = jnp.sum(jnp.where(valid, _f32(x), 0.0), axis=-1)
  if how == "sum":
    return total
  return total / jnp.maximum(jnp.sum(valid, axis=-1), 1).astype(jnp.float32)


def masked_mean(x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """float32 scalar: the mean of `x` over `mask` (all entries when None; 0 when mask is empty)."""
  x = _f32(x)
  if mask is None:
    return jnp.mean(x)
  valid = jnp.broadcast_to(jnp.asarray(mask).astype(bool), x.shape)
  return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str = "sequence_mean",
              reduction: str = "mean", seq_mask: Optional[jax.Array] = None) -> jax.Array:
  """Loss aggregation of a per-token term into a scalar.

  `sequence_mean` (reference): reduce each sequence's tokens with `reduction`, then average over the
  active sequences, so every sequence weighs the same whatever its length. `token_mean`: every valid
  token of the active sequences weighs the same (long sequences count more). With `reduction="sum"`
  each token already weighs 1 inside its sequence and the two modes coincide (sum / #sequences).
  Both divide by at least 1, so an empty selection (expert iteration keeping nothing) gives 0.

  Args:
    per_token: [N, T] float per-token values.
    mask: [N, T] bool or {0, 1}: valid tokens.
    mode: `sequence_mean` or `token_mean`.
    reduction: `mean` or `sum` over a sequence's tokens.
    seq_mask: optional [N] bool or {0, 1}: active sequences (None = all).

  Returns:
    float32 scalar.
  """
  _check_choice("loss aggregation", mode, AGGREGATIONS)
  _check_choice("reduction", reduction, REDUCTIONS)
  n = per_token.shape[0]
  active = (jnp.ones((n,), bool) if seq_mask is None else jnp.asarray(seq_mask).astype(bool))
  if mode == "sequence_mean" or reduction == "sum":
    return masked_mean(reduce_tokens(per_token, mask, reduction), active)
  return masked_mean(per_token, jnp.asarray(mask).astype(bool) & active[:, None])


# ----------------------------------------------------------------------------- rewards

def answer_reward(answer_logprobs: jax.Array, answer_mask: jax.Array,
                  reduction: str = "mean") -> jax.Array:
  """The Markovian reward r_i = log P(answer | CoT_i), reduced over the answer tokens.

  Args:
    answer_logprobs: [N, A] float log-probs of the gold answer tokens (unscaled logits: no
      temperature), from the scorer (pi or base). Carries a gradient only when the caller wants one.
    answer_mask: [N, A] bool or {0, 1}: the answer span (tokens after the last `Answer` `:` pair).
    reduction: `mean` (reference code: nats per answer token) or `sum` (paper).

  Returns:
    float32 [N].
  """
  return reduce_tokens(answer_logprobs, answer_mask, reduction)


def broadcast_to_samples(per_question: jax.Array, n: int, group_size: int) -> jax.Array:
  """[N] or [Q] per-question values -> float32 [N] (repeated over each question's G samples)."""
  x = _f32(per_question)
  if x.ndim != 1:
    raise ValueError(f"expected a vector of per-question or per-sample values, got shape {x.shape}")
  if x.shape[0] == n:
    return x
  if x.shape[0] * group_size == n:
    return jnp.repeat(x, group_size)
  raise ValueError(f"{x.shape[0]} values match neither the {n} samples nor the "
                   f"{n // max(group_size, 1)} questions of group size {group_size}")


def normalized_reward(rewards: jax.Array, baseline_scores: Optional[jax.Array],
                      normalize: bool = True, group_size: int = 1) -> jax.Array:
  """R = r - b when `normalize` (b: the base model's score of its own greedy CoT'), else r.

  b is constant within a question's group, so it cancels in group advantages; it matters for the
  `ema`/`none` baselines, expert iteration and logging.

  Args:
    rewards: [N] float r.
    baseline_scores: [N] or [Q] float b (per question; broadcast over its G samples). Required
      when `normalize`.
    normalize: subtract b.
    group_size: G, to broadcast a [Q] `baseline_scores`.

  Returns:
    float32 [N].
  """
  r = _f32(rewards)
  if not normalize:
    return r
  if baseline_scores is None:
    raise ValueError("normalize_reward=True needs baseline_scores (the base model's score of the "
                     "greedy CoT' per question)")
  return r - broadcast_to_samples(baseline_scores, r.shape[0], group_size)


# ----------------------------------------------------------------------------- advantages

def _as_groups(x: jax.Array, group_size: Optional[int]) -> jax.Array:
  x = _f32(x)
  if x.ndim == 2:
    if group_size is not None and group_size != x.shape[1]:
      raise ValueError(f"rewards of shape {x.shape} do not have group size {group_size}")
    g = x.shape[1]
  elif x.ndim == 1:
    if group_size is None:
      raise ValueError("flat [Q*G] rewards need group_size")
    g = group_size
    if g <= 0 or x.shape[0] % g:
      raise ValueError(f"{x.shape[0]} rewards do not split into groups of {g}")
  else:
    raise ValueError(f"rewards must be [Q*G] or [Q, G], got shape {x.shape}")
  if g < 2:
    raise ValueError(f"group size {g}: a group baseline needs at least 2 samples per question "
                     "(the unbiased std is undefined for 1)")
  return x.reshape(-1, g)


def group_stats(x: jax.Array, group_size: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
  """Per-group mean and unbiased std (divisor G-1), broadcast back to `x`'s shape.

  Args:
    x: [Q*G] (question-major) or [Q, G] float.
    group_size: G (required for flat input).

  Returns:
    (mean, std), float32, each of `x`'s shape.
  """
  groups = _as_groups(x, group_size)
  mean = jnp.mean(groups, axis=1, keepdims=True)
  std = jnp.std(groups, axis=1, ddof=1, keepdims=True)
  shape = jnp.shape(x)
  return (jnp.broadcast_to(mean, groups.shape).reshape(shape),
          jnp.broadcast_to(std, groups.shape).reshape(shape))


def group_advantages(rewards: jax.Array, group_size: Optional[int] = None,
                     eps: float = 1e-8) -> jax.Array:
  """GRPO advantages A = (R - mean_g R) / (std_g R + eps), std unbiased as the reference (torch).

  A group whose rewards are all equal gets A = 0 (no signal) rather than a division by zero.

  Args:
    rewards: [Q*G] (question-major) or [Q, G] float R.
    group_size: G (required for flat input; checked against [Q, G]).
    eps: added to the std (reference: 1e-8).

  Returns:
    float32, `rewards`' shape.
  """
  mean, std = group_stats(rewards, group_size)
  return (_f32(rewards) - mean) / (std + eps)


class EmaState(NamedTuple):
  """Exponentially weighted mean of past batch-mean rewards (part of the checkpoint).

  value: float32 scalar V; weight: float32 scalar sum_k decay^k over the batches seen
  (0 = no history yet: the "initialized" flag, generalised so the early average is exact).
  """
  value: jax.Array
  weight: jax.Array

  @classmethod
  def init(cls) -> "EmaState":
    return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def ema_update(state: EmaState, batch_mean: jax.Array, decay: float = 0.9) -> EmaState:
  """Adds one batch mean to the weighted average V_n = sum_j decay^(n-j) m_j / sum_j decay^(n-j).

  Those normalised weights are the reference's `exponential_weighted_average` (REFERENCE.md §1.6),
  applied to batch means as ALGORITHM.md §1.5 specifies (the reference weights single examples, so
  its effective per-batch decay is decay**B). The recursion Z' = decay * Z + 1,
  V' = V + (m - V) / Z' needs only (V, Z): no history list, exact after a resume, and the first
  batch gives V = m. Asymptotically it is the usual V' = decay * V + (1 - decay) * m.

  Args:
    state: the EmaState before this batch.
    batch_mean: float32 scalar, the batch's mean normalised reward.
    decay: r in [0, 1).

  Returns:
    The updated EmaState.
  """
  weight = decay * state.weight + 1.0
  value = state.value + (_f32(batch_mean) - state.value) / weight
  return EmaState(value, weight)


def ema_advantages(rewards: jax.Array, state: EmaState) -> jax.Array:
  """A = R - V with V from *previous* batches; R itself on the first batch (no baseline yet).

  Args:
    rewards: [N] float R.
    state: EmaState before the current batch is added.

  Returns:
    float32 [N].
  """
  return _f32(rewards) - jnp.where(state.weight > 0, state.value, 0.0)


class EiStats(NamedTuple):
  """Running statistics of all past normalised rewards for expert iteration (checkpointed).

  count: int32 scalar, rewards seen; mean: float32 scalar; m2: float32 scalar, sum of squared
  deviations from the mean (Welford/Chan: no catastrophic cancellation of sum-of-squares over
  millions of rewards); batches: int32 scalar, batches seen (for the warm-up skip).
  """
  count: jax.Array
  mean: jax.Array
  m2: jax.Array
  batches: jax.Array

  @classmethod
  def init(cls) -> "EiStats":
    return cls(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
               jnp.zeros((), jnp.int32))


def ei_update(stats: EiStats, rewards: jax.Array) -> EiStats:
  """Merges one batch of rewards (all N, not only the kept ones) into the running statistics.

  Args:
    stats: EiStats before the batch.
    rewards: [N] float R.

  Returns:
    The updated EiStats (batches + 1).
  """
  r = _f32(rewards).reshape(-1)
  n_b = jnp.float32(r.shape[0])
  mean_b = jnp.mean(r)
  m2_b = jnp.sum(jnp.square(r - mean_b))
  n_a = stats.count.astype(jnp.float32)
  n = n_a + n_b
  delta = mean_b - stats.mean
  mean = stats.mean + delta * n_b / n
  m2 = stats.m2 + m2_b + jnp.square(delta) * n_a * n_b / n
  return EiStats(stats.count + r.shape[0], mean, m2, stats.batches + 1)


def ei_threshold(stats: EiStats, k: float, skip_initial: int = 25) -> jax.Array:
  """float32 scalar: mean + k * std of past rewards (population std, as the reference's np.std).

  +inf (keep nothing, no update) while fewer than `skip_initial` batches have been seen (the
  reference's EI_SKIP_INITIAL = 25) or when there is no history at all.
  """
  std = jnp.sqrt(stats.m2 / jnp.maximum(stats.count, 1).astype(jnp.float32))
  ready = (stats.batches >= skip_initial) & (stats.count > 0)
  return jnp.where(ready, stats.mean + k * std, jnp.inf)


def ei_mask(rewards: jax.Array, stats: EiStats, k: float, skip_initial: int = 25) -> jax.Array:
  """Expert iteration: bool [N], True where R_i > mean + k * std of past rewards (strictly).

  Args:
    rewards: [N] float R of the current batch.
    stats: EiStats of the previous batches only.
    k: the number of standard deviations (`ei_std`).
    skip_initial: batches to see before any sample is kept.
  """
  return _f32(rewards) > ei_threshold(stats, k, skip_initial)


class BaselineState(NamedTuple):
  """Cross-step state of the objective: the EMA baseline and the expert-iteration statistics."""
  ema: EmaState
  ei: EiStats

  @classmethod
  def init(cls) -> "BaselineState":
    return cls(EmaState.init(), EiStats.init())

  def to_json(self) -> dict:
    """Plain Python numbers, for the checkpoint's JSON state."""
    return {"ema_value": float(self.ema.value), "ema_weight": float(self.ema.weight),
            "ei_count": int(self.ei.count), "ei_mean": float(self.ei.mean),
            "ei_m2": float(self.ei.m2), "ei_batches": int(self.ei.batches)}

  @classmethod
  def from_json(cls, d: dict) -> "BaselineState":
    missing = sorted({"ema_value", "ema_weight", "ei_count", "ei_mean", "ei_m2", "ei_batches"}
                     - set(d))
    if missing:
      raise ValueError(f"baseline state is missing keys {missing}")
    f, i = (lambda v: jnp.asarray(v, jnp.float32)), (lambda v: jnp.asarray(v, jnp.int32))
    return cls(EmaState(f(d["ema_value"]), f(d["ema_weight"])),
               EiStats(i(d["ei_count"]), f(d["ei_mean"]), f(d["ei_m2"]), i(d["ei_batches"])))


# ----------------------------------------------------------------------------- policy terms

def pg_per_token(logprobs: jax.Array, advantages: jax.Array) -> jax.Array:
  """REINFORCE: l_it = -lp_it * sg(A_i); aggregated with `mean` it is -mean_t(lp_it) * A_i.

  Args:
    logprobs: [N, K] float per-token CoT log-probs under pi (temperature-scaled logits), with grad.
    advantages: [N] float A (never differentiated).

  Returns:
    float32 [N, K].
  """
  return -_f32(logprobs) * jax.lax.stop_gradient(_f32(advantages))[:, None]


def ppo_per_token(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                  eps: float = 0.2, log_ratio_clamp: Optional[float] = 20.0
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Clipped surrogate per token against the behaviour (sampling) policy.

  rho_it = exp(clamp(lp_it - sg(lp_old_it))), l_it = -min(rho A, clip(rho, 1-eps, 1+eps) A).
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
  log_ratio = _f32(logprobs) - jax.lax.stop_gradient(_f32(old_logprobs))
  if log_ratio_clamp is not None:
    log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
  ratio = jnp.exp(log_ratio)
  adv = jax.lax.stop_gradient(_f32(advantages))[:, None]
  unclipped = -ratio * adv
  clipped = -jnp.clip(ratio, 1.0 - eps, 1.0 + eps) * adv
  return jnp.maximum(unclipped, clipped), ratio, clipped > unclipped


def ppo_base_per_sequence(seq_logprobs: jax.Array, seq_ref_logprobs: jax.Array,
                          advantages: jax.Array, eps: float = 0.2,
                          log_ratio_clamp: Optional[float] = 20.0
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The reference's PPO, for reproduction only: one ratio per sequence against the frozen base.

  rho_i = exp(lp_i - lp_ref_i) with per-sequence *reduced* log-probs (mean in the reference: a
  geometric-mean token ratio). It is a trust region around the base model rather than PPO: once
  mean_t log(pi/base) > log(1+eps) = 0.18 nats, positive advantages stop pushing, whatever the
  sampling policy was. The reference run with it collapsed (REFERENCE.md §1.7, §7.5).

  Args:
    seq_logprobs: [N] float reduced CoT log-prob under pi, with grad.
    seq_ref_logprobs: [N] float the same under the base model.
    advantages: [N] float A.

  Returns:
    (per-sequence loss [N], ratio [N], clipped [N] bool).
  """
  per_token, ratio, clipped = ppo_per_token(_f32(seq_logprobs)[:, None],
                                            _f32(seq_ref_logprobs)[:, None], advantages, eps,
                                            log_ratio_clamp)
  return per_token[:, 0], ratio[:, 0], clipped[:, 0]


# ----------------------------------------------------------------------------- KL and entropy

def _safe_probs(logp: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  # Tokens with p = 0 (logp = -inf, e.g. masked vocabulary) contribute 0 * (-inf) = NaN unless both
  # the value *and* the operand of the unselected branch are made finite (the "double where").
  logp = _f32(logp)
  p = jnp.exp(logp)
  support = p > 0
  return p, jnp.where(support, logp, 0.0), support


def full_kl(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """Exact KL(pi || ref) = sum_v p_v (log p_v - log q_v) at every position.

  Use the temperature-scaled logits of both models (the reference divides both by T), and the K
  positions that predict the CoT tokens (module docstring). Differentiating it gives the exact
  gradient of the KL at those positions, with no sampling noise.

  Args:
    logprobs: [..., V] float log-softmax of pi (with grad).
    ref_logprobs: [..., V] float log-softmax of the reference (base) model.

  Returns:
    float32 [...], >= 0.
  """
  p, logp, support = _safe_probs(logprobs)
  logq = jnp.where(support, jax.lax.stop_gradient(_f32(ref_logprobs)), 0.0)
  return jnp.sum(jnp.where(support, p * (logp - logq), 0.0), axis=-1)


def entropy(logprobs: jax.Array) -> jax.Array:
  """H = -sum_v p_v log p_v at every position; float32 [...] from [..., V] log-probs."""
  p, logp, support = _safe_probs(logprobs)
  return -jnp.sum(jnp.where(support, p * logp, 0.0), axis=-1)


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k3",
                clamp: Optional[float] = 20.0) -> jax.Array:
  """Sample-based per-token KL(pi || ref) estimators (Schulman's k1/k2/k3) at the sampled tokens.

  With x ~ pi and d = log pi(x) - log ref(x):
    k1 = d                          unbiased for KL, high variance, negative on some tokens.
    k2 = d^2 / 2                    biased (tight only when pi ~ ref), low variance, >= 0.
    k3 = exp(-d) - (-d) - 1         unbiased (E[ref/pi] = 1) and >= 0 everywhere (x - 1 >= log x).
  As *loss terms* they differ from their values: the pathwise gradient of k1 has zero mean under pi
  (E[grad log pi] = 0) so k1 penalises nothing in expectation; E[grad k2] = grad KL(pi || ref)
  exactly (on-policy); E[grad k3] = grad KL(ref || pi), the reverse KL. `full` (full_kl) has
  none of these caveats and is the default. The samples must come from pi at the same temperature
  as the log-probs (true for PG and the first PPO pass; approximately after PPO updates).

  `clamp` bounds |d| before the estimator: k3 has exp(-d), which overflows float32 for d < -88
  (a sampled token the reference finds far likelier than pi does), and a single outlier token would
  otherwise dominate the batch's penalty and gradient. None: no clamp.

  Args:
    logprobs: [N, K] float per-token log-probs of the sampled tokens under pi (with grad).
    ref_logprobs: [N, K] float the same under the reference (never differentiated).
    estimator: k1, k2 or k3.
    clamp: bound on |d|.

  Returns:
    float32 [N, K].
  """
  _check_choice("sampled KL estimator", estimator, ("k1", "k2", "k3"))
  d = _f32(logprobs) - jax.lax.stop_gradient(_f32(ref_logprobs))
  if clamp is not None:
    d = jnp.clip(d, -clamp, clamp)
  if estimator == "k1":
    return d
  if estimator == "k2":
    return 0.5 * jnp.square(d)
  return jnp.exp(-d) + d - 1.0


# ----------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Objective settings (defaults: ALGORITHM.md §1, the reference's "Markovian" run made correct).

  kind: `pg` (REINFORCE) or `ppo` (clipped, per token, vs the behaviour policy).
  kl_penalty / kl_estimator / kl_clamp: beta, `full` | k1 | k2 | k3, |log-ratio| bound (k*).
  entropy_bonus: coefficient of -H (0 = off).
  logprob_reduction: `mean` (reference) | `sum` (paper) over tokens, for the CoT terms and r.
  loss_aggregation: `sequence_mean` | `token_mean` (see `aggregate`).
  normalize_reward: R = r - b.
  reward_grad / actor_reward_weight: `none` (reference: r carries no gradient) | `paper`
    (adds -w * mean((r - sg(mu)) / sg(sigma))); reward_sigma_floor bounds that 1/sigma scale.
  baseline / group_size / advantage_eps / ema_decay: `group` | `ema` | `none` advantages.
  ei_std / ei_skip_initial: expert iteration threshold k (None = off) and warm-up batches.
  ppo_eps / ppo_log_ratio_clamp / ppo_ratio_reference: clip range, exp guard, `behaviour` | `base`.
  accumulation_steps: the loss is divided by it. Use it when gradients of micro-steps are *summed*
    (as the reference's repeated backward()); optax.MultiSteps already averages, so keep 1 there.
  """
  kind: str = "pg"
  kl_penalty: float = 0.1
  kl_estimator: str = "full"
  kl_clamp: Optional[float] = 20.0
  entropy_bonus: float = 0.0
  logprob_reduction: str = "mean"
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
  accumulation_steps: int = 1

  def __post_init__(self):
    _check_choice("objective kind", self.kind, OBJECTIVES)
    _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
    _check_choice("logprob_reduction", self.logprob_reduction, REDUCTIONS)
    _check_choice("loss_aggregation", self.loss_aggregation, AGGREGATIONS)
    _check_choice("reward_grad", self.reward_grad, REWARD_GRADS)
    _check_choice("baseline", self.baseline, BASELINES)
    _check_choice("ppo_ratio_reference", self.ppo_ratio_reference, PPO_RATIO_REFERENCES)

    def need(ok: bool, field: str, what: str):
      if not ok:
        raise ValueError(f"ObjectiveConfig.{field}: {what}, got {getattr(self, field)!r}")

    def finite(field):
      v = getattr(self, field)
      need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), field,
           "must be a finite number")

    for f in ("kl_penalty", "entropy_bonus", "actor_reward_weight", "reward_sigma_floor",
              "advantage_eps", "ema_decay", "ppo_eps"):
      finite(f)
    for f in ("group_size", "accumulation_steps", "ei_skip_initial"):
      v = getattr(self, f)
      need(isinstance(v, int) and not isinstance(v, bool), f, "must be an integer")
    need(self.kl_penalty >= 0, "kl_penalty", "must be >= 0")
    need(self.actor_reward_weight >= 0, "actor_reward_weight", "must be >= 0")
    need(self.reward_sigma_floor >= 0, "reward_sigma_floor", "must be >= 0")
    need(self.advantage_eps >= 0, "advantage_eps", "must be >= 0")
    need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    need(0 < self.ppo_eps < 1, "ppo_eps", "must be in (0, 1)")
    need(self.group_size >= 1, "group_size", "must be >= 1")
    need(self.accumulation_steps >= 1, "accumulation_steps", "must be >= 1")
    need(self.ei_skip_initial >= 0, "ei_skip_initial", "must be >= 0")
    for f in ("kl_clamp", "ppo_log_ratio_clamp"):
      v = getattr(self, f)
      need(v is None or (isinstance(v, (int, float)) and v > 0), f, "must be None or > 0")
    need(self.ei_std is None or (isinstance(self.ei_std, (int, float))
                                 and math.isfinite(self.ei_std)), "ei_std",
         "must be None (off) or a finite number of standard deviations")
    need(self.baseline != "group" or self.group_size >= 2, "group_size",
         "the group baseline needs >= 2 samples per question")
    need(self.reward_grad != "paper" or self.group_size >= 2, "group_size",
         "reward_grad='paper' standardises r within each group, which needs >= 2 samples")

  @classmethod
  def from_config(cls, config, **overrides) -> "ObjectiveConfig":
    """From a run ConfigDict (configs/base.py): its `objective` block and `train.group_size`.

    `objective.ei_std < 0` means off (None here). `accumulation_steps` is not read from
    `optim.accumulation_steps` (see the class docstring): pass it in `overrides` when needed.
    """
    o = config.objective
    kwargs = dict(
        kind=o.kind, kl_penalty=float(o.kl_penalty), kl_estimator=o.kl_estimator,
        entropy_bonus=float(o.entropy_bonus), logprob_reduction=o.logprob_reduction,
        loss_aggregation=o.loss_aggregation, normalize_reward=bool(o.normalize_reward),
        reward_grad=o.reward_grad, actor_reward_weight=float(o.actor_reward_weight),
        baseline=o.baseline, group_size=int(config.train.group_size),
        ema_decay=float(o.ema_decay), ei_std=None if o.ei_std < 0 else float(o.ei_std),
        ei_skip_initial=int(o.ei_skip_initial), ppo_eps=float(o.ppo_eps),
        ppo_log_ratio_clamp=float(o.ppo_log_ratio_clamp),
        ppo_ratio_reference=o.ppo_ratio_reference)
    for key in ("kl_clamp", "reward_sigma_floor", "advantage_eps"):
      if key in o:
        kwargs[key] = o[key]
    kwargs.update(overrides)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- one step

@struct.dataclass
class LossInputs:
  """One (mini)batch. Optional fields are needed only by the settings that read them.

  cot_logprobs: [N, K] float, pi's log-probs of the sampled CoT tokens (temperature T), with grad.
  cot_mask: [N, K] bool or {0, 1}, valid CoT tokens.
  answer_logprobs: [N, A] float, the scorer's log-probs of the answer tokens (unscaled logits);
    with grad from pi when reward_grad="paper".
  answer_mask: [N, A] bool or {0, 1}, the answer span.
  behaviour_logprobs: [N, K] float, the sampler's log-probs (kind="ppo"; logged otherwise).
  ref_logprobs: [N, K] float, the base model's log-probs of the CoT tokens (k1/k2/k3, PPO "base").
  kl: [N, K] float, exact per-position KL(pi || base) (kl_estimator="full"), with grad.
  entropy: [N, K] float, per-position entropy of pi (entropy_bonus != 0), with grad.
  baseline_scores: [N] or [Q] float b (normalize_reward).
  """
  cot_logprobs: jax.Array
  cot_mask: jax.Array
  answer_logprobs: jax.Array
  answer_mask: jax.Array
  behaviour_logprobs: Optional[jax.Array] = None
  ref_logprobs: Optional[jax.Array] = None
  kl: Optional[jax.Array] = None
  entropy: Optional[jax.Array] = None
  baseline_scores: Optional[jax.Array] = None


class Targets(NamedTuple):
  """Per-sample constants of one step, computed once (no gradient) on the whole batch.

  advantages: float32 [N]; active: bool [N] (expert iteration); reward_mean, reward_scale:
  float32 [N], the group's mu and max(sigma, floor) + eps of r for reward_grad="paper".
  """
  advantages: jax.Array
  active: jax.Array
  reward_mean: jax.Array
  reward_scale: jax.Array


def _check_shape(name: str, x, shape) -> None:
  if x is None:
    return
  if tuple(jnp.shape(x)) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}, expected {tuple(shape)}")


def advantage_targets(rewards: jax.Array, baseline_scores: Optional[jax.Array],
                      cfg: ObjectiveConfig, state: Optional[BaselineState] = None
                      ) -> tuple[Targets, BaselineState, dict]:
  """Advantages, the expert-iteration mask and the reward standardisation for one step.

  Args:
    rewards: [N] float r (answer_reward); treated as a constant here.
    baseline_scores: [N] or [Q] float b, or None when not normalize_reward.
    cfg: ObjectiveConfig.
    state: BaselineState before this step (None = fresh).

  Returns:
    (Targets, the BaselineState after this step, metrics dict of float32 scalars).
  """
  state = BaselineState.init() if state is None else state
  r = jax.lax.stop_gradient(_f32(rewards))
  if r.ndim != 1:
    raise ValueError(f"rewards must be [N], got shape {r.shape}")
  n = r.shape[0]
  grouped = cfg.baseline == "group" or cfg.reward_grad == "paper"
  if grouped and n % cfg.group_size:
    raise ValueError(f"{n} samples do not split into groups of {cfg.group_size}")
  big_r = normalized_reward(r, None if baseline_scores is None
                            else jax.lax.stop_gradient(baseline_scores),
                            cfg.normalize_reward, cfg.group_size)
  metrics = {"reward_mean": jnp.mean(r), "normalized_reward_mean": jnp.mean(big_r)}

  ema, ei = state
  if cfg.baseline == "group":
    adv = group_advantages(big_r, cfg.group_size, cfg.advantage_eps)
    _, std = group_stats(big_r, cfg.group_size)
    metrics["frac_reward_zero_std"] = jnp.mean(std == 0)
  elif cfg.baseline == "ema":
    adv = ema_advantages(big_r, ema)
    metrics["ema_baseline"] = jnp.where(ema.weight > 0, ema.value, 0.0)
    ema = ema_update(ema, jnp.mean(big_r), cfg.ema_decay)
  else:
    adv = big_r

  if cfg.ei_std is None:
    active = jnp.ones((n,), bool)
  else:
    metrics["ei_threshold"] = ei_threshold(ei, cfg.ei_std, cfg.ei_skip_initial)
    active = ei_mask(big_r, ei, cfg.ei_std, cfg.ei_skip_initial)
    ei = ei_update(ei, big_r)

  if cfg.reward_grad == "paper":
    mu, sigma = group_stats(r, cfg.group_size)
    scale = jnp.maximum(sigma, cfg.reward_sigma_floor) + cfg.advantage_eps
  else:
    mu, scale = jnp.zeros((n,), jnp.float32), jnp.ones((n,), jnp.float32)

  metrics.update(advantage_mean=jnp.mean(adv), advantage_std=jnp.std(adv),
                 advantage_min=jnp.min(adv), advantage_max=jnp.max(adv),
                 active_fraction=jnp.mean(active))
  return Targets(adv, active, mu, scale), BaselineState(ema, ei), metrics


def loss_from_targets(inputs: LossInputs, targets: Targets, cfg: ObjectiveConfig
                      ) -> tuple[jax.Array, dict]:
  """The differentiable loss of one (mini)batch given the step's Targets.

  Every term is averaged over the active (expert-iteration) sequences, as the reference masks the
  whole per-sample loss; KL/entropy *metrics* cover all sequences, to watch for drift.

  Args:
    inputs: LossInputs for these N sequences.
    targets: Targets rows for the same sequences.
    cfg: ObjectiveConfig.

  Returns:
    (float32 scalar loss / accumulation_steps, metrics dict of float32 scalars; `loss` there is
    before the division).
  """
  lp = inputs.cot_logprobs
  if jnp.ndim(lp) != 2:
    raise ValueError(f"cot_logprobs must be [N, K], got shape {jnp.shape(lp)}")
  shape = jnp.shape(lp)
  n = shape[0]
  for name in ("cot_mask", "behaviour_logprobs", "ref_logprobs", "kl", "entropy"):
    _check_shape(name, getattr(inputs, name), shape)
  _check_shape("answer_mask", inputs.answer_mask, jnp.shape(inputs.answer_logprobs))
  if jnp.shape(inputs.answer_logprobs)[0] != n:
    raise ValueError(f"answer_logprobs has {jnp.shape(inputs.answer_logprobs)[0]} rows, "
                     f"cot_logprobs {n}")
  for name, x in zip(Targets._fields, targets):
    _check_shape(f"targets.{name}", x, (n,))

  mask, red, mode = inputs.cot_mask, cfg.logprob_reduction, cfg.loss_aggregation
  active = targets.active
  agg = lambda x, seqs=active: aggregate(x, mask, mode, red, seqs)  # noqa: E731
  metrics = {}

  def require(field: str, why: str):
    if getattr(inputs, field) is None:
      raise ValueError(f"LossInputs.{field} is required by {why}")

  kl_tok = None
  if cfg.kl_estimator == "full":
    if cfg.kl_penalty > 0:
      require("kl", "kl_estimator='full' with kl_penalty > 0")
    kl_tok = None if inputs.kl is None else _f32(inputs.kl)
  elif inputs.ref_logprobs is not None or cfg.kl_penalty > 0:
    require("ref_logprobs", f"kl_estimator={cfg.kl_estimator!r}")
    kl_tok = kl_estimate(lp, inputs.ref_logprobs, cfg.kl_estimator, cfg.kl_clamp)
  if kl_tok is not None:
    metrics["kl"] = aggregate(kl_tok, mask, mode, red)

  if cfg.entropy_bonus != 0:
    require("entropy", "entropy_bonus != 0")
  if inputs.entropy is not None:
    metrics["entropy"] = aggregate(inputs.entropy, mask, mode, red)

  valid = jnp.asarray(mask).astype(bool)
  if inputs.behaviour_logprobs is not None:
    diff = jnp.abs(_f32(lp) - _f32(inputs.behaviour_logprobs))
    metrics["behaviour_logprob_diff_mean"] = masked_mean(diff, valid)
    metrics["behaviour_logprob_diff_max"] = jnp.max(jnp.where(valid, diff, 0.0))

  if cfg.kind == "ppo" and cfg.ppo_ratio_reference == "base":
    # Reproduction of the reference: this term replaces every other one (no KL, no entropy, no
    # reward gradient), as its calculate_losses did.
    require("ref_logprobs", "ppo_ratio_reference='base'")
    seq_loss, ratio, clipped = ppo_base_per_sequence(
        reduce_tokens(lp, mask, red), reduce_tokens(inputs.ref_logprobs, mask, red),
        targets.advantages, cfg.ppo_eps, cfg.ppo_log_ratio_clamp)
    policy = masked_mean(seq_loss, active)
    metrics.update(pg_loss=policy, ppo_ratio_mean=jnp.mean(ratio), ppo_ratio_max=jnp.max(ratio),
                   ppo_clip_fraction=jnp.mean(clipped))
    total = policy
  else:
    if cfg.kind == "ppo":
      require("behaviour_logprobs", "kind='ppo'")
      tok, ratio, clipped = ppo_per_token(lp, inputs.behaviour_logprobs, targets.advantages,
                                          cfg.ppo_eps, cfg.ppo_log_ratio_clamp)
      metrics.update(ppo_ratio_mean=masked_mean(ratio, valid),
                     ppo_ratio_max=jnp.max(jnp.where(valid, ratio, 0.0)),
                     ppo_clip_fraction=masked_mean(clipped, valid & active[:, None]))
    else:
      tok = pg_per_token(lp, targets.advantages)
    policy = agg(tok)
    metrics["pg_loss"] = policy
    total = policy
    if cfg.kl_penalty > 0:
      total = total + cfg.kl_penalty * agg(kl_tok)
    if cfg.entropy_bonus != 0:
      total = total - cfg.entropy_bonus * agg(_f32(inputs.entropy))
    r = answer_reward(inputs.answer_logprobs, inputs.answer_mask, red)
    if cfg.reward_grad == "paper":
      z = (r - targets.reward_mean) / targets.reward_scale
      reward_term = -cfg.actor_reward_weight * masked_mean(z, active)
      metrics["reward_grad_loss"] = reward_term
      total = total + reward_term

  metrics["loss"] = total
  return total / cfg.accumulation_steps, metrics


def markovian_loss(inputs: LossInputs, cfg: ObjectiveConfig,
                   state: Optional[BaselineState] = None
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
    (loss, (metrics, new_state)): float32 scalar loss / accumulation_steps, dict of float32
    scalars (loss, pg_loss, kl, entropy, reward_mean, normalized_reward_mean, advantage_* ,
    active_fraction, ppo_ratio_*, ...), and the BaselineState to carry to the next step.
  """
  r = answer_reward(inputs.answer_logprobs, inputs.answer_mask, cfg.logprob_reduction)
  targets, new_state, metrics = advantage_targets(r, inputs.baseline_scores, cfg, state)
  loss, loss_metrics = loss_from_targets(inputs, targets, cfg)
  return loss, ({**metrics, **loss_metrics}, new_state)
