"""What the loss reads: one (mini)batch of per-token terms (LossInputs) and the step's per-sample
constants (Targets), with the checks that name a missing or misshapen field.

Column t of every [N, K] input is about CoT token t: the log-prob (or KL, entropy) of the
distribution that *produced* CoT token t. In a teacher-forced pass over `[prompt ; CoT]` whose CoT
ends the sequence, those distributions are the logits at positions `[-K-1:-1]` (position j predicts
token j+1). The reference's KL took `[-K:]`, one position late: it skipped the distribution of the
first CoT token and included the one after the last (docs/reference-differences.md#kl-slice).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from flax import struct
import jax
import jax.numpy as jnp


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
  kl: [N, K] float, exact per-position KL(pi || base) (kl_estimator="full"), with grad
    (`markovian_jax.models.logprobs.full_kl`).
  entropy: [N, K] float, per-position entropy of pi (entropy_bonus != 0), with grad
    (`markovian_jax.models.logprobs.entropy`).
  baseline_scores: [N] or [Q] float b (normalize_reward): `answer_reward` of the base model's
    greedy CoT' with the config's logprob_reduction and reward_kind.
  no_reasoning_logprobs: [Q, A] or [N, A] float, the answer's log-probs with no CoT (or, for DRO,
    with the CoT masked), under the scorer the answer-likelihood method names; column t is answer
    token t, as in answer_logprobs (objectives/answer_likelihood.py). Never differentiated.
  no_reasoning_mask: bool or {0, 1}, no_reasoning_logprobs' shape: its answer span.
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
  no_reasoning_logprobs: Optional[jax.Array] = None
  no_reasoning_mask: Optional[jax.Array] = None


class Targets(NamedTuple):
  """Per-sample constants of one step, computed once (no gradient) on the whole batch.

  advantages: float32 [N].
  active: bool [N], the samples expert iteration keeps (all True when it is off). A jax array
    under jit too: `jnp.any(targets.active)` (or `any_active()`) is False when the step should
    skip the optimizer update.
  reward_mean, reward_scale: float32 [N], the group's mu and max(sigma, floor) + eps of r for
    reward_grad="paper" (0 and 1 otherwise).
  """

  advantages: jax.Array
  active: jax.Array
  reward_mean: jax.Array
  reward_scale: jax.Array

  def any_active(self) -> jax.Array:
    """bool scalar: some sample is kept, i.e. the step has something to learn from."""
    return jnp.any(self.active)


def require(inputs: LossInputs, field: str, why: str) -> None:
  """Raises ValueError naming the LossInputs field that `why` (a setting) needs."""
  if getattr(inputs, field) is None:
    raise ValueError(f"LossInputs.{field} is required by {why}")


def check_shape(name: str, x, shape) -> None:
  """Raises ValueError unless `x` is None or has `shape`."""
  if x is None:
    return
  if tuple(jnp.shape(x)) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}, expected {tuple(shape)}")
