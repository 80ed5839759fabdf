"""Expert iteration: train only on samples whose normalised reward beats past rewards.

  active_i = R_i > mean_past + k * std_past      (strictly; k = ei_std, population std)

mean_past and std_past cover every reward of the *previous* batches (all N of each, kept or not),
so the current batch is compared with history only. Nothing is kept during the first
`ei_skip_initial` batches (the reference's EI_SKIP_INITIAL = 25) or with no history at all.
When nothing is kept, the loss is exactly 0, yet an optimizer step would still apply weight decay
and momentum: the training step should skip the update (as the reference does), e.g. when
`active_fraction == 0` or `not jnp.any(targets.active)`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from markovian_jax.objectives.reductions import f32


class EiStats(NamedTuple):
  """Running statistics of all past normalised rewards (checkpointed).

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
    return cls(
      jnp.zeros((), jnp.int32),
      jnp.zeros((), jnp.float32),
      jnp.zeros((), jnp.float32),
      jnp.zeros((), jnp.int32),
    )


def ei_update(stats: EiStats, rewards: jax.Array) -> EiStats:
  """Merges one batch of rewards (all N, not only the kept ones) into the running statistics.

  Args:
    stats: EiStats before the batch.
    rewards: [N] float R.

  Returns:
    The updated EiStats (batches + 1).
  """
  r = f32(rewards).reshape(-1)
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

  +inf (keep nothing) while fewer than `skip_initial` batches have been seen or when there is no
  history at all.
  """
  std = jnp.sqrt(stats.m2 / jnp.maximum(stats.count, 1).astype(jnp.float32))
  ready = (stats.batches >= skip_initial) & (stats.count > 0)
  return jnp.where(ready, stats.mean + k * std, jnp.inf)


def ei_mask(rewards: jax.Array, stats: EiStats, k: float, skip_initial: int = 25) -> jax.Array:
  """bool [N]: True where R_i > mean + k * std of past rewards (strictly).

  Args:
    rewards: [N] float R of the current batch.
    stats: EiStats of the previous batches only.
    k: the number of standard deviations (`ei_std`).
    skip_initial: batches to see before any sample is kept.
  """
  return f32(rewards) > ei_threshold(stats, k, skip_initial)
