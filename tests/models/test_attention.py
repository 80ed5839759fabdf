"""The attention kernels (`DecoderConfig.attention_impl`): `jax.nn.dot_product_attention` against
the einsum path on CPU.

"dot_product" runs XLA's implementation of `jax.nn.dot_product_attention`, which every backend
has; cuDNN's needs a GPU and is checked by `benchmarks.accelerator`'s preflight. The einsum path is
the reference: it stays the kernel of the KV-cache decode and of the shared-prefix attention.
Tolerances are fp32 rounding: the two kernels do the same products in a different order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from markovian_jax import sampling
from markovian_jax.models import ConfigError, decoder, logprobs
from tests import helpers

# The two kernels' float32 hidden states / logits: elements near 0 carry the rounding of sums as
# large as the largest element, so 32 float32 ulps of max|value| (measured: <= 3).
ULPS = 32


def _same(actual, desired):
  np.testing.assert_allclose(actual, desired, rtol=0, atol=helpers.ulps(ULPS, of=desired))


KERNELS = ("einsum", "dot_product")


@pytest.fixture(scope="module")
def model():
  config = helpers.tiny_config()
  params, lora = helpers.random_model(config)
  return config, params, lora


def _ragged(config, rows=4, width=12, seed=0):
  """Left-padded batch: row i has i * 3 pad tokens (row 3 is 3 real tokens)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, config.vocab_size, (rows, width)).astype(np.int32)
  mask = np.arange(width)[None, :] >= 3 * np.arange(rows)[:, None]
  return jnp.asarray(np.where(mask, tokens, 0)), jnp.asarray(mask)


def _with(config, impl):
  return config.replace(attention_impl=impl)


def test_kernel_choice_is_one_table():
  c = helpers.tiny_config()
  assert jax.default_backend() == "cpu"
  assert decoder.attention_kernel(c, 8) == "einsum"  # auto on CPU
  assert decoder.attention_kernel(_with(c, "einsum"), 8) == "einsum"
  assert decoder.attention_kernel(_with(c, "dot_product"), 8) == "xla"
  assert decoder.attention_kernel(_with(c, "cudnn"), 8) == "cudnn"
  with pytest.raises(ConfigError, match="attention_impl"):
    _with(c, "flash")


def test_auto_on_gpu_prefers_cudnn_and_falls_back_to_xla(monkeypatch):
  """Under "auto" on a GPU, bf16 self-attention asks cuDNN first; a call cuDNN refuses (here: no
  cuDNN on this CPU) runs XLA's implementation, with its result. An explicit "cudnn" raises."""
  c = helpers.tiny_config(dtype="bfloat16", param_dtype="bfloat16")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert decoder.attention_kernel(c, 8) == "cudnn"
  assert decoder.attention_kernel(c, 7) == "xla"  # odd length: cuDNN's masked backward refuses it
  assert decoder.attention_kernel(c.replace(dtype="float32"), 8) == "xla"
  monkeypatch.undo()
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 8, 4, 16)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(2, 8, 2, 16)), jnp.bfloat16) for _ in range(2))
  mask = decoder.attention_mask(jnp.ones((2, 8), bool), 8)
  out = decoder._dot_product_attention("cudnn", q, k, v, mask, fallback=True)
  ref = decoder._dot_product_attention("xla", q, k, v, mask)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
  with pytest.raises((RuntimeError, NotImplementedError, ValueError)):
    decoder._dot_product_attention("cudnn", q, k, v, mask, fallback=False)


@pytest.mark.parametrize("with_lora", [False, True])
def test_forward_on_ragged_left_padded_batch(model, with_lora):
  config, params, lora = model
  tokens, mask = _ragged(config)
  out = {
    impl: np.asarray(
      decoder.forward(
        _with(config, impl), params, tokens, attention_mask=mask, lora=lora if with_lora else None
      )[0]
    )
    for impl in KERNELS
  }
  m = np.asarray(mask)
  _same(out["dot_product"][m], out["einsum"][m])
  # Padding rows stay finite (the mean of the values in both kernels), so no NaN leaks anywhere.
  assert np.isfinite(out["dot_product"]).all()
  _same(out["dot_product"], out["einsum"])


def test_bf16_forward_matches_within_bf16_rounding(model):
  """bf16 weights and matmuls, fp32 softmax in both kernels: the same rounding points."""
  config, params, lora = model
  c16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens, mask = _ragged(config)
  out = {
    impl: np.asarray(
      decoder.forward(_with(c16, impl), p16, tokens, attention_mask=mask)[0], np.float32
    )
    for impl in KERNELS
  }
  m = np.asarray(mask)
  scale = np.abs(out["einsum"][m]).max()
  assert np.abs(out["dot_product"][m] - out["einsum"][m]).max() <= 2e-2 * scale


def test_kv_cache_prefill_and_decode(model):
  """Prefill of a ragged left-padded batch into a cache (dot_product_attention on its own keys),
  then decode steps (the einsum path over the cache): the same logits and caches as the einsum
  path all the way, and as a full recompute without the cache."""
  config, params, lora = model
  tokens, mask = _ragged(config, rows=3, width=8, seed=1)
  b, p, n = tokens.shape[0], tokens.shape[1], 4
  rng = np.random.default_rng(2)
  new = jnp.asarray(rng.integers(3, config.vocab_size, (b, n)), jnp.int32)
  results = {}
  for impl in KERNELS:
    c = _with(config, impl)
    cache = tuple(jnp.zeros(s, jnp.float32) for s in decoder.cache_shape(c, b, p + n))
    # Prefill into a cache of exactly P slots (as the sampler does), then grow it for decoding.
    small = tuple(jnp.zeros(s, jnp.float32) for s in decoder.cache_shape(c, b, p))
    pos = decoder.positions_from_mask(mask)
    h, small = decoder.forward(
      c, params, tokens, positions=pos, lora=lora, cache=small, cache_index=0, cache_mask=mask
    )
    cache = (cache[0].at[..., :p].set(small[0]), cache[1].at[..., :p, :].set(small[1]))
    steps = [np.asarray(decoder.project(c, params, h[:, -1]))]
    slots = jnp.pad(mask, [(0, 0), (0, n)])
    nxt = pos[:, -1] + 1
    for i in range(n):
      slots = slots.at[:, p + i].set(True)
      h, cache = decoder.forward(
        c,
        params,
        new[:, i : i + 1],
        positions=nxt[:, None] + i,
        lora=lora,
        cache=cache,
        cache_index=p + i,
        cache_mask=slots,
      )
      steps.append(np.asarray(decoder.project(c, params, h[:, 0])))
    results[impl] = (np.stack(steps), [np.asarray(x) for x in cache])
  _same(results["dot_product"][0], results["einsum"][0])
  for a, e in zip(results["dot_product"][1], results["einsum"][1]):
    _same(a, e)
  # And both equal the logits of the whole sequence computed at once.
  full = jnp.concatenate([tokens, new], axis=1)
  fmask = jnp.pad(mask, [(0, 0), (0, n)], constant_values=True)
  ref = decoder.logits(_with(config, "dot_product"), params, full, lora, attention_mask=fmask)
  _same(results["dot_product"][0], np.asarray(ref[:, p - 1 :]).transpose(1, 0, 2))


def test_sampler_is_unchanged(model):
  """`sampling.generate` (greedy, ragged prompts, LoRA): the same tokens and log-probs."""
  config, params, lora = model
  prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
  out = {
    impl: sampling.generate(
      _with(config, impl), params, prompts, max_new_tokens=5, temperature=0.0, lora=lora, bucket=4
    )
    for impl in KERNELS
  }
  np.testing.assert_array_equal(
    np.asarray(out["dot_product"].tokens), np.asarray(out["einsum"].tokens)
  )
  np.testing.assert_allclose(
    np.asarray(out["dot_product"].logprobs),
    np.asarray(out["einsum"].logprobs),
    rtol=helpers.ulps(16),
  )


def test_update_terms_and_their_lora_gradient(model):
  """The update's policy terms (`continuation_logprobs`: the prompt pass runs dot_product
  attention, the continuations the shared-prefix einsum path) and their LoRA gradient."""
  config, params, lora = model
  lora = lora.replace(dropout=0.0)
  q, g, t = 2, 2, 5
  prefix, pmask = _ragged(config, rows=q, width=8, seed=3)
  rng = np.random.default_rng(4)
  cont = jnp.asarray(rng.integers(3, config.vocab_size, (q * g, t)), jnp.int32)
  cmask = jnp.ones((q * g, t), bool).at[1, -2:].set(False)

  def terms(impl, lora_):
    out = logprobs.continuation_logprobs(
      _with(config, impl),
      params,
      prefix,
      pmask,
      cont,
      cmask,
      lora=lora_,
      with_kl=True,
      with_entropy=True,
    )
    return out.logprobs, out.kl, out.entropy

  def loss(impl, lora_):
    lp, kl, ent = terms(impl, lora_)
    return jnp.sum(lp) - 0.1 * jnp.sum(kl) + 0.01 * jnp.sum(ent)

  # Jitted, as training runs them (op-by-op, every primitive would compile on its own).
  want = jax.jit(lambda l: terms("einsum", l))(lora)
  for a, e in zip(jax.jit(lambda l: terms("dot_product", l))(lora), want):
    # log-probs, KL, entropy: a KL near 0 carries the rounding of the log-probs it is made of
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(e), rtol=0, atol=helpers.ulps(ULPS, of=want[0])
    )
  grad = jax.jit(jax.grad(lambda l: loss("dot_product", l)))(lora)
  ref = jax.jit(jax.grad(lambda l: loss("einsum", l)))(lora)
  for a, e in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5 * float(jnp.abs(e).max())
    )
