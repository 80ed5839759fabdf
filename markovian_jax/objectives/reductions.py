"""Per-sequence token reductions and the loss aggregation of per-token terms.

Arithmetic is float32 at least: bf16 inputs are upcast, float64 stays float64 (jax.enable_x64).
Masked entries are *selected away* (jnp.where), never multiplied by zero, so a -inf or NaN in a
padded position cannot leak into the result or its gradient.

  reduce_t x_it  = sum_{t valid} x_it / max(#valid_i, 1)   (mean)  |  sum_{t valid} x_it  (sum)
  sequence_mean  = mean_{i active} reduce_t l_it
  token_mean     = sum_{i active, t valid} l_it / #(active, valid) tokens   (mean reduction)

With the `sum` reduction every token already weighs 1 inside its sequence and both aggregations
are defined as sum / #sequences.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from markovian_jax.objectives.registry import Registry

REDUCTION_REGISTRY = Registry("reduction")
AGGREGATION_REGISTRY = Registry("loss aggregation")


def f32(x) -> jax.Array:
  """`x` as an array of at least float32 (bf16 -> float32; float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _valid_count(valid: jax.Array) -> jax.Array:
  # At least 1, so a row (or selection) with nothing valid gives 0 rather than 0 / 0.
  return jnp.maximum(jnp.sum(valid, axis=-1), 1).astype(jnp.float32)


@REDUCTION_REGISTRY.register("mean")
def _mean(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Reference code: nats per token."""
  return jnp.sum(jnp.where(valid, x, 0.0), axis=-1) / _valid_count(valid)


@REDUCTION_REGISTRY.register("sum")
def _sum(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Paper: the log-probability of the whole span."""
  return jnp.sum(jnp.where(valid, x, 0.0), axis=-1)


REDUCTIONS = tuple(REDUCTION_REGISTRY)


def reduce_tokens(x: jax.Array, mask: jax.Array, how: str = "mean") -> jax.Array:
  """Per-sequence reduction over the last (token) axis.

  Args:
    x: [..., T] float values (log-probs, per-token losses). Masked entries may be anything, even
      -inf or NaN.
    mask: [..., T] bool or {0, 1}: valid tokens.
    how: a REDUCTIONS name: `mean` (over the valid tokens; 0 for a row with none) or `sum`.

  Returns:
    float32 [...] (float64 for float64 input).
  """
  fn = REDUCTION_REGISTRY.lookup(how)
  return fn(f32(x), jnp.asarray(mask).astype(bool))


def masked_mean(x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """float32 scalar: the mean of `x` over `mask` (all entries when None; 0 when mask is empty)."""
  x = f32(x)
  if mask is None:
    return jnp.mean(x)
  valid = jnp.broadcast_to(jnp.asarray(mask).astype(bool), x.shape)
  return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


@AGGREGATION_REGISTRY.register("sequence_mean")
def _sequence_mean(per_token, valid, active, reduction):
  """Reference: every sequence weighs the same whatever its length."""
  return masked_mean(reduce_tokens(per_token, valid, reduction), active)


@AGGREGATION_REGISTRY.register("token_mean")
def _token_mean(per_token, valid, active, reduction):
  """Every valid token of the active sequences weighs the same (long sequences count more)."""
  if reduction == "sum":
    return _sequence_mean(per_token, valid, active, reduction)
  return masked_mean(per_token, valid & active[:, None])


AGGREGATIONS = tuple(AGGREGATION_REGISTRY)


def aggregate(
  per_token: jax.Array,
  mask: jax.Array,
  mode: str = "sequence_mean",
  reduction: str = "mean",
  seq_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """Loss aggregation of a per-token term into a scalar (module docstring).

  Every mode divides by at least 1, so an empty selection (expert iteration keeping nothing)
  gives 0.

  Args:
    per_token: [N, T] float per-token values.
    mask: [N, T] bool or {0, 1}: valid tokens.
    mode: an AGGREGATIONS name.
    reduction: a REDUCTIONS name, over a sequence's tokens.
    seq_mask: optional [N] bool or {0, 1}: active sequences (None = all).

  Returns:
    float32 scalar.
  """
  fn = AGGREGATION_REGISTRY.lookup(mode)
  REDUCTION_REGISTRY.lookup(reduction)
  n = per_token.shape[0]
  active = jnp.ones((n,), bool) if seq_mask is None else jnp.asarray(seq_mask).astype(bool)
  return fn(per_token, jnp.asarray(mask).astype(bool), active, reduction)
