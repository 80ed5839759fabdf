"""Sampler and teacher-forced log-probs against full recompute, numpy and exact distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from markovian_jax import batching, logprobs, sampling
from markovian_jax.models import init_lora, init_params, logits

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]


@pytest.fixture(scope="module")
def model(tiny_config):
  params = init_params(tiny_config, jax.random.PRNGKey(0))
  lora = jax.tree.map(lambda x: x + 0.05, init_lora(tiny_config, jax.random.PRNGKey(1)))
  return tiny_config, params, lora


def _teacher_forced(config, params, lora, prompts, out, g, t, **kw):
  toks, mask = batching.pad_left([p for p in prompts for _ in range(g)], 64)
  full = np.concatenate([toks, np.asarray(out.tokens)], 1)
  fmask = np.concatenate([mask, np.ones(out.tokens.shape, bool)], 1)
  return logprobs.token_logprobs(config, params, jnp.asarray(full), jnp.asarray(fmask),
                                 lora=lora, temperature=t, **kw)


def test_greedy_equals_full_recompute_on_ragged_batch(model):
  config, params, _ = model
  out = sampling.generate(config, params, PROMPTS, max_new_tokens=8, temperature=0.0)
  for i, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for _ in range(8):
      seq.append(int(jnp.argmax(logits(config, params, jnp.asarray([seq]))[0, -1])))
    assert out.tokens[i].tolist() == seq[len(prompt):]


@pytest.mark.parametrize("use_lora", [False, True])
def test_sampled_logprobs_equal_teacher_forced(model, use_lora):
  config, params, lora = model
  lora = lora if use_lora else None
  out = sampling.generate(config, params, PROMPTS, max_new_tokens=8, temperature=0.7,
                          rng=jax.random.PRNGKey(3), lora=lora, num_samples=3)
  assert out.tokens.shape == (6, 8) and out["logprobs"].shape == (6, 8)
  tf = _teacher_forced(config, params, lora, PROMPTS, out, 3, 0.7, chunk_size=16)
  np.testing.assert_allclose(np.asarray(tf.logprobs[:, -8:]), np.asarray(out.logprobs), atol=1e-4)


def test_samples_are_grouped_by_prompt(model):
  config, params, _ = model
  out = sampling.generate(config, params, PROMPTS, max_new_tokens=8, temperature=0.0,
                          num_samples=3)
  t = np.asarray(out.tokens)
  assert (t[0] == t[1]).all() and (t[1] == t[2]).all() and (t[3] == t[5]).all()
  assert not (t[0] == t[3]).all()


def test_first_token_frequencies_match_softmax(model):
  config, params, _ = model
  temperature, n = 1.5, 4096
  out = sampling.generate(config, params, [PROMPTS[0]], max_new_tokens=1,
                          temperature=temperature, rng=jax.random.PRNGKey(7), num_samples=n)
  probs = np.asarray(jax.nn.softmax(logits(config, params, jnp.asarray([PROMPTS[0]]))[0, -1]
                                    / temperature), np.float64)
  counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=probs.size)
  tv = 0.5 * np.abs(counts / n - probs).sum()
  # Expected TV of an exact sampler at n=4096 over a ~flat 512-way distribution is
  # 0.5 * 512 * sqrt(2/pi) * sqrt(p(1-p)/n) ~= 0.14 (p = 1/512); 0.2 leaves sampling noise room.
  assert tv < 0.2, tv
  wrong = np.asarray(jax.nn.softmax(logits(config, params, jnp.asarray([PROMPTS[0]]))[0, -1]))
  assert 0.5 * np.abs(counts / n - np.roll(wrong, 1)).sum() > tv


def test_top_k_and_top_p_stay_in_the_allowed_set(model):
  config, params, _ = model
  last = np.asarray(logits(config, params, jnp.asarray([PROMPTS[0]]))[0, -1])
  order = np.argsort(-last)
  out = sampling.generate(config, params, [PROMPTS[0]], max_new_tokens=1, temperature=1.0,
                          top_k=5, rng=jax.random.PRNGKey(2), num_samples=512)
  assert set(np.asarray(out.tokens[:, 0]).tolist()) <= set(order[:5].tolist())
  p = np.exp(last - last.max())
  p /= p.sum()
  cum = np.cumsum(p[order])
  allowed = set(order[:int(np.searchsorted(cum, 0.3)) + 1].tolist())
  out = sampling.generate(config, params, [PROMPTS[0]], max_new_tokens=1, temperature=1.0,
                          top_p=0.3, rng=jax.random.PRNGKey(2), num_samples=512)
  assert set(np.asarray(out.tokens[:, 0]).tolist()) <= allowed


def test_min_new_tokens_masks_eos(model):
  config, params, _ = model
  greedy = sampling.generate(config, params, [PROMPTS[0]], max_new_tokens=6, temperature=0.0)
  eos = int(greedy.tokens[0, 0])  # the argmax first token plays EOS
  stopped = sampling.generate(config, params, [PROMPTS[0]], max_new_tokens=6, temperature=0.0,
                              eos_ids=(eos,))
  assert int(stopped.lengths[0]) == 1 and (np.asarray(stopped.tokens[0, 1:]) == eos).all()
  forced = sampling.generate(config, params, [PROMPTS[0]], max_new_tokens=6, temperature=0.0,
                             eos_ids=(eos,), min_new_tokens=6)
  assert int(forced.lengths[0]) == 6 and eos not in np.asarray(forced.tokens[0]).tolist()


def test_chunked_logprobs_kl_entropy_match_numpy(model):
  config, params, lora = model
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 21), 0, config.vocab_size)
  mask = jnp.ones(tokens.shape, bool)
  t = 0.8
  out = logprobs.token_logprobs(config, params, tokens, mask, lora=lora, temperature=t,
                                chunk_size=8, with_kl=True, with_entropy=True,
                                with_reference=True)
  pol = np.asarray(jax.nn.log_softmax(logits(config, params, tokens, lora) / t), np.float64)
  ref = np.asarray(jax.nn.log_softmax(logits(config, params, tokens) / t), np.float64)
  tok = np.asarray(tokens)
  lp = np.take_along_axis(pol[:, :-1], tok[:, 1:, None], -1)[..., 0]
  kl = (np.exp(pol) * (pol - ref)).sum(-1)[:, :-1]
  ent = -(np.exp(pol) * pol).sum(-1)[:, :-1]
  np.testing.assert_allclose(np.asarray(out.logprobs[:, 1:]), lp, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.kl[:, 1:]), kl, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.entropy[:, 1:]), ent, atol=1e-4)
  assert float(jnp.abs(out.kl).max()) > 1e-3
  unchunked = logprobs.token_logprobs(config, params, tokens, mask, lora=lora, temperature=t,
                                      chunk_size=64)
  np.testing.assert_allclose(np.asarray(unchunked.logprobs), np.asarray(out.logprobs), atol=1e-6)
  tail = logprobs.token_logprobs(config, params, tokens, mask, lora=lora, temperature=t,
                                 chunk_size=8, with_kl=True, last_n=7)
  np.testing.assert_allclose(np.asarray(tail.logprobs[:, -7:]), np.asarray(out.logprobs[:, -7:]),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(tail.kl[:, -7:]), np.asarray(out.kl[:, -7:]), atol=1e-6)
  assert float(jnp.abs(tail.logprobs[:, :-7]).max()) == 0.0
  base = logprobs.token_logprobs(config, params, tokens, mask, with_kl=True)
  assert float(jnp.abs(base.kl).max()) < 1e-6


def test_compile_count_is_visible(model):
  config, params, _ = model
  before = sampling.compile_count()
  for _ in range(2):
    sampling.generate(config, params, [[3, 4, 5, 6]], max_new_tokens=3, temperature=0.0)
  assert sampling.compile_count() - before <= 1
