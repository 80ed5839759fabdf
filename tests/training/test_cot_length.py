"""Free-length CoTs (sampling.cot_stops_at_eos; docs/method.md#free-length-cots) on the tiny model.

The tiny random model almost never draws its one EOS, so the run's EOS ids are widened to an
eighth of the vocabulary: rows then stop at random points, some at once. What the step and the
evaluation make of a draw is checked against what is re-derived from its tokens alone:

  length  numpy: the position of the row's first EOS id + 1 (the sampler counts the EOS), else K
  text    the tokenizer's decoding of the tokens before that EOS
  loss    the float64 PyTorch reference's per-token CoT log-probs and KL (tests/torch_markovian.py)
          masked to the same tokens and reduced in torch, with torch.autograd for the gradient

The same rollout and evaluation with the key off must be the reference's exactly-K draw, token for
token the sampler call the step made before the key existed.
"""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.step_reference import (
  KL_PENALTY,
  TEMPERATURE,
  G,
  K,
  Q,
  check_loss,
  check_rewards,
  make_config,
  ours,
)

SEED = 5
N_GRAM = 3  # policy/repetition_rate's n-gram


# ----------------------------------------------------------------------------- independent counts


def first_eos_lengths(tokens: np.ndarray, eos) -> np.ndarray:
  """int [N]: 1 + the index of each row's first EOS id, K for a row without one."""
  hit = np.isin(tokens, list(eos))
  return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, tokens.shape[1])


def text_before_eos(tokenizer, row: np.ndarray, eos) -> str:
  hit = np.flatnonzero(np.isin(row, list(eos)))
  end = hit[0] if hit.size else len(row)
  return tokenizer.decode(row[:end].tolist(), skip_special_tokens=True)


def repetition(tokens: np.ndarray, lengths) -> float:
  """1 - distinct / all 3-grams, per row over its first lengths[i] tokens, averaged over the rows
  that hold one."""
  rates = []
  for row, n in zip(tokens, lengths):
    grams = [tuple(row[i : i + N_GRAM]) for i in range(n - N_GRAM + 1)]
    if grams:
      rates.append(1.0 - len(set(grams)) / len(grams))
  return float(np.mean(rates)) if rates else 0.0


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run(tiny_model_dir):
  """The tiny model's context with widened EOS ids, the specs with the key on and off (Q=2
  arithmetic questions x G=4 CoTs of K=12 tokens, no CoT'), a LoRA that matters, the questions."""
  from markovian_jax import data as data_lib
  from markovian_jax.models import init_lora
  from markovian_jax.training import config_validation
  from markovian_jax.training.run_context import RunContext

  def spec(stops: bool, normalize: bool = False):
    c = make_config(tiny_model_dir, normalize_reward=normalize)
    c.sampling.cot_stops_at_eos = stops
    return config_validation.validate(c)

  on = spec(True)
  ctx = RunContext.create(on)
  # The model's own EOS first: it is the sampler's pad (eos_ids[0]).
  eos = ctx.eos_ids + tuple(range(1000, 1000 + ctx.model.vocab_size // 8))
  lora = init_lora(ctx.model, jax.random.PRNGKey(1), rank=4, alpha=8.0, dropout=0.0)
  lora = lora.replace(params=jax.tree.map(lambda x: x + 0.05, lora.params))
  return types.SimpleNamespace(
    ctx=dataclasses.replace(ctx, eos_ids=eos),
    on=on,
    off=spec(False),
    with_cot=spec(True, normalize=True),
    eos=eos,
    lora=lora,
    examples=data_lib.load_task("arithmetic", "train", num_terms=6)[:Q],
  )


def _ctx(run, spec, **kw):
  return dataclasses.replace(run.ctx, spec=spec, **kw)


@pytest.fixture(scope="module")
def rollouts(run):
  """The same draw (one key) with the key on and off."""
  from markovian_jax.training import pipeline

  key = jax.random.PRNGKey(SEED)
  return tuple(
    pipeline.rollout(_ctx(run, s), s, run.lora, None, run.examples, key) for s in (run.on, run.off)
  )


@pytest.fixture(scope="module")
def programs(run):
  """The step's jitted programs (the key changes none of them)."""
  from markovian_jax.training import optimizer, train_step

  spec = run.on
  s = train_step.StepSettings(
    model=run.ctx.model,
    objective=spec.objective.loss,
    temperature=float(spec.sampling.temperature),
  )
  tx = optimizer.make_optimizer(spec.optim)
  sh = lambda tree: train_step.tree_shardings(tree, run.ctx.mesh)  # noqa: E731
  return train_step.Programs(s, tx, run.ctx.mesh, sh(run.lora), sh(tx.init(run.lora)))


def _step_scalars(run, programs, spec, ro) -> dict:
  """The step's scalars after scoring `ro` (no update)."""
  from markovian_jax.training import pipeline

  ctx = _ctx(run, spec)
  sc = pipeline.score(ctx, programs, run.lora, None, ro)
  _, _, metrics = pipeline.targets(ctx, programs, sc, None)
  return pipeline.scalars(spec, ctx, ro, sc, metrics, [], {"sample": 1.0})


# ----------------------------------------------------------------------------- the rollout


def test_the_mask_and_texts_are_each_rows_tokens_up_to_its_first_eos(run, rollouts):
  ro = rollouts[0]
  lengths = first_eos_lengths(ro.cot_tokens, run.eos)
  # A draw that can tell: rows that ran to K, rows that stopped midway and one that stopped at once.
  assert (lengths == K).any() and ((lengths > 1) & (lengths < K)).any() and (lengths == 1).any()
  assert ro.cot_tokens.shape == ro.cot_mask.shape == (Q * G, K)  # static shapes, padded
  np.testing.assert_array_equal(ro.cot_mask, np.arange(K)[None] < lengths[:, None])
  np.testing.assert_array_equal(ro.cot_lengths, lengths)
  # After its end a row holds the sampler's pads, with log-prob 0; before it, real log-probs.
  assert (ro.cot_tokens[~ro.cot_mask] == run.eos[0]).all()
  assert (ro.behaviour_logprobs[~ro.cot_mask] == 0).all()
  assert (ro.behaviour_logprobs[ro.cot_mask] < 0).all()
  tok = run.ctx.tokenizer
  assert ro.cot_texts == [text_before_eos(tok, r, run.eos) for r in ro.cot_tokens]
  # The widened EOS ids are ordinary tokens: a text that kept its EOS would show it.
  assert any(
    tok.decode(r[:n].tolist(), skip_special_tokens=True) != t
    for r, n, t in zip(ro.cot_tokens, lengths, ro.cot_texts)
    if n < K
  )


def test_a_cot_that_starts_with_eos_is_one_token_of_empty_text(run):
  """Every token an EOS id: every row, and the reference's greedy CoT', stops at its first token;
  its length is 1 (the EOS) and its text empty."""
  from markovian_jax.training import pipeline

  spec = run.with_cot
  everything = tuple(range(run.ctx.model.vocab_size))
  ctx = _ctx(run, spec, eos_ids=(run.eos[0],) + everything)
  ro = pipeline.rollout(ctx, spec, run.lora, None, run.examples, jax.random.PRNGKey(SEED))
  assert ro.cot_lengths.tolist() == [1] * (Q * G)
  assert ro.cot_texts == [""] * (Q * G) and ro.base_texts == [""] * Q
  assert (ro.cot_tokens[:, 1:] == run.eos[0]).all() and (ro.base_tokens[:, 1:] == run.eos[0]).all()
  # What the first token was: not the pad, so its text would show.
  assert (ro.cot_tokens[:, 0] != run.eos[0]).any()


def test_step_scalars_read_the_real_lengths(run, programs, rollouts):
  ro, ro_off = rollouts
  lengths = first_eos_lengths(ro.cot_tokens, run.eos)
  out = _step_scalars(run, programs, run.on, ro)
  assert out["policy/cot_length"] == np.mean(lengths)
  assert out["policy/repetition_rate"] == repetition(ro.cot_tokens, lengths)
  # The pads repeat one id: counted, they would read as repetition.
  assert repetition(ro.cot_tokens, [K] * len(lengths)) > out["policy/repetition_rate"] + 0.05
  assert np.isfinite(list(out.values())).all()
  # The reference's draw: every CoT is K tokens, a constant the step does not log.
  off = _step_scalars(run, programs, run.off, ro_off)
  assert "policy/cot_length" not in off
  assert off["policy/repetition_rate"] == repetition(ro_off.cot_tokens, [K] * (Q * G))


# ----------------------------------------------------------------------------- the loss


def test_loss_and_gradient_mask_the_tokens_the_float64_reference_masks(setup, tiny_model_dir):
  """Hand-made ragged rows as the sampler writes them (the model's EOS, then its pads): full
  rows, rows stopped midway, one that stopped at its first token (length 1) and one whose mask is
  empty (length 0, which the sampler never gives: the degenerate case must still be finite). The
  reference decodes with special tokens skipped, so its answer rows see the texts ours do."""
  import torch

  from markovian_jax.objectives.inputs import Targets

  lora, ref, examples, cot, base_cot = setup
  eos = ref.tokenizer.eos_token_id
  lengths = np.array([K, 5, 1, 0, 9, 2, K, 7])
  cot = cot.copy()
  for i, n in enumerate(lengths):
    if n < K:
      cot[i, max(n - 1, 0) :] = eos
  want = ref.step(
    [(e.question, e.answer) for e in examples],
    cot,
    base_cot,
    cot_length=K,
    temperature=TEMPERATURE,
    kl_penalty=KL_PENALTY,
    with_grads=False,
  )
  # The loss pass alone, on the reference's advantages (the returned ones are still ours).
  n = Q * G
  targets = Targets(
    advantages=jnp.asarray(want.advantages, jnp.float32),
    active=jnp.ones((n,), bool),
    reward_mean=jnp.zeros((n,), jnp.float32),
    reward_scale=jnp.ones((n,), jnp.float32),
  )
  config = make_config(tiny_model_dir)
  got = ours(config, lora, examples, cot, base_cot, cot_lengths=lengths, targets=targets)
  check_rewards(want, got)
  assert np.isfinite(got.loss)

  # The reference's per-token terms, masked and reduced per row (mean over its tokens, 0 for
  # none), then averaged over the rows.
  lp, kl = [], []
  for j, e in enumerate(examples):
    lp_j, kl_j = ref.cot_terms(
      ref.cot_prompt_ids(e.question, K), cot[j * G : (j + 1) * G], TEMPERATURE
    )
    lp.append(lp_j)
    kl.append(kl_j)
  lp, kl = torch.cat(lp), torch.cat(kl)
  mask = torch.as_tensor(np.arange(K)[None] < lengths[:, None], dtype=lp.dtype)
  count = mask.sum(1).clamp(min=1)
  adv = torch.as_tensor(want.advantages, dtype=lp.dtype)
  pg = (-(lp * mask).sum(1) / count * adv).mean()
  loss = pg + KL_PENALTY * ((kl * mask).sum(1) / count).mean()
  names = sorted(ref.lora)
  grads = torch.autograd.grad(loss, [ref.lora[k] for k in names])
  masked = types.SimpleNamespace(loss=loss.item())
  # The mask matters: the loss over all K tokens is far from it.
  assert abs(want.loss - masked.loss) > 100 * (1e-5 + 1e-4 * abs(masked.loss))
  check_loss(masked, got)
  scale = max(float(g.abs().max()) for g in grads)
  assert scale > 1e-4
  for k, g in zip(names, grads):
    np.testing.assert_allclose(got.grads[k], g.numpy(), rtol=1e-3, atol=1e-3 * scale, err_msg=k)


# ----------------------------------------------------------------------------- evaluation


def _draw(ctx, lora, examples, key, **kw):
  """The sampler called directly with ctx.spec's sampling keys: K new tokens, EOS blocked before
  K unless sampling.cot_stops_at_eos. The independent draw the code's own draws are checked
  against."""
  from markovian_jax import sampling

  s = ctx.spec.sampling
  return sampling.generate(
    ctx.model,
    ctx.params,
    [ctx.cot_prompt_ids(ex) for ex in examples],
    lora=lora,
    rng=key,
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
    max_new_tokens=K,
    min_new_tokens=0 if s.cot_stops_at_eos else K,
    eos_ids=ctx.eos_ids,
    **kw,
  )


def _eval_and_draw(run, spec):
  """(summary, rows) of `evaluation.evaluate` on the Q questions (G CoTs each, one batch), and the
  CoT tokens that evaluation drew, drawn again by the sampler call it makes: the first key split
  from PRNGKey(seed)."""
  from markovian_jax.training import evaluation

  ctx = _ctx(run, spec)
  summ, rows = evaluation.evaluate(
    ctx, run.lora, run.examples, num_samples=G, answer_max_tokens=2, batch_size=Q, progress=False
  )
  _, key = jax.random.split(jax.random.PRNGKey(0))
  out = _draw(ctx, run.lora, run.examples, key, num_samples=G, mesh=ctx.mesh)
  return summ, rows, np.asarray(out.tokens)


def test_eval_rows_carry_their_cot_lengths(run):
  from markovian_jax.reporting import methods_table
  from markovian_jax.training import evaluation

  summ, rows, tokens = _eval_and_draw(run, run.on)
  lengths = first_eos_lengths(tokens, run.eos)
  assert (lengths < K).any() and (lengths == K).any()
  assert [r["cot_length"] for r in rows] == lengths.tolist()
  assert all(type(r["cot_length"]) is int for r in rows)
  assert [r["cot"] for r in rows] == [
    text_before_eos(run.ctx.tokenizer, t, run.eos) for t in tokens
  ]
  assert summ["cot_length"] == np.mean(lengths)
  # Under the names the methods table reads: the rows' key, and the scalar the writers log under
  # the eval/ prefix.
  assert methods_table.COT_LENGTH_ROW_KEY in rows[0]
  assert evaluation.scalars(summ)["cot_length"] == summ["cot_length"]
  assert methods_table.COT_LENGTH_EVAL_TAG == "eval/cot_length"


def test_samples_jsonl_carries_each_cots_length(run, rollouts, tmp_path):
  """samples.jsonl, one line per question: with the key on, its G CoTs' lengths (EOS counted) in
  the order of its CoTs; with it off (every CoT K tokens) no such field."""
  from markovian_jax.runtime.summary import SummaryWriter
  from markovian_jax.trainer import write_samples

  for ro, on in zip(rollouts, (True, False)):
    workdir = tmp_path / str(on)
    workdir.mkdir()
    writer = SummaryWriter(str(workdir))
    scores = types.SimpleNamespace(rewards=-np.arange(Q * G, dtype=np.float32), base_scores=None)
    write_samples(
      writer,
      str(workdir),
      "arithmetic",
      on,
      types.SimpleNamespace(step=3, rollout=ro, scores=scores),
    )
    writer.close()
    lines = [json.loads(x) for x in (workdir / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == Q and [r["cots"] for r in lines] == [
      ro.cot_texts[q * G : (q + 1) * G] for q in range(Q)
    ]
    if on:
      lengths = first_eos_lengths(ro.cot_tokens, run.eos)
      assert [r["cot_lengths"] for r in lines] == lengths.reshape(Q, G).tolist()
      assert all(type(n) is int for r in lines for n in r["cot_lengths"])
    else:
      assert not any("cot_lengths" in r for r in lines)


def test_fragility_cots_follow_the_key(run):
  """`analyze fragility`'s CoTs: with the key on, the sampler's draw up to each row's first EOS
  (some stop early); with it off, K tokens with EOS blocked, as training samples them."""
  from markovian_jax.analysis import fragility

  examples = run.examples * 4  # one batch of 8 questions
  for spec, stops in ((run.on, True), (run.off, False)):
    ctx = _ctx(run, spec)
    got = fragility.generate_cots(ctx, run.lora, examples, seed=SEED, progress=False)
    _, key = jax.random.split(jax.random.PRNGKey(SEED))
    draw = _draw(ctx, run.lora, examples, key)
    tokens = np.asarray(draw.tokens)
    lengths = first_eos_lengths(tokens, run.eos)
    if stops:
      assert (lengths < K).any()
      assert got == [text_before_eos(ctx.tokenizer, t, run.eos) for t in tokens]
    else:
      assert (lengths == K).all() and not np.isin(tokens, run.eos).any()
      assert got == ctx.decode(tokens)


# ----------------------------------------------------------------------------- the key off


def test_with_the_key_off_the_draw_is_the_references_exactly_k(run, rollouts):
  """The rollout is the sampler call the step made before the key existed (min_new_tokens = K),
  bit for bit, and no CoT stops although an eighth of the vocabulary is EOS."""
  from markovian_jax import sampling

  ro = rollouts[1]
  ctx = _ctx(run, run.off)
  s = run.off.sampling
  before = sampling.generate(
    ctx.model,
    ctx.params,
    [ctx.cot_prompt_ids(ex) for ex in run.examples],
    lora=run.lora,
    rng=jax.random.PRNGKey(SEED),
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
    num_samples=G,
    max_new_tokens=K,
    min_new_tokens=K,
    eos_ids=ctx.eos_ids,
  )
  np.testing.assert_array_equal(ro.cot_tokens, np.asarray(before.tokens))
  np.testing.assert_array_equal(ro.behaviour_logprobs, np.asarray(before.logprobs))
  assert ro.cot_mask.all() and not np.isin(ro.cot_tokens, run.eos).any()
  assert ro.cot_texts == ctx.decode(np.asarray(before.tokens))
  # The evaluation likewise: K-token CoTs, and rows and summary as they were (no cot_length).
  summ, rows, tokens = _eval_and_draw(run, run.off)
  assert [r["cot"] for r in rows] == ctx.decode(tokens)
  assert not any("cot_length" in r for r in rows) and "cot_length" not in summ
