"""Chunked teacher-forced log-probs, KL and entropy against numpy on the full logits, and their
gradient w.r.t. the LoRA against an unchunked reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from markovian_jax.models import decoder, logits, logprobs
from markovian_jax.sampling import batching
from tests import helpers

T = 0.8
# Two float32 programs computing the same terms (another chunking, scoring only the tail, a
# precomputed reference): log-softmax and entropy reduce over V = 512 terms in an order XLA:CPU's
# threads may change, up to log2(V) = 9 ulps for a pairwise reduction, so 16 ulps of the values
# compared. KL, a sum of p (log p - log q), can be ~0: its rounding is that of the log-probs it is
# made of, so it also gets 16 ulps of their size (atol, `_lp_ulps`).
ULPS = 16


def _lp_ulps(out) -> float:
  """ULPS float32 ulps of the largest log-prob in `out`: the rounding scale of KL terms."""
  return helpers.ulps(ULPS, of=out.logprobs)


@pytest.fixture(scope="module")
def model(tiny_config):
  return (tiny_config, *helpers.random_model(tiny_config, lora_dropout=0.3))


@pytest.fixture(scope="module")
def batch(tiny_config):
  """A left-padded ragged batch [3, 21] and a target mask over the last 7 positions."""
  rng = np.random.default_rng(4)
  seqs = [rng.integers(0, tiny_config.vocab_size, n).tolist() for n in (21, 15, 9)]
  tokens, mask = batching.pad_left(seqs, 21)
  target = np.zeros_like(mask)
  target[:, -7:] = True
  return seqs, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(target)


@pytest.fixture(scope="module")
def scored(model):
  """One jitted call per option set, shared by the tests."""
  config, params, _ = model

  @jax.jit
  def fn(lora, tokens, mask, target, ref_hidden=None, dropout_rng=None):
    return logprobs.token_logprobs(
      config,
      params,
      tokens,
      mask,
      target_mask=target,
      lora=lora,
      temperature=T,
      chunk_size=8,
      with_kl=True,
      with_entropy=True,
      with_reference=True,
      reference_hidden=ref_hidden,
      dropout_rng=dropout_rng,
    )

  return fn


def _numpy_terms(config, params, lora, seq):
  """float64 per-token log-probs, KL(pi||base), entropy and base log-probs of one unpadded row,
  from the full logits (aligned: entry t is about token t; entry 0 unused)."""
  ids = jnp.asarray([seq])
  pol = np.asarray(jax.nn.log_softmax(logits(config, params, ids, lora)[0] / T), np.float64)
  ref = np.asarray(jax.nn.log_softmax(logits(config, params, ids)[0] / T), np.float64)
  tok = np.asarray(seq)
  lp = np.take_along_axis(pol[:-1], tok[1:, None], -1)[:, 0]
  ref_lp = np.take_along_axis(ref[:-1], tok[1:, None], -1)[:, 0]
  kl = (np.exp(pol) * (pol - ref)).sum(-1)[:-1]
  ent = -(np.exp(pol) * pol).sum(-1)[:-1]
  pad = lambda x: np.concatenate([[0.0], x])  # noqa: E731
  return pad(lp), pad(kl), pad(ent), pad(ref_lp)


def test_chunked_terms_match_numpy_on_a_ragged_batch(model, batch, scored):
  config, params, lora = model
  seqs, tokens, mask, target = batch
  out = scored(lora, tokens, mask, target)
  assert out.logprobs.shape == tokens.shape and out.logprobs.dtype == jnp.float32
  for r, seq in enumerate(seqs):
    lp, kl, ent, ref_lp = _numpy_terms(config, params, lora, seq)
    scored_cols = slice(21 - 7, 21)  # the target mask: last 7 columns, all real tokens
    tail = slice(len(seq) - 7, len(seq))
    ulps = dict(rtol=helpers.ulps(ULPS))  # numpy on the same model's float32 logits
    np.testing.assert_allclose(np.asarray(out.logprobs[r, scored_cols]), lp[tail], **ulps)
    np.testing.assert_allclose(np.asarray(out.ref_logprobs[r, scored_cols]), ref_lp[tail], **ulps)
    np.testing.assert_allclose(
      np.asarray(out.kl[r, scored_cols]), kl[tail], **ulps, atol=_lp_ulps(out)
    )
    np.testing.assert_allclose(np.asarray(out.entropy[r, scored_cols]), ent[tail], **ulps)
    for x in (out.logprobs, out.kl, out.entropy, out.ref_logprobs):
      assert float(jnp.abs(x[r, : 21 - 7]).max()) == 0.0  # outside the target mask
  assert float(out.kl.min()) >= -1e-6 and float(out.kl.max()) > 1e-3  # the adapter matters


def test_chunking_does_not_change_the_result(model, batch, scored):
  config, params, lora = model
  _, tokens, mask, target = batch
  chunked = scored(lora, tokens, mask, target)
  whole = logprobs.token_logprobs(
    config,
    params,
    tokens,
    mask,
    target_mask=target,
    lora=lora,
    temperature=T,
    chunk_size=64,
    with_kl=True,
    with_entropy=True,
  )
  for name in ("logprobs", "kl", "entropy"):
    np.testing.assert_allclose(
      np.asarray(getattr(whole, name)),
      np.asarray(getattr(chunked, name)),
      rtol=helpers.ulps(ULPS),
      atol=_lp_ulps(chunked) if name == "kl" else 0,
      err_msg=name,
    )
  # Scoring only the last 7 tokens projects only those positions, with the same values.
  tail = logprobs.token_logprobs(
    config, params, tokens, mask, lora=lora, temperature=T, chunk_size=8, with_kl=True, last_n=7
  )
  np.testing.assert_allclose(
    np.asarray(tail.logprobs), np.asarray(chunked.logprobs), rtol=helpers.ulps(ULPS)
  )
  np.testing.assert_allclose(
    np.asarray(tail.kl), np.asarray(chunked.kl), rtol=helpers.ulps(ULPS), atol=_lp_ulps(chunked)
  )


def test_reference_terms_without_an_adapter(model, batch, scored):
  config, params, lora = model
  _, tokens, mask, target = batch
  base = scored(None, tokens, mask, target)
  assert float(jnp.abs(base.kl).max()) <= _lp_ulps(base)  # KL(base || base) = 0
  np.testing.assert_allclose(
    np.asarray(base.ref_logprobs), np.asarray(base.logprobs), rtol=helpers.ulps(ULPS)
  )
  # Precomputed reference hidden states give the same terms as computing them inside.
  ref_hidden, _ = decoder.forward(config, params, tokens, attention_mask=mask)
  given = scored(lora, tokens, mask, target, ref_hidden)
  inside = scored(lora, tokens, mask, target)
  np.testing.assert_allclose(
    np.asarray(given.kl), np.asarray(inside.kl), rtol=helpers.ulps(ULPS), atol=_lp_ulps(inside)
  )
  np.testing.assert_allclose(
    np.asarray(given.ref_logprobs), np.asarray(inside.ref_logprobs), rtol=helpers.ulps(ULPS)
  )


@pytest.mark.parametrize("recompute", [False, True], ids=["saved-logits", "recomputed-logits"])
def test_gradient_wrt_lora_matches_an_unchunked_reference(model, batch, recompute, monkeypatch):
  if recompute:  # the path a 128k vocabulary takes: every chunk under jax.checkpoint
    monkeypatch.setattr(logprobs, "SAVED_LOGITS_BYTES", 0)
  config, params, lora = model
  _, tokens, mask, target = batch
  valid = np.asarray(mask) & np.pad(np.asarray(mask)[:, :-1], [(0, 0), (1, 0)]) & np.asarray(target)

  def chunked_loss(lora_params):
    out = logprobs.token_logprobs(
      config,
      params,
      tokens,
      mask,
      target_mask=target,
      lora=lora.replace(params=lora_params),
      temperature=T,
      chunk_size=4,
      with_kl=True,
      with_entropy=True,
    )
    return jnp.sum(out.logprobs) - 0.3 * jnp.sum(out.kl) + 0.1 * jnp.sum(out.entropy)

  def direct_loss(lora_params):
    ad = lora.replace(params=lora_params)
    pol = jax.nn.log_softmax(logits(config, params, tokens, ad, attention_mask=mask) / T)[:, :-1]
    ref = jax.nn.log_softmax(logits(config, params, tokens, attention_mask=mask) / T)[:, :-1]
    lp = jnp.take_along_axis(pol, tokens[:, 1:, None], -1)[..., 0]
    kl = jnp.sum(jnp.exp(pol) * (pol - jax.lax.stop_gradient(ref)), -1)
    ent = -jnp.sum(jnp.exp(pol) * pol, -1)
    v = jnp.asarray(valid[:, 1:])
    return jnp.sum(jnp.where(v, lp - 0.3 * kl + 0.1 * ent, 0.0))

  h = jnp.zeros((3, 8, config.hidden_size))
  jaxpr = str(
    jax.make_jaxpr(
      lambda h: logprobs._project_chunks(  # noqa: SLF001
        config, params, h, None, tokens[:, :8], T, 4, False, False, False
      )
    )(h)
  )
  assert ("remat" in jaxpr) == recompute  # jax.checkpoint shows as a remat primitive
  v1, g1 = jax.jit(jax.value_and_grad(chunked_loss))(lora.params)
  v2, g2 = jax.jit(jax.value_and_grad(direct_loss))(lora.params)
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
  flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
  scale = max(float(jnp.abs(g).max()) for g in flat2)
  assert scale > 1e-3
  for a, b in zip(flat1, flat2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale)


def test_lora_dropout_only_with_a_dropout_rng(model, batch, scored):
  _, tokens, mask, target = batch
  _, _, lora = model
  plain = scored(lora, tokens, mask, target)
  d1 = scored(lora, tokens, mask, target, None, jax.random.PRNGKey(1))
  d1_again = scored(lora, tokens, mask, target, None, jax.random.PRNGKey(1))
  d2 = scored(lora, tokens, mask, target, None, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(d1.logprobs), np.asarray(d1_again.logprobs))
  assert float(jnp.abs(d1.logprobs - plain.logprobs).max()) > 1e-4
  assert float(jnp.abs(d1.logprobs - d2.logprobs).max()) > 1e-4
  # Dropout touches the policy only: the reference log-probs are unchanged.
  np.testing.assert_allclose(
    np.asarray(d1.ref_logprobs), np.asarray(plain.ref_logprobs), rtol=helpers.ulps(ULPS)
  )


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(attention_mask=np.ones((3, 20), bool)), "must be [B, T] and match attention_mask"),
    (dict(target_mask=np.ones((3, 20), bool)), "target_mask (3, 20) must match tokens (3, 21)"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (
      dict(reference_hidden=np.zeros((3, 20, 64), np.float32), with_kl=True),
      "reference_hidden (3, 20, 64) must be [B, T, D]",
    ),
  ],
)
def test_bad_input_is_named(model, batch, kwargs, message):
  config, params, _ = model
  _, tokens, mask, _ = batch
  args = dict(attention_mask=mask)
  args.update(kwargs)
  with pytest.raises(ValueError) as err:
    logprobs.token_logprobs(config, params, tokens, args.pop("attention_mask"), **args)
  assert message in str(err.value)


def test_continuation_logprobs_equal_numpy_on_the_concatenated_rows(model):
  """2 prompts x 2 continuations through the shared-prefix path: log-probs, KL, entropy and base
  log-probs of each continuation token equal numpy on the full logits of [prompt; continuation],
  and the LoRA gradient equals that of `token_logprobs` on the concatenated rows."""
  config, params, lora = model
  rng = np.random.default_rng(7)
  prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (11, 6)]
  conts = rng.integers(0, config.vocab_size, (4, 5)).astype(np.int32)
  cmask = np.ones((4, 5), bool)
  cmask[3, -2:] = False
  ptok, pmask = batching.pad_left(prompts, 12)
  # Jitted, as training runs it (op-by-op, every primitive would compile on its own).
  out = jax.jit(
    lambda l: logprobs.continuation_logprobs(
      config,
      params,
      ptok,
      pmask,
      conts,
      cmask,
      lora=l,
      temperature=T,
      chunk_size=3,
      with_kl=True,
      with_entropy=True,
      with_reference=True,
    )
  )(lora)
  for r in range(4):
    seq = prompts[r // 2] + conts[r].tolist()
    lp, kl, ent, ref = (x[len(prompts[r // 2]) :] for x in _numpy_terms(config, params, lora, seq))
    m = cmask[r]
    for name, ours, want in (
      ("lp", out.logprobs, lp),
      ("kl", out.kl, kl),
      ("entropy", out.entropy, ent),
      ("ref", out.ref_logprobs, ref),
    ):
      np.testing.assert_allclose(
        np.asarray(ours[r])[m], want[m], rtol=helpers.ulps(ULPS), atol=_lp_ulps(out), err_msg=name
      )  # atol: the KL near 0
      assert not np.asarray(ours[r])[~m].any(), name

  full, fmask = batching.pad_left(
    [prompts[r // 2] + conts[r][cmask[r]].tolist() for r in range(4)], 17
  )

  def loss_cont(l):
    o = logprobs.continuation_logprobs(
      config, params, ptok, pmask, conts, cmask, lora=l, temperature=T, with_kl=True
    )
    return jnp.sum(o.logprobs) + jnp.sum(o.kl)

  def loss_full(l):
    target = np.zeros_like(fmask)
    for r in range(4):
      target[r, 17 - cmask[r].sum() :] = True
    o = logprobs.token_logprobs(
      config, params, full, fmask, target_mask=target, lora=l, temperature=T, with_kl=True
    )
    return jnp.sum(o.logprobs) + jnp.sum(jnp.where(target, o.kl, 0.0))

  g1, g2 = jax.jit(jax.grad(loss_cont))(lora), jax.jit(jax.grad(loss_full))(lora)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_full_kl_and_entropy_match_numpy_with_masked_vocab():
  rng = np.random.default_rng(7)
  zp, zq = rng.normal(size=(3, 4, 9)), rng.normal(size=(3, 4, 9))
  zp[..., -2:] = -np.inf  # p = 0 there (e.g. a masked vocabulary): contributes 0, not NaN
  lp, lq = _np_log_softmax(zp), _np_log_softmax(zq)
  p = np.exp(lp)
  kl = np.sum(np.where(p > 0, p * (np.where(p > 0, lp, 0) - lq), 0), -1)
  h = -np.sum(np.where(p > 0, p * np.where(p > 0, lp, 0), 0), -1)
  # float32 sums of 9 terms against float64 (values 0.4-2): 16 float32 ulps of the values.
  np.testing.assert_allclose(
    logprobs.full_kl(lp.astype(np.float32), lq.astype(np.float32)), kl, rtol=helpers.ulps(ULPS)
  )
  np.testing.assert_allclose(logprobs.entropy(lp.astype(np.float32)), h, rtol=helpers.ulps(ULPS))
  for fn in (
    lambda z: jnp.sum(logprobs.full_kl(jax.nn.log_softmax(z), lq)),
    lambda z: jnp.sum(logprobs.entropy(jax.nn.log_softmax(z))),
  ):
    g = jax.grad(fn)(zp.astype(np.float32))
    assert np.all(np.isfinite(np.asarray(g)))
