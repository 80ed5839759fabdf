"""The LoRA branch: hashed dropout masks (rate, independence, determinism) and the hand-written
VJP of the low-rank product (against autodiff of the plain formula)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from markovian_jax.models import lora_branch
from tests import helpers


def _plain(h, a, b, scale):
  return jnp.dot(jnp.dot(h, a), b) * scale


@pytest.mark.parametrize("shape", [(3, 7, 12), (5, 12)])
def test_low_rank_value_and_gradients_match_autodiff(shape):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  h = jax.random.normal(k[0], shape)
  a = jax.random.normal(k[1], (12, 4))
  b = jax.random.normal(k[2], (4, 9))
  ct = jax.random.normal(k[3], shape[:-1] + (9,))

  def loss(fn, h, a, b):
    return jnp.sum(fn(h, a, b, 1.75) * ct)

  # Two float32 programs' products and gradients (values up to ~200): elements near 0 carry the
  # rounding of sums as large as the largest, so 32 float32 ulps of max|value| (measured: <= 2).
  plain = _plain(h, a, b, 1.75)
  np.testing.assert_allclose(
    lora_branch.low_rank(h, a, b, 1.75), plain, rtol=0, atol=helpers.ulps(32, of=plain)
  )
  ours = jax.grad(lambda *x: loss(lora_branch.low_rank, *x), argnums=(0, 1, 2))(h, a, b)
  ref = jax.grad(lambda *x: loss(_plain, *x), argnums=(0, 1, 2))(h, a, b)
  for name, o, r in zip("hab", ours, ref):
    assert o.shape == r.shape and o.dtype == r.dtype, name
    np.testing.assert_allclose(o, r, rtol=0, atol=helpers.ulps(32, of=r), err_msg=name)


def test_low_rank_mixed_dtypes_keep_each_input_dtype():
  h = jnp.ones((2, 3, 8), jnp.bfloat16)
  a, b = jnp.ones((8, 2), jnp.float32), jnp.ones((2, 5), jnp.float32)
  dh, da, db = jax.grad(
    lambda h, a, b: jnp.sum(lora_branch.low_rank(h.astype(a.dtype), a, b, 2.0)), argnums=(0, 1, 2)
  )(h, a, b)
  assert (dh.dtype, da.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
  # d/db_jk of sum 2 * (h a) b = 2 * sum over tokens of (h a)_j = 2 * 6 tokens * 8.
  np.testing.assert_allclose(db, np.full((2, 5), 96.0))


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_low_rank_matches_autodiff_of_dropout_then_low_rank(x_dtype):
  """Same mask, values and gradients as the composition, though the mask is redrawn."""
  k = jax.random.split(jax.random.PRNGKey(5), 5)
  x = jax.random.normal(k[0], (3, 40, 12)).astype(x_dtype)
  a = jax.random.normal(k[1], (12, 4))
  b = jax.random.normal(k[2], (4, 9))
  ct = jax.random.normal(k[3], (3, 40, 9))
  rate, scale = 0.3, 1.75

  def loss(fused, x, a, b):
    if fused:
      y = lora_branch.dropout_low_rank(k[4], x, a, b, scale, rate)
    else:
      y = _plain(lora_branch.dropout(k[4], x, rate).astype(a.dtype), a, b, scale)
    return jnp.sum(y * ct)

  np.testing.assert_allclose(loss(True, x, a, b), loss(False, x, a, b), rtol=1e-6)
  ours = jax.jit(jax.grad(lambda *v: loss(True, *v), argnums=(0, 1, 2)))(x, a, b)
  ref = jax.grad(lambda *v: loss(False, *v), argnums=(0, 1, 2))(x, a, b)
  for name, o, r in zip("xab", ours, ref):
    assert o.shape == r.shape and o.dtype == r.dtype, name
    r32 = np.asarray(r, np.float32)
    # float32: 32 ulps of max|value|; a bfloat16 gradient: one bfloat16 rounding of the largest.
    atol = (
      helpers.ulps(32, of=r32)
      if r.dtype == jnp.float32
      else float(jnp.finfo(r.dtype).eps) * np.abs(r32).max()
    )
    np.testing.assert_allclose(np.asarray(o, np.float32), r32, rtol=0, atol=atol, err_msg=name)
  # Dropped entries get no gradient; about `rate` of them are dropped.
  keep = np.asarray(lora_branch.keep_mask(k[4], x.shape, rate))
  assert np.all(np.asarray(ours[0])[~keep] == 0) and abs((~keep).mean() - rate) < 0.08
  # Rate 0 is the plain product; rate 1 is refused.
  plain = _plain(x.astype(a.dtype), a, b, scale)
  np.testing.assert_allclose(
    lora_branch.dropout_low_rank(k[4], x, a, b, scale, 0.0),
    plain,
    rtol=0,
    atol=helpers.ulps(32, of=plain),
  )
  with pytest.raises(ValueError, match="rate"):
    lora_branch.dropout_low_rank(k[4], x, a, b, scale, 1.0)


def test_keep_mask_rate_and_independence():
  n = 1 << 20
  rate = 0.1
  m1 = np.asarray(lora_branch.keep_mask(jax.random.PRNGKey(0), (n,), rate))
  m2 = np.asarray(lora_branch.keep_mask(jax.random.PRNGKey(1), (n,), rate))
  sd = np.sqrt(0.9 * 0.1 / n)
  assert abs(m1.mean() - 0.9) < 5 * sd
  # Independent streams: P(keep in both) = 0.81, for two keys and for neighbouring entries.
  sd2 = np.sqrt(0.81 * 0.19 / n)
  assert abs((m1 & m2).mean() - 0.81) < 5 * sd2
  assert abs((m1[1:] & m1[:-1]).mean() - 0.81) < 5 * sd2
  # Runs of drops are as short as for fair coins: no long structure along the index.
  assert abs((~m1[::2] & ~m1[1::2]).mean() - 0.01) < 5 * np.sqrt(0.01 * 0.99 / (n // 2))
  # Same key, same mask (the dropout of one step is reproducible), and a 2-D shape is the
  # row-major view of the flat mask.
  np.testing.assert_array_equal(
    m1, np.asarray(lora_branch.keep_mask(jax.random.PRNGKey(0), (n,), rate))
  )
  np.testing.assert_array_equal(
    m1.reshape(1024, 1024),
    np.asarray(lora_branch.keep_mask(jax.random.PRNGKey(0), (1024, 1024), rate)),
  )


def test_dropout_scales_kept_entries_and_checks_rate():
  x = jnp.ones((4096,), jnp.float32)
  y = np.asarray(lora_branch.dropout(jax.random.PRNGKey(3), x, 0.25))
  assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
  assert abs(y.mean() - 1.0) < 5 * np.sqrt(0.25 / 0.75 / 4096)
  np.testing.assert_array_equal(lora_branch.dropout(jax.random.PRNGKey(3), x, 0.0), x)
  with pytest.raises(ValueError, match="rate"):
    lora_branch.dropout(jax.random.PRNGKey(3), x, 1.0)
