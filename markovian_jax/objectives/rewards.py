"""The Markovian reward and its normalisation by the base model's score.

For sequence i with answer tokens t (the tokens after the last "Answer:"), lp_it =
log pi(answer_t | <Redacted> prompt, CoT_i, answer_<t) from unscaled logits, `reward_kind` picks

  logprob           r_i = reduce_t lp_it                  (reduce: logprob_reduction; reference)
  prob              r_i = exp(mean_t lp_it)               (VeriFree-style probability of the answer)
  mean_token_prob   r_i = mean_t exp(lp_it)               (RLPR-style mean token probability)

`prob` is the per-token geometric mean, exp(log P(answer) / A), not P(answer) itself: the product
of A token probabilities shrinks exponentially with the answer length, so long answers would get
rewards near 0 whatever the CoT; the A-th root keeps it in [0, 1] on a per-token scale. Both
probability kinds ignore `logprob_reduction` and give 0 on a row with an empty span.

  R_i = r_i - b_q(i)   (normalize_reward; b: the base model's score of its greedy CoT' for the
                        question, computed by `answer_reward` with the same kind and reduction)

b is constant within a question's group, so it cancels in group advantages; it matters for the
`ema`/`none` baselines, expert iteration and logging.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from markovian_jax.objectives.reductions import f32, reduce_tokens
from markovian_jax.objectives.registry import Registry

REWARD_KIND_REGISTRY = Registry("reward_kind")


@REWARD_KIND_REGISTRY.register("logprob")
def _logprob(logprobs: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
  return reduce_tokens(logprobs, valid, reduction)


@REWARD_KIND_REGISTRY.register("prob")
def _prob(logprobs: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
  del reduction  # always the per-token geometric mean (module docstring)
  # The mean of an empty row is 0, whose exp would be a reward of 1: select 0 instead.
  return jnp.where(jnp.any(valid, axis=-1), jnp.exp(reduce_tokens(logprobs, valid, "mean")), 0.0)


@REWARD_KIND_REGISTRY.register("mean_token_prob")
def _mean_token_prob(logprobs: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
  del reduction
  # Padding may hold NaN or +-inf: select it away before exp so neither value nor gradient sees it.
  probs = jnp.exp(jnp.where(valid, f32(logprobs), 0.0))
  return reduce_tokens(probs, valid, "mean")


REWARD_KINDS = tuple(REWARD_KIND_REGISTRY)


def answer_reward(
  answer_logprobs: jax.Array, answer_mask: jax.Array, reduction: str = "mean", kind: str = "logprob"
) -> jax.Array:
  """The Markovian reward r_i of each row (module docstring); the one place r and b are computed.

  Args:
    answer_logprobs: [N, A] float log-probs of the gold answer tokens (unscaled logits: no
      temperature), from the scorer (pi or base). Carries a gradient only when the caller wants one
      (reward_grad="paper" differentiates r whatever its kind).
    answer_mask: [N, A] bool or {0, 1}: the answer span. Masked entries may be -inf or NaN.
    reduction: a REDUCTIONS name, for kind="logprob" (`mean`: reference code, nats per answer
      token; `sum`: paper).
    kind: a REWARD_KINDS name.

  Returns:
    float32 [N] (float64 for float64 input).
  """
  fn = REWARD_KIND_REGISTRY.lookup(kind)
  return fn(f32(answer_logprobs), jnp.asarray(answer_mask).astype(bool), reduction)


def broadcast_to_samples(per_question: jax.Array, n: int, group_size: int) -> jax.Array:
  """[N] or [Q] per-question values -> float32 [N] (repeated over each question's G samples)."""
  x = f32(per_question)
  if x.ndim != 1:
    raise ValueError(f"expected a vector of per-question or per-sample values, got shape {x.shape}")
  if x.shape[0] == n:
    return x
  if x.shape[0] * group_size == n:
    return jnp.repeat(x, group_size)
  raise ValueError(
    f"{x.shape[0]} values match neither the {n} samples nor the "
    f"{n // max(group_size, 1)} questions of group size {group_size}"
  )


def normalized_reward(
  rewards: jax.Array,
  baseline_scores: Optional[jax.Array],
  normalize: bool = True,
  group_size: int = 1,
) -> jax.Array:
  """R = r - b when `normalize`, else r.

  Args:
    rewards: [N] float r.
    baseline_scores: [N] or [Q] float b (per question; broadcast over its G samples). Required
      when `normalize`.
    normalize: subtract b.
    group_size: G, to broadcast a [Q] `baseline_scores`.

  Returns:
    float32 [N].
  """
  r = f32(rewards)
  if not normalize:
    return r
  if baseline_scores is None:
    raise ValueError(
      "normalize_reward=True needs baseline_scores (the base model's score of the "
      "greedy CoT' per question)"
    )
  return r - broadcast_to_samples(baseline_scores, r.shape[0], group_size)
