"""One Markovian training step against an independent PyTorch reference (tests/torch_markovian.py).

On the tiny random Llama (`tiny_model_dir`) with a rank-4 LoRA whose B is not zero, fixed CoT tokens
(Q=2 arithmetic questions x G=4 CoTs of K=12 tokens, temperature 0.7) and fixed baseline CoT'
tokens, our pipeline and the reference (transformers + peft + torch.autograd, float64, built from
the method's formulas and its own prompt templates) must agree on:

  rewards r and baseline scores b   atol 2e-5 nats (ours is float32: ~1e-6 off here)
  advantages A                      atol 2 * 2e-5 / (min group std of R, ~0.025 here): A divides
                                    R's error by the group's std
  loss                              atol 1e-5 + rtol 1e-4 (reward_grad="paper": + 2 * 2e-5 /
                                    its sigma scale, see test_reward_grad_paper)
  LoRA gradient, every A/B matrix   rtol 1e-3 + atol 1e-3 * max|g| (max over all 28 matrices)
  one optimizer step                updated LoRA weights, atol 1e-6 (lr 1e-3), where the gradient
                                    is well conditioned: |g| > 1e-3 * max|g|

for kind=pg, one PPO pass over a minibatch of rows (behaviour log-probs = the policy's own,
perturbed so that the ratio is not 1 and both PPO branches occur) and reward_grad="paper".
Observed: r, b within 1e-6; A within 3e-5; gradients within 6e-5 * max|g|; AdamW within 3e-8.

Every call into our JAX pipeline is in `ours` below (the single place to re-point when the step's
APIs change); the tests only compare its outputs with the reference's.
"""

import importlib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers

Q, G, K = 2, 4, 12
TEMPERATURE = 0.7
RANK, ALPHA = 4, 8.0
KL_PENALTY = 0.1
PPO_ROWS = np.array([6, 1, 3, 4])  # a minibatch mixing both questions' rows
# Our rewards are float32 log-probs of ~ -11 nats over a 49k vocabulary: ~1e-6 off here.
R_ATOL = 2e-5
OPTIM = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0)


# ----------------------------------------------------------------------------- our pipeline

class Ours(NamedTuple):
  """loss: float; grads / updated: {PEFT key `base_model.model.model.layers.{i}.{self_attn|mlp}.
  {q,k,v,o,gate,up,down}_proj.lora_{A,B}.weight`: numpy array in PEFT's [r, in] / [out, r]
  layout}; rewards r [N]; baseline_scores b [Q]; advantages A [N] (whole batch).
  `updated`: the LoRA after one optimizer update with our gradient (None unless asked)."""
  loss: float
  grads: dict
  rewards: np.ndarray
  baseline_scores: np.ndarray
  advantages: np.ndarray
  updated: Optional[dict]


_CONTEXTS = {}  # (model path, dtype) -> RunContext: the base model loads once per module and dtype


def ours(config, lora, examples, cot_tokens, base_cot_tokens, *, behaviour_logprobs=None,
         rows=None, with_update=False, targets=None) -> Ours:
  """One step of our pipeline on fixed samples: Trainer.step's stages after sampling.

  Args:
    config: the run ConfigDict (configs/base.py): task, model path, sampling temperature,
      group size, objective and optim blocks.
    lora: the policy LoraAdapter (its dropout is not applied: dropout_rng=None).
    examples: Q task Examples (question, answer).
    cot_tokens: int [Q * G, K] sampled CoTs, question-major; base_cot_tokens: int [Q, K], the base
      model's greedy CoT' per question.
    behaviour_logprobs: float [Q * G, K] sampler log-probs (kind="ppo"); zeros when None.
    rows: the loss and gradient are those of this minibatch of rows (each row carrying its own
      prompt, as a PPO minibatch that mixes questions); advantages use the whole batch.
    with_update: also apply our optimizer (step 0's learning rate) to our gradient and return
      the updated LoRA.
    targets: optional `objectives.inputs.Targets` of the whole batch used by the loss in place of
      ours (e.g. the reference's advantages, to check the loss pass alone); the returned
      advantages are still ours.
  """
  import dataclasses
  import optax
  from markovian_jax.sampling import batching
  from markovian_jax.training import config_validation
  from markovian_jax.training import optimizer
  from markovian_jax.training import pipeline
  from markovian_jax.training import train_step
  from markovian_jax.training.run_context import RunContext

  spec = config_validation.validate(config)
  key = (spec.model.path, spec.model.dtype)
  if key not in _CONTEXTS:
    _CONTEXTS[key] = RunContext.create(config, spec=spec)
  ctx = dataclasses.replace(_CONTEXTS[key], config=config, spec=spec)
  s = train_step.StepSettings(model=ctx.model, objective=spec.objective.loss,
                              temperature=float(spec.sampling.temperature),
                              reward_scorer=spec.objective.reward_scorer)
  tx = optimizer.make_optimizer(spec.optim)
  opt_state = tx.init(lora)
  programs = train_step.Programs(s, tx, ctx.mesh, train_step.tree_shardings(lora, ctx.mesh),
                                 train_step.tree_shardings(opt_state, ctx.mesh))
  g = spec.train.group_size

  # The rollout stage with the samples given instead of drawn (pipeline.rollout's host part).
  cot_tokens = np.asarray(cot_tokens, np.int32)
  base_cot_tokens = np.asarray(base_cot_tokens, np.int32)
  prompts = [ctx.cot_prompt_ids(ex) for ex in examples]
  p_tokens, p_mask = batching.pad_left(
      prompts, batching.bucket(max(len(p) for p in prompts), spec.sampling.prompt_bucket))
  behaviour = (np.zeros(cot_tokens.shape, np.float32) if behaviour_logprobs is None
               else np.asarray(behaviour_logprobs, np.float32))
  ro = pipeline.Rollout(
      examples=list(examples), prompt_tokens=p_tokens, prompt_mask=p_mask, cot_tokens=cot_tokens,
      cot_mask=np.ones(cot_tokens.shape, bool), behaviour_logprobs=behaviour,
      cot_texts=ctx.decode(cot_tokens), base_tokens=base_cot_tokens,
      base_texts=ctx.decode(base_cot_tokens))

  sc = pipeline.score(ctx, programs, lora, None, ro)
  tg, _, _ = pipeline.targets(ctx, programs, sc, None)
  batch = pipeline.policy_batch(ctx, ro, sc)
  sub, sub_t = batch, (tg if targets is None else targets)
  if rows is not None:
    part = np.asarray(rows)
    sub = pipeline.select_rows(batch, part, g, stratified=False)
    sub_t = jax.tree.map(lambda x: x[part], sub_t)

  loss, _, grads = jax.jit(lambda l_, b_, t_: train_step.loss_and_grads(
      s, ctx.params, l_, b_, t_, None, None, sc.window))(lora, sub, sub_t)
  updated = None
  if with_update:
    lr = optimizer.learning_rate(spec.optim, spec.train.num_steps, 0)

    def step(g_, l_):
      state = optimizer.set_learning_rate(tx.init(l_), np.float32(lr))
      return optax.apply_updates(l_, tx.update(g_, state, l_)[0])

    updated = _peft_keyed(jax.jit(step)(grads, lora), ctx.model)
  return Ours(float(loss), _peft_keyed(grads, ctx.model), np.asarray(sc.rewards, np.float64),
              np.asarray(sc.base_scores, np.float64), np.asarray(tg.advantages, np.float64),
              updated)


def _peft_keyed(tree, model_config) -> dict:
  """A LoraAdapter-shaped tree (the adapter or its gradient) -> {PEFT key: float64 array}, named
  as the family's PEFT adapter names them (the reference's keys come from peft itself)."""
  from markovian_jax.models import hf
  return {k: v.astype(np.float64) for k, v in hf.peft_tensors(tree, model_config).items()}


# ----------------------------------------------------------------------------- fixtures

def make_config(model_dir, **objective):
  c = importlib.import_module("configs.base").get_config("arithmetic")
  c.model.path = model_dir
  c.model.dtype = "float32"
  c.model.remat = "none"
  # The PyTorch reference builds the plain prompts; "auto" would give a Qwen3 model ChatML.
  c.prompt.format = "plain"
  c.mesh.shape = (1, 1, 1)
  c.data.arithmetic_terms = 6
  c.sampling.cot_length = K
  c.sampling.temperature = TEMPERATURE
  c.sampling.prompt_bucket = 32
  c.train.group_size = G
  c.train.questions_per_step = Q
  c.lora.rank, c.lora.alpha, c.lora.dropout = RANK, ALPHA, 0.0
  c.objective.kl_penalty = KL_PENALTY
  c.train.num_steps = 10
  for key, value in {**OPTIM, "schedule": "constant", "warmup_steps": 0,
                     "accumulation_steps": 1}.items():
    c.optim[key] = value
  for key, value in objective.items():
    c.objective[key] = value
  return c


@pytest.fixture(scope="module")
def torch_mod():
  torch = helpers.require("torch")
  helpers.require("transformers")
  helpers.require("peft")
  torch.set_num_threads(1)
  from tests import torch_markovian
  return torch_markovian


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory, torch_mod):
  """(our LoraAdapter, the torch reference on its PEFT export, examples, CoT ids, CoT' ids)."""
  from markovian_jax import data as data_lib
  from markovian_jax.models import hf, init_lora, load_checkpoint
  config, _ = load_checkpoint(tiny_model_dir)
  lora = init_lora(config, jax.random.PRNGKey(1), rank=RANK, alpha=ALPHA, dropout=0.0)
  rng = np.random.RandomState(3)
  lora = lora.replace(params=jax.tree_util.tree_map_with_path(
      lambda p, x: x + jnp.asarray(0.5 * rng.randn(*x.shape), x.dtype) if p[-1].key == "b" else x,
      lora.params))
  adapter_dir = str(tmp_path_factory.mktemp("step_reference_adapter"))
  hf.save_peft_adapter(lora, config, adapter_dir)
  ref = torch_mod.TorchMarkovian(tiny_model_dir, adapter_dir, task="arithmetic")

  examples = data_lib.load_task("arithmetic", "train", num_terms=6)[:Q]
  # CoT tokens: random ordinary tokens that decode to printable ASCII (both sides decode them and
  # re-tokenize the text inside the answer row). The policy terms use the ids themselves.
  tok = ref.tokenizer
  special = set(tok.all_special_ids)
  good = [i for i in range(len(tok)) if i not in special
          and (t := tok.decode([i])).isascii() and t.isprintable() and t.strip()
          and "Answer" not in t]
  ids = np.random.default_rng(3)  # a draw whose groups' rewards spread by > 0.02 nats
  cot = ids.choice(good, (Q * G, K)).astype(np.int32)
  base_cot = ids.choice(good, (Q, K)).astype(np.int32)
  return lora, ref, examples, cot, base_cot


def _reference(setup, **kw):
  _, ref, examples, cot, base_cot = setup
  return ref.step([(e.question, e.answer) for e in examples], cot, base_cot, cot_length=K,
                  temperature=TEMPERATURE, kl_penalty=KL_PENALTY, **kw)


def _ours(setup, model_dir, objective=None, **kw):
  lora, _, examples, cot, base_cot = setup
  return ours(make_config(model_dir, **(objective or {})), lora, examples, cot, base_cot, **kw)


@pytest.fixture(scope="module")
def pg(setup, tiny_model_dir):
  return _reference(setup), _ours(setup, tiny_model_dir, with_update=True)


# ----------------------------------------------------------------------------- checks

def _scale(grads: dict) -> float:
  return max(np.abs(g).max() for g in grads.values())


def _check_rewards(want, got):
  np.testing.assert_allclose(got.rewards, want.rewards, atol=R_ATOL, rtol=0, err_msg="r")
  np.testing.assert_allclose(got.baseline_scores, want.baseline_scores, atol=R_ATOL, rtol=0,
                             err_msg="b")
  # A = (R - mean) / std: R's absolute error is divided by the group's std.
  spread = want.normalized.reshape(Q, G).std(axis=1, ddof=1).min()
  assert spread > 0.02
  np.testing.assert_allclose(got.advantages, want.advantages, atol=2 * R_ATOL / spread, rtol=0,
                             err_msg="advantages")


def _check_loss(want, got, atol=1e-5):
  np.testing.assert_allclose(got.loss, want.loss, atol=atol, rtol=1e-4, err_msg="loss")


def _check_grads(want, got):
  assert sorted(got.grads) == sorted(want.grads)
  assert len(want.grads) == 2 * 7 * 2  # A and B of 7 projections in each of the 2 layers
  scale = _scale(want.grads)
  assert scale > 1e-4  # the gradient is not trivially zero
  for key, g in want.grads.items():
    np.testing.assert_allclose(got.grads[key], g, rtol=1e-3, atol=1e-3 * scale, err_msg=key)


def test_pg_rewards_and_advantages(pg):
  want, got = pg
  assert want.rewards.reshape(Q, G).std(axis=1).min() > 1e-3  # distinct rewards within groups
  assert np.abs(want.rewards - np.repeat(want.baseline_scores, G)).min() > 0
  _check_rewards(want, got)


def test_pg_loss(pg):
  want, got = pg
  assert want.kl_loss > 1e-3  # the adapter moved the policy: the KL term is not trivially zero
  _check_loss(want, got)


def test_pg_lora_gradient(pg):
  _check_grads(*pg)


def test_adamw_step(pg, setup):
  """Our optimizer on our gradient vs torch's clip_grad_norm_ + AdamW on the reference's."""
  want, got = pg
  ref = setup[1]
  before = ref.lora_weights()
  theirs = ref.adamw_step(want.grads, lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]),
                          eps=OPTIM["eps"], weight_decay=OPTIM["weight_decay"],
                          max_norm=OPTIM["grad_clip"])
  scale = _scale(want.grads)
  compared = 0
  for key, g in want.grads.items():
    # Adam's first step is lr * g / (|g| + eps), about lr * sign(g): an element whose gradient is
    # near zero takes a full +-lr step whose sign is float noise. Compare only the elements whose
    # gradient is well conditioned (|g| > 1e-3 max|g|); elsewhere only bound the step by lr.
    well = np.abs(g) > 1e-3 * scale
    compared += well.sum()
    np.testing.assert_allclose(got.updated[key][well], theirs[key][well], atol=1e-6, rtol=0,
                               err_msg=key)
    step = np.abs(got.updated[key] - before[key])
    assert step.max() <= OPTIM["lr"] * (1 + OPTIM["weight_decay"] * np.abs(before[key]).max()
                                        ) * 1.001, key
  assert compared > 0.75 * sum(g.size for g in want.grads.values())


def test_ppo_minibatch(setup, tiny_model_dir):
  eps = 0.2
  # Behaviour log-probs: the policy's own (float64 reference), shifted by fixed noise so that
  # rho != 1 and both the clipped and the unclipped branch occur.
  own = _reference(setup, with_grads=False).cot_logprobs
  behaviour = own + np.random.default_rng(1).normal(0.0, 0.25, own.shape)
  rho = np.exp(own - behaviour)[PPO_ROWS]
  outside = (rho < 1 - eps) | (rho > 1 + eps)
  assert 0.1 < outside.mean() < 0.9
  # No ratio sits at a clip boundary, where float32 vs float64 could pick different branches.
  assert np.abs(np.abs(rho - 1) - eps).min() > 1e-4
  want = _reference(setup, kind="ppo", behaviour_logprobs=behaviour, rows=PPO_ROWS)
  got = _ours(setup, tiny_model_dir, {"kind": "ppo"}, behaviour_logprobs=behaviour,
              rows=PPO_ROWS)
  _check_rewards(want, got)
  _check_loss(want, got)
  _check_grads(want, got)


def test_reward_grad_paper(setup, pg, tiny_model_dir):
  want = _reference(setup, reward_grad="paper")
  got = _ours(setup, tiny_model_dir, {"reward_grad": "paper"})
  # The reward term changes the gradient (here it dominates it) ...
  assert max(np.abs(want.grads[k] - pg[0].grads[k]).max() for k in want.grads) > (
      0.5 * _scale(want.grads))
  _check_rewards(want, got)
  # ... while its value, mean_i (r_i - mu_g) / scale_g over whole groups, is 0 in exact arithmetic.
  # Ours takes mu from the scoring pass and r_i from the loss pass, two float32 computations of the
  # same r (each within R_ATOL); divided by scale (~0.03 here) the difference survives in the loss.
  r = want.rewards.reshape(Q, G)
  scale = np.maximum(r.std(axis=1, ddof=1), 1e-2).min()
  _check_loss(want, got, atol=1e-5 + 2 * R_ATOL / scale)
  _check_grads(want, got)
