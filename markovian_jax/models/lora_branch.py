"""The adapter branch of a linear layer, `scale * dropout(x) @ a @ b`, made cheap to train.

Two costs dominated a LoRA training step on CPU, and both come from generic code paths:

* Dropout masks. `jax.random.bernoulli` runs threefry (20 rounds per 32-bit word): at B*T = 2k
  tokens a SmolLM2 forward needs ~320 M mask entries (one mask per adapted linear, as PEFT does),
  1.7 s of a 2.2 s forward. `dropout` here draws each entry from a counter-based hash (two rounds
  of a 32-bit finaliser over the element index and a 64-bit seed taken from the flax dropout key):
  a fused elementwise op, as fast as a copy. It is not a cryptographic generator; it only has to
  give independent-looking keep/drop decisions at the right rate, which
  tests/models/test_lora_branch.py checks. The index is the position in the global array, so the
  mask does not depend on sharding.

* The backward of `(h @ a) @ b`. Autodiff asks XLA for `db = (h @ a)^T @ g` as a contraction over
  the token axis, and XLA:CPU lays that out by transposing the [tokens, out] cotangent, fused with
  the reads of the scan's stacked residuals: ~70 ms per layer and projection at 2k tokens, most of
  the backward. `low_rank` has a hand-written VJP that contracts in the order [out, tokens] x
  [tokens, r], which needs no big transpose (same values to float rounding, tested against
  autodiff).

* What the backward keeps. Autodiff of `low_rank(dropout(x))` stores, per adapted linear, the
  keep mask and the dropped-out copy of x: seven of each per layer, where the q/k/v and gate/up
  projections share one x. `dropout_low_rank` keeps x itself and the 64-bit seed, and redraws the
  mask in the backward (a fused elementwise op): same values, a fraction of the residual writes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B9


def _mix(h: jax.Array) -> jax.Array:
  """A 32-bit integer finaliser (xorshift-multiply, two rounds): uint32 -> uint32, bijective."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _seed(key: jax.Array) -> jax.Array:
  """uint32 [2]: the 64 bits of `key` (raw uint32[2] or typed) that a mask is drawn from."""
  return jax.random.bits(key, (2,), jnp.uint32)


def keep_mask(key: jax.Array, shape: tuple, rate: float) -> jax.Array:
  """bool `shape`: True with probability 1 - rate, independently per entry (given `key`).

  Args:
    key: a JAX PRNG key (raw uint32[2] or typed); only 64 bits are drawn from it.
    rate: drop probability in [0, 1).
  """
  return _keep(_seed(key), shape, rate)


def _keep(seed: jax.Array, shape: tuple, rate: float) -> jax.Array:
  size = 1
  for d in shape:
    size *= d
  idx = jax.lax.iota(jnp.uint32, size).reshape(shape)  # wraps past 2**32 entries
  h = _mix(_mix(idx * jnp.uint32(_GOLDEN) ^ seed[0]) + seed[1])
  threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
  return h >= jnp.uint32(threshold)


def _check_rate(rate: float) -> None:
  if not 0 <= rate < 1:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")


def _drop(x: jax.Array, seed: jax.Array, rate: float) -> jax.Array:
  keep = _keep(seed, x.shape, rate)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout of `x` (any shape and dtype): kept entries are scaled by 1 / (1 - rate)."""
  _check_rate(rate)
  return x if rate == 0 else _drop(x, _seed(key), rate)


def dropout_low_rank(
  key: jax.Array, x: jax.Array, a: jax.Array, b: jax.Array, scale: float, rate: float
) -> jax.Array:
  """`low_rank(dropout(key, x, rate).astype(a.dtype), a, b, scale)`, with the same mask and
  values, whose backward redraws the mask instead of keeping it and the dropped-out x.

  Args:
    key: the PRNG key of this projection's mask; x: [..., in] activations, any float dtype;
    a: [in, r]; b: [r, out]; scale, rate: Python floats (static).
  Returns:
    [..., out] in the dtype of `h @ a`.
  """
  _check_rate(rate)
  if rate == 0:
    return low_rank(x.astype(a.dtype), a, b, scale)
  return _dropout_low_rank(x, a, b, _seed(key), scale, rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank(h: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """`scale * (h @ a) @ b`.

  Args:
    h: [..., in] activations (already dropped out); a: [in, r]; b: [r, out]; scale: a Python
      float (static).
  Returns:
    [..., out] in the dtype of `h @ a`.
  """
  return jnp.dot(jnp.dot(h, a), b) * scale


def _low_rank_fwd(h, a, b, scale):
  u = jnp.dot(h, a)
  return jnp.dot(u, b) * scale, (h, u, a, b)


def _low_rank_bwd(scale, res, g):
  h, u, a, b = res
  flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
  gs, u2, h2 = flat(g * jnp.asarray(scale, g.dtype)), flat(u).astype(g.dtype), flat(h)
  tokens_first = (((0,), (0,)), ((), ()))
  db = jax.lax.dot_general(gs, u2, tokens_first).T  # [out, r] -> [r, out]
  du = jnp.dot(gs, b.T.astype(gs.dtype))
  da = jax.lax.dot_general(du, h2.astype(du.dtype), tokens_first).T  # [r, in] -> [in, r]
  dh = jnp.dot(du, a.T.astype(du.dtype)).reshape(h.shape).astype(h.dtype)
  return dh, da.astype(a.dtype), db.astype(b.dtype)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dropout_low_rank(x, a, b, seed, scale, rate):
  return low_rank(_drop(x, seed, rate).astype(a.dtype), a, b, scale)


def _dropout_low_rank_fwd(x, a, b, seed, scale, rate):
  y, (_, u, _, _) = _low_rank_fwd(_drop(x, seed, rate).astype(a.dtype), a, b, scale)
  return y, (x, u, a, b, seed)  # x, not its dropped-out copy


def _dropout_low_rank_bwd(scale, rate, res, g):
  x, u, a, b, seed = res
  h = _drop(x, seed, rate).astype(a.dtype)  # redrawn: the same mask as the forward's
  dh, da, db = _low_rank_bwd(scale, (h, u, a, b), g)
  # Dropout's VJP is the same masked rescaling, applied to the cotangent.
  dx = _drop(dh.astype(x.dtype), seed, rate)
  return dx, da, db, np.zeros(seed.shape, jax.dtypes.float0)


_dropout_low_rank.defvjp(_dropout_low_rank_fwd, _dropout_low_rank_bwd)
