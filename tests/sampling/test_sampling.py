"""The KV-cache sampler against full recompute, teacher forcing, exact distributions, PyTorch's
`generate`, and its own contract (grouping, EOS handling, compile count, sharding, bad input)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from markovian_jax import sampling
from markovian_jax.models import decoder, init_lora, logits, logprobs
from markovian_jax.runtime import sharding
from markovian_jax.sampling import batching
from tests import helpers

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]  # ragged: left padding differs per row
N = 8
# Log-probs from two float32 programs (sampler and teacher forcing, sharded and not, numpy on the
# same logits): a log-softmax over V = 512 reduced in another order, up to log2(V) = 9 ulps
# (pairwise); 16 float32 ulps of the values compared. A log-prob near 0 carries the rounding of
# logsumexp(z) (of size max|z|): the designed-logit tests add 16 ulps of max|z| (atol).
LP_ULPS = helpers.ulps(16)


@pytest.fixture(scope="module")
def model(tiny_config):
  return (tiny_config, *helpers.random_model(tiny_config, lora_dropout=0.0))


@pytest.fixture(scope="module")
def constant_model(model):
  """(params, z): params whose next-token logits are the same vector z at every position.

  Attention and MLP outputs are zeroed and every token embeds to the same vector, so the final
  hidden state is one constant h; the head outer(h / |h|^2, z) then gives logits z exactly, and
  every step draws i.i.d. from a known distribution.
  """
  config, params, _ = model
  p = jax.tree.map(lambda x: x, params)
  p["layers"]["attn"]["o"]["kernel"] = jnp.zeros_like(p["layers"]["attn"]["o"]["kernel"])
  p["layers"]["mlp"]["down"]["kernel"] = jnp.zeros_like(p["layers"]["mlp"]["down"]["kernel"])
  emb = p["embed"]["embedding"]
  p["embed"]["embedding"] = jnp.broadcast_to(emb[0], emb.shape)
  h = decoder.forward(config, p, jnp.asarray([[3]]))[0][0, 0]
  z = np.asarray(2.5 * jax.random.normal(jax.random.PRNGKey(9), (config.vocab_size,)), np.float64)
  return _with_logits(p, h, z), h, z


def _with_logits(params, h, z):
  head = jnp.outer(h / jnp.dot(h, h), jnp.asarray(z, jnp.float32))
  return {**params, "lm_head": {"kernel": head}}


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _log_softmax(x):
  return x - x.max() - np.log(np.exp(x - x.max()).sum())


# ------------------------------------------------------------------ exactness


def test_greedy_equals_full_recompute_on_ragged_batch(model):
  config, params, _ = model
  out = sampling.generate(config, params, PROMPTS, max_new_tokens=N, temperature=0.0)
  assert out.tokens.dtype == jnp.int32 and out.tokens.shape == (2, N)
  np.testing.assert_array_equal(np.asarray(out.lengths), [N, N])
  # Full recompute without a cache: the whole sequence so far, right-padded to one buffer (the
  # causal mask makes the padding after the last token irrelevant).
  recompute = jax.jit(lambda p, buf: logits(config, p, buf)[0])
  for i, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    full = []
    for _ in range(N):
      buf = np.zeros((1, 16), np.int32)
      buf[0, : len(seq)] = seq
      row = recompute(params, buf)[len(seq) - 1]
      full.append(jax.nn.log_softmax(row))
      seq.append(int(jnp.argmax(row)))
    assert np.asarray(out.tokens[i]).tolist() == seq[len(prompt) :]
    # greedy log-probs are log_softmax of the unscaled logits
    want = [float(lp[t]) for lp, t in zip(full, seq[len(prompt) :])]
    np.testing.assert_allclose(np.asarray(out.logprobs[i]), want, rtol=LP_ULPS)
  # The same prompts as a left-padded array with a mask: same program, same tokens.
  toks, mask = batching.pad_left(PROMPTS, 10)
  again = sampling.generate(
    config, params, toks, prompt_mask=mask, max_new_tokens=N, temperature=0.0
  )
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))


def _teacher_forced(config, params, lora, prompts, tokens, g, temperature):
  toks, mask = batching.pad_left([p for p in prompts for _ in range(g)], 64)
  full = np.concatenate([toks, np.asarray(tokens)], 1)
  fmask = np.concatenate([mask, np.ones(tokens.shape, bool)], 1)
  fn = jax.jit(
    lambda p, l, t, m: logprobs.token_logprobs(
      config, p, t, m, lora=l, temperature=temperature, chunk_size=16
    )
  )
  return np.asarray(fn(params, lora, jnp.asarray(full), jnp.asarray(fmask)).logprobs)[:, -N:]


@pytest.mark.parametrize("use_lora", [False, True])
def test_sampled_logprobs_equal_teacher_forced(model, use_lora):
  config, params, lora = model
  lora = lora if use_lora else None
  t = 0.7
  out = sampling.generate(
    config,
    params,
    PROMPTS,
    max_new_tokens=N,
    temperature=t,
    rng=jax.random.PRNGKey(3),
    lora=lora,
    num_samples=3,
  )
  assert out.tokens.shape == (6, N) and out.logprobs.dtype == jnp.float32
  tf = _teacher_forced(config, params, lora, PROMPTS, out.tokens, 3, t)
  np.testing.assert_allclose(tf, np.asarray(out.logprobs), rtol=LP_ULPS)
  # A wrong grouping (prompt 1's rows scored under prompt 0) would not match.
  wrong = _teacher_forced(config, params, lora, PROMPTS[::-1], out.tokens, 3, t)
  assert np.abs(wrong - np.asarray(out.logprobs)).max() > 1e-3  # ~80x the tolerance here


def test_logprobs_ignore_the_min_new_tokens_eos_block(model):
  """During the first K steps EOS is removed from the draw, but the log-probs keep the unblocked
  normaliser, so they still equal the teacher-forced ones (a blocked normaliser would be off by
  -log(1 - p_eos) ~ 2e-3 here, ~150x the tolerance)."""
  config, params, lora = model
  out = sampling.generate(
    config,
    params,
    PROMPTS,
    max_new_tokens=N,
    min_new_tokens=N,
    temperature=0.7,
    rng=jax.random.PRNGKey(3),
    lora=lora,
    num_samples=3,
    eos_ids=(17, 400),
  )
  assert not np.isin(np.asarray(out.tokens), (17, 400)).any()
  tf = _teacher_forced(config, params, lora, PROMPTS, out.tokens, 3, 0.7)
  np.testing.assert_allclose(tf, np.asarray(out.logprobs), rtol=LP_ULPS)


def test_samples_are_grouped_by_prompt(model):
  config, params, _ = model
  greedy = sampling.generate(config, params, PROMPTS, max_new_tokens=N, temperature=0.0)
  out = sampling.generate(config, params, PROMPTS, max_new_tokens=N, temperature=0.0, num_samples=3)
  t = np.asarray(out.tokens)
  np.testing.assert_array_equal(t, np.repeat(np.asarray(greedy.tokens), 3, axis=0))
  assert not (t[0] == t[3]).all()


def test_generate_with_reference_equals_the_two_separate_calls(model):
  """One decode loop with the base model's greedy rows riding along the policy samples gives
  exactly the samples and log-probs of `generate(lora)` and of greedy `generate(no LoRA)`."""
  config, params, lora = model
  kw = dict(max_new_tokens=N, min_new_tokens=3, eos_ids=(2,), rng=4)
  samples, reference = sampling.generate_with_reference(
    config, params, PROMPTS, lora=lora, temperature=0.9, num_samples=3, **kw
  )
  want_s = sampling.generate(
    config, params, PROMPTS, lora=lora, temperature=0.9, num_samples=3, **kw
  )
  want_r = sampling.generate(config, params, PROMPTS, temperature=0.0, **kw)
  for got, want in ((samples, want_s), (reference, want_r)):
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=LP_ULPS)
  # The reference rows are the base model's, not the policy's.
  policy_greedy = sampling.generate(config, params, PROMPTS, lora=lora, temperature=0.0, **kw)
  assert not np.array_equal(np.asarray(policy_greedy.tokens), np.asarray(reference.tokens))


# ------------------------------------------------------------------ distributions


def _chi_square(counts, probs, n):
  """Pearson statistic and dof over bins with expected count >= 5 (the rest pooled)."""
  expected = probs * n
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def test_sampled_frequencies_match_the_softmax(model, constant_model):
  config, _, _ = model
  params, _, z = constant_model
  temperature, rows = 0.8, 512
  out = sampling.generate(
    config,
    params,
    [PROMPTS[0]],
    max_new_tokens=N,
    num_samples=rows,
    temperature=temperature,
    rng=jax.random.PRNGKey(7),
  )
  tokens = np.asarray(out.tokens).ravel()  # 4096 i.i.d. draws: the logits never change
  counts = np.bincount(tokens, minlength=config.vocab_size)
  stat, dof = _chi_square(counts, _softmax(z / temperature), tokens.size)
  # An exact sampler exceeds the 1 - 1e-4 quantile with probability 1e-4 (any seed).
  limit = stats.chi2.ppf(1 - 1e-4, dof)
  assert stat < limit, (stat, limit)
  # The test has power: forgetting the temperature is rejected by a wide margin.
  wrong, wdof = _chi_square(counts, _softmax(z), tokens.size)
  assert wrong > 2 * stats.chi2.ppf(1 - 1e-4, wdof), wrong
  # Log-probs of every draw are log_softmax(z / T) of the drawn token.
  np.testing.assert_allclose(
    np.asarray(out.logprobs).ravel(),
    _log_softmax(z / temperature)[tokens],
    rtol=LP_ULPS,
    atol=helpers.ulps(16, of=z),
  )


def test_top_k_and_top_p_sample_the_renormalised_set(model, constant_model):
  config, _, _ = model
  params, _, z = constant_model
  order = np.argsort(-z)
  rows = 512
  out = sampling.generate(
    config,
    params,
    [PROMPTS[0]],
    max_new_tokens=N,
    num_samples=rows,
    temperature=1.0,
    top_k=5,
    rng=jax.random.PRNGKey(2),
  )
  tokens = np.asarray(out.tokens).ravel()
  assert set(tokens.tolist()) <= set(order[:5].tolist())
  p = np.zeros_like(z)
  p[order[:5]] = _softmax(z[order[:5]])
  stat, dof = _chi_square(np.bincount(tokens, minlength=z.size), p, tokens.size)
  assert stat < stats.chi2.ppf(1 - 1e-4, dof)
  np.testing.assert_allclose(
    np.asarray(out.logprobs).ravel(),
    z[tokens] - np.log(np.exp(z[order[:5]]).sum()),
    rtol=LP_ULPS,
    atol=helpers.ulps(16, of=z),
  )

  top_p = 0.5
  probs = _softmax(z)
  before = np.cumsum(probs[order]) - probs[order]
  nucleus = order[before < top_p]
  out = sampling.generate(
    config,
    params,
    [PROMPTS[0]],
    max_new_tokens=N,
    num_samples=rows,
    temperature=1.0,
    top_p=top_p,
    rng=jax.random.PRNGKey(2),
  )
  tokens = np.asarray(out.tokens).ravel()
  assert set(tokens.tolist()) <= set(nucleus.tolist()) and len(set(tokens.tolist())) > 1
  np.testing.assert_allclose(
    np.asarray(out.logprobs).ravel(),
    z[tokens] - np.log(np.exp(z[nucleus]).sum()),
    rtol=LP_ULPS,
    atol=helpers.ulps(16, of=z),
  )


# ------------------------------------------------------------------ EOS and lengths


def test_min_new_tokens_yields_exactly_k_tokens_when_eos_is_the_argmax(model, constant_model):
  config, _, _ = model
  params, h, z = constant_model
  eos, eos2 = 100, 200
  z = z.copy()
  z[eos] = z.max() + 4.0  # EOS is the argmax at every step
  z[eos2] = np.sort(z)[-2] + 1e-3  # a second EOS id, the runner-up
  params = _with_logits(params, h, z)
  np.testing.assert_allclose(
    np.asarray(logits(config, params, jnp.asarray([PROMPTS[0]]))[0, -1]),
    z,
    rtol=LP_ULPS,
    atol=helpers.ulps(16, of=z),
  )
  kw = dict(max_new_tokens=N, eos_ids=(eos, eos2), rng=jax.random.PRNGKey(5))

  stopped = sampling.generate(config, params, [PROMPTS[0]], temperature=0.0, **kw)
  assert int(stopped.lengths[0]) == 1 and int(stopped.tokens[0, 0]) == eos
  assert (np.asarray(stopped.tokens[0, 1:]) == eos).all()  # pad id = eos_ids[0]
  assert (np.asarray(stopped.logprobs[0, 1:]) == 0).all()

  forced = sampling.generate(config, params, [PROMPTS[0]], temperature=0.0, min_new_tokens=N, **kw)
  best_other = int(np.argsort(-z)[2])  # the argmax once both EOS ids are blocked
  assert int(forced.lengths[0]) == N
  assert np.asarray(forced.tokens[0]).tolist() == [best_other] * N
  np.testing.assert_allclose(
    np.asarray(forced.logprobs[0]),
    _log_softmax(z)[best_other],
    rtol=LP_ULPS,
    atol=helpers.ulps(16, of=z),
  )  # unblocked normaliser

  rows, k = 256, 4
  out = sampling.generate(
    config, params, [PROMPTS[0]], temperature=1.0, min_new_tokens=k, num_samples=rows, **kw
  )
  toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  lps = np.asarray(out.logprobs)
  is_eos = np.isin(toks, (eos, eos2))
  assert not is_eos[:, :k].any()
  for r in range(rows):
    hits = np.flatnonzero(is_eos[r])
    end = hits[0] + 1 if hits.size else N
    assert lengths[r] == end
    assert (toks[r, end:] == eos).all() and (lps[r, end:] == 0).all()
    np.testing.assert_allclose(
      lps[r, :end], _log_softmax(z)[toks[r, :end]], rtol=LP_ULPS, atol=helpers.ulps(16, of=z)
    )
  p_stop = _softmax(z)[[eos, eos2]].sum()
  assert p_stop > 0.8
  # Once allowed, EOS comes at once for about p_stop of the rows (binomial, 256 rows).
  assert abs(np.mean(lengths == k + 1) - p_stop) < 4 * np.sqrt(p_stop * (1 - p_stop) / rows) + 1e-3
  assert lengths.min() == k + 1


# ------------------------------------------------------------------ the program: compiles, mesh


def test_one_program_serves_any_weights_temperature_and_min_tokens(model, caplog):
  config, params, lora = model
  kw = dict(max_new_tokens=N, num_samples=3, lora=lora)
  first = sampling.generate(config, params, PROMPTS, temperature=0.7, rng=3, **kw)
  before = sampling.compile_count()
  other = jax.tree.map(lambda x: x * 1.01, params)
  sampling.generate(config, other, PROMPTS, temperature=1.3, rng=4, min_new_tokens=3, **kw)
  # LoRA dropout is off while sampling: a dropout-0.5 adapter samples exactly the same tokens
  # (and the same program serves it).
  noisy = sampling.generate(
    config, params, PROMPTS, temperature=0.7, rng=3, **{**kw, "lora": lora.replace(dropout=0.5)}
  )
  np.testing.assert_array_equal(np.asarray(noisy.tokens), np.asarray(first.tokens))
  np.testing.assert_array_equal(np.asarray(noisy.logprobs), np.asarray(first.logprobs))
  assert sampling.compile_count() == before
  with caplog.at_level("INFO", logger="markovian_jax.sampling"):
    sampling.generate(config, params, PROMPTS + [[4]], temperature=0.7, rng=3, **kw)
  assert sampling.compile_count() == before + 1
  assert "sampler: compiling batch=3 bucket=64 new_tokens=8 num_samples=3" in caplog.text


@pytest.mark.slow
def test_sharded_over_the_mesh_matches_one_device(model):
  config, params, lora = model
  mesh = sharding.make_mesh((2, 2, 2))
  kw = dict(max_new_tokens=N, temperature=0.7, rng=jax.random.PRNGKey(3), num_samples=3)
  single = sampling.generate(config, params, PROMPTS, lora=lora, **kw)
  out = sampling.generate(
    config,
    sharding.shard_tree(params, mesh),
    PROMPTS,
    lora=lora.replace(params=sharding.shard_tree(lora.params, mesh)),
    mesh=mesh,
    **kw,
  )
  assert out.tokens.sharding.spec[0] == "data"  # 6 rows: split over data (fsdp does not divide)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(single.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(single.logprobs), rtol=LP_ULPS)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(prompt_ids=[[1, 2], []]), "prompts [1] are empty"),
    (dict(prompt_ids=[]), "no prompts"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=-1.0), "temperature must be finite and >= 0"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(num_samples=0), "num_samples must be >= 1"),
    (dict(min_new_tokens=9), "min_new_tokens=9 must be in [0, max_new_tokens=8]"),
    (dict(eos_ids=(512,)), "eos_ids (512,) must be in [0, 512)"),
    (dict(prompt_ids=[[1, 600]]), "prompt token ids must be in [0, 512), got [1, 600]"),
    (
      dict(prompt_ids=np.ones((2, 4), np.int32), prompt_mask=np.ones((2, 3), bool)),
      "prompt_mask shape (2, 3) != prompt_ids shape (2, 4)",
    ),
    (
      dict(
        prompt_ids=np.ones((2, 4), np.int32),
        prompt_mask=np.array([[1, 1, 0, 0], [0, 1, 1, 1]], bool),
      ),
      "rows [0] are not left-padded",
    ),
    (
      dict(prompt_ids=np.ones((1, 4), np.int32), prompt_mask=np.zeros((1, 4), bool)),
      "prompt rows [0] are empty",
    ),
    (dict(max_new_tokens=250), "exceeds max_position_embeddings=256"),
  ],
)
def test_bad_input_is_named(model, kwargs, message):
  config, params, _ = model
  args = dict(prompt_ids=PROMPTS, max_new_tokens=N)
  args.update(kwargs)
  with pytest.raises(ValueError) as err:
    sampling.generate(config, params, args.pop("prompt_ids"), **args)
  assert message in str(err.value)


# ------------------------------------------------------------------ SmolLM2 against PyTorch

SMOL_PROMPTS = ["What is the capital of France?", "Name three primary colours."]


@pytest.fixture(scope="module")
def smollm2(smollm2_path, smollm2_model):
  from markovian_jax.models import load_tokenizer

  config, params = smollm2_model
  return config, params, load_tokenizer(smollm2_path)


@pytest.mark.slow
def test_greedy_smollm2_matches_transformers_generate(smollm2_path, smollm2):
  torch = helpers.require("torch")
  from transformers import AutoModelForCausalLM

  from markovian_jax import sample

  config, params, tokenizer = smollm2
  ids = [sample._encode(tokenizer, p, chat=True) for p in SMOL_PROMPTS]
  eos = tuple(config.eos_token_ids) + (tokenizer.eos_token_id,)
  n = 24
  ours = sampling.generate(config, params, ids, max_new_tokens=n, temperature=0.0, eos_ids=eos)

  hf = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32
  ).eval()
  width = max(map(len, ids))
  toks, mask = batching.pad_left(ids, width, pad_id=eos[0])
  with torch.no_grad():
    ref = hf.generate(
      torch.tensor(toks, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      do_sample=False,
      max_new_tokens=n,
      pad_token_id=eos[0],
      eos_token_id=list(eos),
    ).numpy()
  ref = ref[:, width:]
  for r in range(len(ids)):
    length = int(ours.lengths[r])
    assert length >= 5
    assert np.asarray(ours.tokens[r, :length]).tolist() == ref[r, :length].tolist()
    assert (ref[r, length:] == eos[0]).all()  # both stopped at the same EOS (or ran to n)
  assert "Paris" in tokenizer.decode(np.asarray(ours.tokens[0]))


# ------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_cli_help_lists_the_flags():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  res = subprocess.run(
    [sys.executable, "-m", "markovian_jax.sample", "--help"],
    cwd=helpers.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert "Traceback" not in res.stderr, res.stderr[-2000:]  # absl exits with 1 after --help
  for flag in (
    "--checkpoint",
    "--lora",
    "--prompt",
    "--max_new_tokens",
    "--temperature",
    "--num_samples",
    "--top_k",
    "--top_p",
    "--seed",
    "--chat",
  ):
    assert flag in res.stdout, flag


@pytest.mark.slow
@pytest.mark.parametrize(
  "flags, says",
  [
    (["--max_new_tokens=0"], "error: --max_new_tokens must be >= 1, got 0"),
    (["--temperature=nan"], "error: --temperature must be finite and >= 0 (0 = greedy), got nan"),
    (
      ["--min_new_tokens=9", "--max_new_tokens=4"],
      "error: --min_new_tokens=9 must be in [0, max_new_tokens=4]",
    ),
  ],
)
def test_cli_refuses_settings_it_cannot_honour_before_loading(flags, says):
  """The sampler's own checks, as one line naming the flag, before the model loads: the
  checkpoint path does not exist, so a refusal from any later point would name it instead."""
  res = helpers.run_module(
    "markovian_jax.sample", "--checkpoint=/nonexistent", "--prompt=hi", *flags
  )
  assert helpers.one_error_line(res) == says


@pytest.fixture
def loads_once(smollm2_path, smollm2, monkeypatch):
  """`load_checkpoint` and `load_tokenizer` as the CLI's `sample_texts` calls them, answering for
  SmolLM2 with what the module's `smollm2` fixture loaded through those same functions (parsing
  the GGUF costs ~18 s of CPU a time); any other request goes to the real loader. Returns the
  list of requests, [(what, path, dtype)]."""
  import markovian_jax.models as models_lib

  config, params, tokenizer = smollm2
  real_checkpoint, real_tokenizer = models_lib.load_checkpoint, models_lib.load_tokenizer
  requests = []

  def load_checkpoint(path, dtype="float32", **kw):
    requests.append(("checkpoint", path, dtype))
    if path == smollm2_path and dtype == "float32" and not kw:
      return config, params
    return real_checkpoint(path, dtype, **kw)

  def load_tokenizer(path):
    requests.append(("tokenizer", path, None))
    return tokenizer if path == smollm2_path else real_tokenizer(path)

  monkeypatch.setattr(models_lib, "load_checkpoint", load_checkpoint)
  monkeypatch.setattr(models_lib, "load_tokenizer", load_tokenizer)
  return requests


@pytest.mark.slow
def test_cli_samples_with_and_without_a_peft_adapter(smollm2_path, smollm2, loads_once, tmp_path):
  from markovian_jax import sample
  from markovian_jax.models import hf

  config, params, tokenizer = smollm2
  kw = dict(chat=True, temperature=0.0, max_new_tokens=24)
  rows = sample.sample_texts(smollm2_path, SMOL_PROMPTS, **kw)
  assert [r["prompt"] for r in rows] == SMOL_PROMPTS
  assert "Paris" in rows[0]["text"] and rows[0]["logprob"] < 0

  lora = init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8.0, targets=("q", "v"))
  lora = lora.replace(params=jax.tree.map(lambda x: x + 0.02 * jnp.sign(x + 1e-9), lora.params))
  hf.save_peft_adapter(lora, config, tmp_path / "adapter")
  adapted = sample.sample_texts(
    smollm2_path, SMOL_PROMPTS, lora_dir=str(tmp_path / "adapter"), **kw
  )
  ids = [sample._encode(tokenizer, p, chat=True) for p in SMOL_PROMPTS]
  eos = tuple(config.eos_token_ids) + (tokenizer.eos_token_id,)
  direct = sampling.generate(
    config, params, ids, max_new_tokens=24, temperature=0.0, lora=lora, eos_ids=eos
  )
  for r, row in enumerate(adapted):
    assert row["tokens"] == np.asarray(direct.tokens[r, : int(direct.lengths[r])]).tolist()
  assert [r["tokens"] for r in adapted] != [r["tokens"] for r in rows]
  # Each call loaded the model it was given, in float32 (here from the fixture's loads).
  assert (
    loads_once == [("checkpoint", smollm2_path, "float32"), ("tokenizer", smollm2_path, None)] * 2
  )
