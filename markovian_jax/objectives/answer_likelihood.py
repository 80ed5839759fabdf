"""Pieces of the answer-likelihood reward family (docs/answer-likelihood.md).

VeriFree, RLPR, JEPO, LaTRO, NOVER, VR-CLI and DRO all reward a CoT z_i by how likely the scorer
finds the gold answer a* after it. Each is a composition, by name, of the pieces registered here
(objectives/methods.py holds the METHODS table that composes them). Stages, in order:

  token weights  w_it    uniform (1) | group_std (DRO: std over the group of lp_.t, normalised
                         to sum 1 over the span)
  score          s_i     of the answer log-probs lp_it = log pi(a*_t | context, z_i, a*_<t):
                         logprob_sum  sum_t w_it lp_it            (JEPO, LaTRO; DRO's R3 with w)
                         seq_prob     exp(sum_t lp_it) = p_i      (VeriFree)
                         mean_token_prob  mean_t exp(lp_it)       (RLPR)
                         perplexity   exp(-mean_t lp_it / n(K_i)) (VR-CLI, NOVER; n: length_norm)
  base           r_i     from s_i and s0_q, the same score of the answer with no reasoning:
                         none  s_i | difference  s_i - s0 (DRO) | clipped_difference
                         max(s_i - s0, 0) (RLPR) | percent_improvement  100 (1 - s_i / s0) (VR-CLI)
  transform      r_i     identity | step (VR-CLI's step function of the % improvement) |
                         group_rank ((G - rank_i) / G, best first; NOVER)
  shaping        R_i     r_i plus each named term: kl_to_reference  -c sum_t (lp_z - lp_ref)
                         (LaTRO) | length_penalty  -c K_i / K (DRO) | efficiency  +c x the fraction
                         of the group both longer and worse-scored than z_i (NOVER)
  advantage      A_i     rloo (no std) | grpo | center (R_i - mean_g R, Dr. GRPO) | jepo_loo
                         (log mean_j p_j - log mean_{j!=i} p_j over the group, / group std,
                         clipped to [-c, c])
  filter         active  none | std_ema (RLPR: keep a question if its group std of R >=
                         ratio x EMA of past batches' mean group std)
  answer weight  v_i     none | reward (sg R_i; VeriFree) | group_softmax (G softmax_g(l)_i
                         beta_sup; JEPO) | constant (LaTRO's knob)

The answer term of the loss is -mean_{i active} sg(v_i) sum_t lp_it with lp carrying the policy's
gradient; it is what the papers add to the policy-gradient term for the answer tokens.

Shapes: N = Q * G rows, question-major; A answer tokens; K CoT tokens. Every function is a pure
function of arrays (jit-able with the config static), float32 at least (bf16 upcast, float64 kept).
A piece registered with `higher_is_better=False` (perplexity) reverses the order that rank and
efficiency read.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from markovian_jax.objectives.baselines import (
  ema_batch_update,
  group_advantages,
  group_stats,
  rloo_advantages,
)
from markovian_jax.objectives.reductions import f32, masked_mean, reduce_tokens
from markovian_jax.objectives.registry import Registry

TOKEN_WEIGHT_REGISTRY = Registry("token weighting")
SCORE_REGISTRY = Registry("answer score")
LENGTH_NORM_REGISTRY = Registry("perplexity length norm")
BASE_REGISTRY = Registry("no-reasoning subtraction")
TRANSFORM_REGISTRY = Registry("reward transform")
SHAPING_REGISTRY = Registry("reward shaping")
ADVANTAGE_REGISTRY = Registry("answer-likelihood advantage")
FILTER_REGISTRY = Registry("question filter")
ANSWER_WEIGHT_REGISTRY = Registry("answer weight")


def _groups(x: jax.Array, g: int) -> jax.Array:
  return x.reshape((-1, g) + x.shape[1:])


def per_sample(x: jax.Array, n: int, g: int) -> jax.Array:
  """[Q, ...] or [N, ...] per-question values -> [N, ...] (repeated over each group's G rows)."""
  if x.shape[0] == n:
    return x
  if x.shape[0] * g == n:
    return jnp.repeat(x, g, axis=0)
  raise ValueError(
    f"{x.shape[0]} rows match neither the {n} samples nor the {n // g} questions of group size {g}"
  )


# ----------------------------------------------------------------------------- token weights
# fn(lp [N, A] f32, valid [N, A] bool, g) -> [Q, A] f32 weights, shared by a question's rows and
# its no-reasoning row (column t is answer token t in both).


@TOKEN_WEIGHT_REGISTRY.register("uniform")
def _uniform_weights(lp, valid, g):
  del valid
  return jnp.ones((lp.shape[0] // g, lp.shape[1]), lp.dtype)


@TOKEN_WEIGHT_REGISTRY.register("group_std")
def _group_std_weights(lp, valid, g):
  # Tokens whose log-prob moves with the CoT are the ones the reasoning decides (DRO's R3); a
  # token every CoT predicts equally well carries no signal about z. Population std (divisor G);
  # a span with no spread at all falls back to uniform weights summing to 1.
  lp_g, v_g = _groups(jnp.where(valid, lp, 0.0), g), _groups(valid, g)
  count = jnp.maximum(jnp.sum(v_g, axis=1), 1).astype(lp.dtype)
  mean = jnp.sum(lp_g, axis=1) / count
  var = jnp.sum(jnp.where(v_g, jnp.square(lp_g - mean[:, None]), 0.0), axis=1) / count
  span = jnp.any(v_g, axis=1)
  std = jnp.where(span, jnp.sqrt(var), 0.0)
  total = jnp.sum(std, axis=1, keepdims=True)
  n_span = jnp.maximum(jnp.sum(span, axis=1, keepdims=True), 1).astype(lp.dtype)
  uniform = jnp.where(span, 1.0 / n_span, 0.0)
  return jnp.where(total > 0, std / jnp.where(total > 0, total, 1.0), uniform)


TOKEN_WEIGHTINGS = tuple(TOKEN_WEIGHT_REGISTRY)


# ----------------------------------------------------------------------------- scores
# fn(lp [M, A] f32, valid [M, A] bool, w [M, A] f32, cot_len [M] f32, cfg) -> [M] f32.


@LENGTH_NORM_REGISTRY.register("none")
def _no_length_norm(cot_len):
  return jnp.ones_like(cot_len)


@LENGTH_NORM_REGISTRY.register("log10")
def _log10_length_norm(cot_len):
  # NOVER's released code: nll / max(1, 1 + log10 |z|), so a longer CoT is not rewarded merely for
  # diluting the answer's surprise; 1 for |z| <= 1 (and for the no-reasoning row, |z| = 0).
  return jnp.maximum(1.0, 1.0 + jnp.log10(jnp.maximum(cot_len, 1.0)))


LENGTH_NORMS = tuple(LENGTH_NORM_REGISTRY)


@SCORE_REGISTRY.register("logprob_sum", higher_is_better=True)
def _logprob_sum(lp, valid, w, cot_len, cfg):
  del cot_len, cfg
  return jnp.sum(jnp.where(valid, w * lp, 0.0), axis=-1)


@SCORE_REGISTRY.register("seq_prob", higher_is_better=True)
def _seq_prob(lp, valid, w, cot_len, cfg):
  del w, cot_len, cfg
  # P(a* | ...) itself, the product of the token probabilities: VeriFree's reward. It vanishes
  # exponentially with the answer's length (the flat-lining the Feb 2026 comparison reports).
  return jnp.exp(jnp.sum(jnp.where(valid, lp, 0.0), axis=-1))


@SCORE_REGISTRY.register("mean_token_prob", higher_is_better=True)
def _mean_token_prob(lp, valid, w, cot_len, cfg):
  del w, cot_len, cfg
  return reduce_tokens(jnp.exp(jnp.where(valid, lp, 0.0)), valid, "mean")


@SCORE_REGISTRY.register("perplexity", higher_is_better=False)
def _perplexity(lp, valid, w, cot_len, cfg):
  del w
  norm = LENGTH_NORM_REGISTRY.lookup(cfg.length_norm)(cot_len)
  return jnp.exp(-reduce_tokens(lp, valid, "mean") / norm)


SCORES = tuple(SCORE_REGISTRY)


def answer_scores(
  lp: jax.Array, valid: jax.Array, weights: jax.Array, cot_len: jax.Array, cfg
) -> jax.Array:
  """s [M] float32 of `cfg.score` (module docstring).

  Args:
    lp: [M, A] float answer log-probs (masked entries may be -inf or NaN).
    valid: [M, A] bool answer span.
    weights: [M, A] float token weights (ones for `uniform`).
    cot_len: [M] float number of CoT tokens (0 for a no-reasoning row).
    cfg: a MethodConfig (reads score, length_norm).
  """
  lp = jnp.where(valid, f32(lp), 0.0)
  return SCORE_REGISTRY.lookup(cfg.score)(lp, valid, f32(weights), f32(cot_len), cfg)


# ----------------------------------------------------------------------------- base subtraction
# fn(s [N], s0 [N] or None, cfg) -> r [N]. s0: the score of the answer with no reasoning.


@BASE_REGISTRY.register("none", needs_no_reasoning=False)
def _no_base(s, s0, cfg):
  del s0, cfg
  return s


@BASE_REGISTRY.register("difference", needs_no_reasoning=True)
def _difference(s, s0, cfg):
  del cfg
  return s - s0


@BASE_REGISTRY.register("clipped_difference", needs_no_reasoning=True)
def _clipped_difference(s, s0, cfg):
  del cfg
  # RLPR's debiasing clip(r - r', 0, 1): both are probabilities, so r - r' <= 1 always and only
  # the lower bound acts: a CoT that makes the answer less likely than no CoT at all gets 0.
  return jnp.maximum(s - s0, 0.0)


@BASE_REGISTRY.register("percent_improvement", needs_no_reasoning=True)
def _percent_improvement(s, s0, cfg):
  del cfg
  # VR-CLI: I = 100 (1 - PPL(a* | z) / PPL(a* | no z)), in percent; > 0 when z helps.
  return 100.0 * (1.0 - s / s0)


BASES = tuple(BASE_REGISTRY)


# ----------------------------------------------------------------------------- transforms
# fn(r [N], cfg) -> [N].


@TRANSFORM_REGISTRY.register("identity")
def _identity(r, cfg):
  del cfg
  return r


@TRANSFORM_REGISTRY.register("step")
def _step(r, cfg):
  # VR-CLI's reward of the % improvement: the value of the highest threshold reached, else 0.
  out = jnp.zeros_like(r)
  for threshold, value in sorted(cfg.step_levels):
    out = jnp.where(r >= threshold, jnp.asarray(value, r.dtype), out)
  return out


def group_ranks(x: jax.Array, g: int, higher_is_better: bool) -> jax.Array:
  """rank_i in 0..G-1 within each question's group, 0 for the best; ties go to the earlier row
  (a stable sort, as NOVER's Python `sorted`). [N] -> [N] float32."""
  xg = _groups(x if higher_is_better else -x, g)
  better = xg[:, None, :] > xg[:, :, None]  # [Q, i, j]: j beats i
  idx = jnp.arange(g)
  tie_before = (xg[:, None, :] == xg[:, :, None]) & (idx[None, :] < idx[:, None])[None]
  return jnp.sum(better | tie_before, axis=-1).astype(jnp.float32).reshape(x.shape)


@TRANSFORM_REGISTRY.register("group_rank")
def _group_rank(r, cfg):
  g = cfg.group_size
  higher = cfg.base != "none" or SCORE_REGISTRY.meta[cfg.score]["higher_is_better"]
  return (g - group_ranks(r, g, higher).astype(r.dtype)) / g


TRANSFORMS = tuple(TRANSFORM_REGISTRY)


# ----------------------------------------------------------------------------- shaping
# fn(s [N] raw score, inputs, cfg) -> [N], added to the transformed reward.


@SHAPING_REGISTRY.register("kl_to_reference", needs=("ref_logprobs",))
def _kl_to_reference(s, inputs, cfg):
  del s
  # LaTRO folds the KL to the reference into the reward as the sampled sequence log-ratio.
  d = f32(jax.lax.stop_gradient(inputs.cot_logprobs)) - f32(inputs.ref_logprobs)
  return -cfg.kl_reward_coef * reduce_tokens(d, inputs.cot_mask, "sum")


@SHAPING_REGISTRY.register("length_penalty", needs=())
def _length_penalty(s, inputs, cfg):
  del s
  k = jnp.asarray(inputs.cot_mask).shape[1]
  return -cfg.length_penalty * cot_lengths(inputs.cot_mask) / max(k, 1)


@SHAPING_REGISTRY.register("efficiency", needs=())
def _efficiency(s, inputs, cfg):
  # NOVER: the fraction of the group's other CoTs that are both longer and scored worse.
  g = cfg.group_size
  sign = 1.0 if SCORE_REGISTRY.meta[cfg.score]["higher_is_better"] else -1.0
  sg_, lg = _groups(sign * s, g), _groups(cot_lengths(inputs.cot_mask), g)
  wins = (lg[:, :, None] < lg[:, None, :]) & (sg_[:, :, None] > sg_[:, None, :])  # [Q, i, j]
  return cfg.efficiency_weight * (jnp.sum(wins, axis=-1) / max(g - 1, 1)).reshape(s.shape)


SHAPINGS = tuple(SHAPING_REGISTRY)


def cot_lengths(cot_mask: jax.Array) -> jax.Array:
  """[N, K] mask -> float32 [N] number of valid CoT tokens."""
  return jnp.sum(jnp.asarray(cot_mask).astype(bool), axis=-1).astype(jnp.float32)


# ----------------------------------------------------------------------------- advantages
# fn(R [N], cfg) -> A [N].


@ADVANTAGE_REGISTRY.register("rloo")
def _rloo(r, cfg):
  return rloo_advantages(r, cfg.group_size)


@ADVANTAGE_REGISTRY.register("grpo")
def _grpo(r, cfg):
  return group_advantages(r, cfg.group_size, cfg.advantage_eps)


@ADVANTAGE_REGISTRY.register("center")
def _center(r, cfg):
  mean, _ = group_stats(r, cfg.group_size)
  return r - mean


def log_mean_exp_loo(lsum: jax.Array, g: int) -> tuple[jax.Array, jax.Array]:
  """(log mean_j exp(l_j), log mean_{j != i} exp(l_j)) within each group, both [N] float32.

  In log space throughout: l are sequence log-probs of tens of nats, whose exp underflows."""
  lg = _groups(lsum, g)
  full = jax.nn.logsumexp(lg, axis=1, keepdims=True) - jnp.log(g)
  others = jnp.where(jnp.eye(g, dtype=bool)[None], -jnp.inf, lg[:, None, :])  # [Q, i, j]
  loo = jax.nn.logsumexp(others, axis=-1) - jnp.log(g - 1)
  return jnp.broadcast_to(full, lg.shape).reshape(lsum.shape), loo.reshape(lsum.shape)


@ADVANTAGE_REGISTRY.register("jepo_loo")
def _jepo_loo(r, cfg):
  # JEPO: the leave-one-out gain of the group's multi-sample bound log mean_j p_j, scaled by its
  # group std (divisor G-1, as grpo) and clipped, so one lucky CoT cannot dominate the step.
  full, loo = log_mean_exp_loo(r, cfg.group_size)
  a = full - loo
  _, std = group_stats(a, cfg.group_size)
  return jnp.clip(a / (std + cfg.advantage_eps), -cfg.jepo_clip, cfg.jepo_clip)


ADVANTAGES = tuple(ADVANTAGE_REGISTRY)


# ----------------------------------------------------------------------------- filters
# fn(R [N], state EmaState, cfg) -> (active [N] bool, EmaState, metrics).


@FILTER_REGISTRY.register("none")
def _no_filter(r, state, cfg):
  del cfg
  return jnp.ones(r.shape, bool), state, {}


@FILTER_REGISTRY.register("std_ema")
def _std_ema_filter(r, state, cfg):
  # RLPR: a question whose CoTs all score alike teaches nothing; "alike" is relative to the
  # running level of spread, an EMA over past batches' mean group std (the threshold uses the
  # batches before this one; the first keeps every question).
  _, std = group_stats(r, cfg.group_size)
  threshold = jnp.where(state.weight > 0, cfg.filter_ratio * state.value, -jnp.inf)
  active = std >= threshold
  q_std = std.reshape(-1, cfg.group_size)[:, 0]
  new = ema_batch_update(state, jnp.mean(q_std), cfg.filter_decay)
  return (
    active,
    new,
    {
      "filter_threshold": jnp.where(state.weight > 0, threshold, 0.0),
      "filter_std_ema": new.value,
      "active_fraction": jnp.mean(active.astype(jnp.float32)),
    },
  )


FILTERS = tuple(FILTER_REGISTRY)


# ----------------------------------------------------------------------------- answer weights
# fn(R [N], lsum [N] = sum_t lp_it, cfg) -> v [N] or the value None (no answer term).

ANSWER_WEIGHT_REGISTRY.add("none", None)


@ANSWER_WEIGHT_REGISTRY.register("reward")
def _reward_weight(r, lsum, cfg):
  # VeriFree: d p_i = p_i d log p_i, so the answer tokens' gradient of E[p] is p_i times theirs.
  del lsum
  return cfg.answer_weight_value * r


@ANSWER_WEIGHT_REGISTRY.register("group_softmax")
def _group_softmax_weight(r, lsum, cfg):
  # JEPO: d/dl_i of log mean_j exp(l_j) is softmax(l)_i; times G so that averaging over the N rows
  # gives the mean over questions of the group's sum.
  del r
  g = cfg.group_size
  soft = jax.nn.softmax(_groups(lsum, g), axis=1)
  return cfg.answer_weight_value * g * soft.reshape(lsum.shape)


@ANSWER_WEIGHT_REGISTRY.register("constant")
def _constant_weight(r, lsum, cfg):
  del lsum
  return jnp.full_like(r, cfg.answer_weight_value)


ANSWER_WEIGHTS = tuple(ANSWER_WEIGHT_REGISTRY)


def answer_term(
  answer_logprobs: jax.Array,
  answer_mask: jax.Array,
  weights: jax.Array,
  active: Optional[jax.Array] = None,
) -> jax.Array:
  """float32 scalar -mean_{i active} sg(v_i) sum_t lp_it, differentiable through lp [N, A]."""
  lsum = reduce_tokens(answer_logprobs, answer_mask, "sum")
  return -masked_mean(jax.lax.stop_gradient(f32(weights)) * lsum, active)
