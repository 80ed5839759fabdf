"""Advantage baselines: A_i from the normalised rewards R (docs/method.md#advantages-and-baselines).

N = Q * G samples, question-major (sample i answers question i // G).

  group   A_i = (R_i - mean_g R) / (std_g R + eps)     GRPO; std unbiased (divisor G-1) as torch
  rloo    A_i = R_i - mean_{j != i in g} R_j = G / (G-1) * (R_i - mean_g R)   leave-one-out
  ema     A_i = R_i - V,  V = exponentially weighted mean of every past reward, decay per example
          (the reference; R_i itself on batch 0)
  ema_batch  the same over past batch means, decay per batch (a slower baseline; not the
          reference's)
  none    A_i = R_i

`group` and `rloo` need G >= 2. RLOO's baseline excludes the sample itself, so it is independent
of R_i and the estimator is unbiased; it is not rescaled by the group's std (a group of equal
rewards gives A = 0 either way).

A baseline is a function registered with `@BASELINE_REGISTRY.register(name)` (add
`min_group_size=2` when it needs groups) of signature

  fn(rewards [N] float, ema: EmaState, cfg: ObjectiveConfig) -> (A [N] float32, EmaState, metrics)

returning the EMA state to carry (unchanged unless it uses it) and float32 scalar metrics.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from markovian_jax.objectives.expert_iteration import EiStats
from markovian_jax.objectives.reductions import f32
from markovian_jax.objectives.registry import Registry

BASELINE_REGISTRY = Registry("baseline")


def _as_groups(x: jax.Array, group_size: Optional[int]) -> jax.Array:
  x = f32(x)
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
    raise ValueError(f"group size {g}: a group baseline needs at least 2 samples per question")
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
  return (
    jnp.broadcast_to(mean, groups.shape).reshape(shape),
    jnp.broadcast_to(std, groups.shape).reshape(shape),
  )


def group_advantages(
  rewards: jax.Array, group_size: Optional[int] = None, eps: float = 1e-8
) -> jax.Array:
  """GRPO advantages (module docstring); a group whose rewards are all equal gets A = 0.

  Args:
    rewards: [Q*G] (question-major) or [Q, G] float R.
    group_size: G (required for flat input; checked against [Q, G]).
    eps: added to the std (reference: 1e-8).

  Returns:
    float32, `rewards`' shape.
  """
  mean, std = group_stats(rewards, group_size)
  return (f32(rewards) - mean) / (std + eps)


def rloo_advantages(rewards: jax.Array, group_size: Optional[int] = None) -> jax.Array:
  """Leave-one-out advantages A_i = R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean_g R).

  Args:
    rewards: [Q*G] (question-major) or [Q, G] float R.
    group_size: G >= 2 (required for flat input; checked against [Q, G]).

  Returns:
    float32, `rewards`' shape.
  """
  groups = _as_groups(rewards, group_size)
  g = groups.shape[1]
  adv = g / (g - 1) * (groups - jnp.mean(groups, axis=1, keepdims=True))
  return adv.reshape(jnp.shape(rewards))


class EmaState(NamedTuple):
  """Exponentially weighted mean of past rewards (part of the checkpoint).

  value: float32 scalar V; weight: float32 scalar Z = sum_k decay^k over the items seen (rewards
  for `ema`, batch means for `ema_batch`; 0 = no history yet: the "initialized" flag, generalised
  so the early average is exact).
  """

  value: jax.Array
  weight: jax.Array

  @classmethod
  def init(cls) -> "EmaState":
    return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def ema_update(state: EmaState, rewards: jax.Array, decay: float = 0.9) -> EmaState:
  """Appends one step's rewards, in row order, to V = sum_j decay^(n-j) R_j / sum_j decay^(n-j).

  j runs over every reward seen so far, one example at a time: the reference's
  `exponential_weighted_average` of its flattened per-example history. With N = 12 rows a step
  and decay 0.9 the last step carries 1 - 0.9^12 = 72% of the weight, so after the rewards jump
  the baseline follows within a step or two.

  The N items enter in closed form, Z' = decay^N Z + sum_k decay^k and
  V' = (decay^N Z V + sum_i decay^(N-1-i) R_i) / Z', which needs only (V, Z) of static shape
  (no history list, exact after a resume); the first step gives the plain weighted mean.

  Args:
    state: the EmaState before this step.
    rewards: [N] (or [Q, G], flattened row-major) float R of this step.
    decay: r in [0, 1).

  Returns:
    The updated EmaState (float32).
  """
  r = f32(rewards).reshape(-1)
  powers = jnp.power(jnp.float32(decay), jnp.arange(r.shape[0] - 1, -1, -1, dtype=jnp.float32))
  carried = jnp.float32(decay) ** r.shape[0] * state.weight
  weight = carried + jnp.sum(powers)
  return EmaState((carried * state.value + jnp.dot(powers, r)) / weight, weight)


def ema_batch_update(state: EmaState, batch_mean: jax.Array, decay: float = 0.9) -> EmaState:
  """Adds one batch mean to V_n = sum_j decay^(n-j) m_j / sum_j decay^(n-j), j over batches.

  The `ema_batch` baseline: the decay applies per step, so the last step carries only
  1 - decay (10%) of the weight, where the reference decays per example (`ema_update`). The
  recursion Z' = decay * Z + 1, V' = V + (m - V) / Z' needs only (V, Z); the first batch gives
  V = m.

  Args:
    state: the EmaState before this batch.
    batch_mean: float32 scalar, the batch's mean normalised reward.
    decay: r in [0, 1).

  Returns:
    The updated EmaState.
  """
  weight = decay * state.weight + 1.0
  value = state.value + (f32(batch_mean) - state.value) / weight
  return EmaState(value, weight)


def ema_advantages(rewards: jax.Array, state: EmaState) -> jax.Array:
  """A = R - V with V from *previous* steps; R itself on the first step (no baseline yet).

  Args:
    rewards: [N] float R.
    state: EmaState before the current step is added.

  Returns:
    float32 [N].
  """
  return f32(rewards) - jnp.where(state.weight > 0, state.value, 0.0)


def _zero_std_fraction(rewards, group_size) -> dict:
  # Groups with no reward spread give no signal; a high fraction means G or the temperature is low.
  _, std = group_stats(rewards, group_size)
  return {"frac_reward_zero_std": jnp.mean((std == 0).astype(jnp.float32))}


@BASELINE_REGISTRY.register("group", min_group_size=2)
def _group(rewards, ema, cfg):
  adv = group_advantages(rewards, cfg.group_size, cfg.advantage_eps)
  return adv, ema, _zero_std_fraction(rewards, cfg.group_size)


@BASELINE_REGISTRY.register("rloo", min_group_size=2)
def _rloo(rewards, ema, cfg):
  return rloo_advantages(rewards, cfg.group_size), ema, _zero_std_fraction(rewards, cfg.group_size)


def _ema_metrics(ema: EmaState) -> dict:
  return {"ema_baseline": jnp.where(ema.weight > 0, ema.value, 0.0)}


@BASELINE_REGISTRY.register("ema")
def _ema(rewards, ema, cfg):
  return (ema_advantages(rewards, ema), ema_update(ema, rewards, cfg.ema_decay), _ema_metrics(ema))


@BASELINE_REGISTRY.register("ema_batch")
def _ema_batch(rewards, ema, cfg):
  return (
    ema_advantages(rewards, ema),
    ema_batch_update(ema, jnp.mean(rewards), cfg.ema_decay),
    _ema_metrics(ema),
  )


@BASELINE_REGISTRY.register("none")
def _none(rewards, ema, cfg):
  del cfg
  return f32(rewards), ema, {}


BASELINES = tuple(BASELINE_REGISTRY)


# A fresh EmaState as numpy scalars: a NamedTuple default is built at import time, before the
# test or launcher has configured JAX's devices.
_NO_EMA = EmaState(np.zeros((), np.float32), np.zeros((), np.float32))


class BaselineState(NamedTuple):
  """Cross-step state of the objective: the EMA baseline, the expert-iteration statistics and the
  EMA of the groups' reward std that the answer-likelihood `std_ema` filter keeps
  (objectives/answer_likelihood.py; untouched, and saved as zeros, by every other setting)."""

  ema: EmaState
  ei: EiStats
  filter_std: EmaState = _NO_EMA

  @classmethod
  def init(cls) -> "BaselineState":
    return cls(EmaState.init(), EiStats.init(), EmaState.init())

  def to_json(self) -> dict:
    """Plain Python numbers, for the checkpoint's JSON state."""
    return {
      "ema_value": float(self.ema.value),
      "ema_weight": float(self.ema.weight),
      "ei_count": int(self.ei.count),
      "ei_mean": float(self.ei.mean),
      "ei_m2": float(self.ei.m2),
      "ei_batches": int(self.ei.batches),
      "filter_std_value": float(self.filter_std.value),
      "filter_std_weight": float(self.filter_std.weight),
    }

  @classmethod
  def from_json(cls, d: dict) -> "BaselineState":
    missing = sorted(
      {"ema_value", "ema_weight", "ei_count", "ei_mean", "ei_m2", "ei_batches"} - set(d)
    )
    if missing:
      raise ValueError(f"baseline state is missing keys {missing}")
    f, i = (lambda v: jnp.asarray(v, jnp.float32)), (lambda v: jnp.asarray(v, jnp.int32))
    # Checkpoints written before the filter existed have no filter_std_*: a fresh filter EMA.
    return cls(
      EmaState(f(d["ema_value"]), f(d["ema_weight"])),
      EiStats(i(d["ei_count"]), f(d["ei_mean"]), f(d["ei_m2"]), i(d["ei_batches"])),
      EmaState(f(d.get("filter_std_value", 0.0)), f(d.get("filter_std_weight", 0.0))),
    )
