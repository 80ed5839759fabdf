"""Our side of one Markovian training step compared with the float64 PyTorch reference
(tests/torch_markovian.py), shared by tests/training/test_step_reference.py, test_bf16.py and
test_family_step.py: the fixed sizes (Q=2 arithmetic questions x G=4 CoTs of K=12 tokens), the
run config, `ours` (every call into our JAX pipeline: the single place to re-point when the step's
APIs change) and the float32-against-float64 tolerances of rewards, advantages and loss (derived
in test_step_reference.py's docstring). The fixtures that build the samples and the reference
(`torch_mod`, `setup`) are tests/training/conftest.py's.
"""

import importlib
from typing import NamedTuple, Optional

import jax
import numpy as np

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


def ours(
  config,
  lora,
  examples,
  cot_tokens,
  base_cot_tokens,
  *,
  behaviour_logprobs=None,
  rows=None,
  with_update=False,
  targets=None,
  cot_lengths=None,
) -> Ours:
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
    cot_lengths: optional int [Q * G]: free-length CoTs (sampling.cot_stops_at_eos), row i's
      CoT being its first cot_lengths[i] tokens as the sampler counts them (EOS included), its
      mask and text built as pipeline.rollout builds them; None: every row is all K tokens.
  """
  import dataclasses

  import optax

  from markovian_jax.sampling import batching
  from markovian_jax.training import config_validation, optimizer, pipeline, train_step
  from markovian_jax.training.run_context import RunContext

  spec = config_validation.validate(config)
  key = (spec.model.path, spec.model.dtype)
  if key not in _CONTEXTS:
    _CONTEXTS[key] = RunContext.create(spec)
  ctx = dataclasses.replace(_CONTEXTS[key], spec=spec)
  s = train_step.StepSettings(
    model=ctx.model,
    objective=spec.objective.loss,
    temperature=float(spec.sampling.temperature),
    reward_scorer=spec.objective.reward_scorer,
  )
  tx = optimizer.make_optimizer(spec.optim)
  opt_state = tx.init(lora)
  programs = train_step.Programs(
    s,
    tx,
    ctx.mesh,
    train_step.tree_shardings(lora, ctx.mesh),
    train_step.tree_shardings(opt_state, ctx.mesh),
  )
  g = spec.train.group_size

  # The rollout stage with the samples given instead of drawn (pipeline.rollout's host part).
  cot_tokens = np.asarray(cot_tokens, np.int32)
  base_cot_tokens = np.asarray(base_cot_tokens, np.int32)
  prompts = [ctx.cot_prompt_ids(ex) for ex in examples]
  p_tokens, p_mask = batching.pad_left(
    prompts, batching.bucket(max(len(p) for p in prompts), spec.sampling.prompt_bucket)
  )
  behaviour = (
    np.zeros(cot_tokens.shape, np.float32)
    if behaviour_logprobs is None
    else np.asarray(behaviour_logprobs, np.float32)
  )
  ro = pipeline.Rollout(
    examples=list(examples),
    prompt_tokens=p_tokens,
    prompt_mask=p_mask,
    cot_tokens=cot_tokens,
    cot_mask=np.ones(cot_tokens.shape, bool)
    if cot_lengths is None
    else pipeline.cot_mask(cot_lengths, cot_tokens.shape[1]),
    behaviour_logprobs=behaviour,
    cot_texts=ctx.decode(cot_tokens)
    if cot_lengths is None
    else pipeline.decode_cots(ctx, cot_tokens, cot_lengths),
    base_tokens=base_cot_tokens,
    base_texts=ctx.decode(base_cot_tokens),
  )

  sc = pipeline.score(ctx, programs, lora, None, ro)
  tg, _, _ = pipeline.targets(ctx, programs, sc, None)
  batch = pipeline.policy_batch(ctx, ro, sc)
  sub, sub_t = batch, (tg if targets is None else targets)
  if rows is not None:
    part = np.asarray(rows)
    sub = pipeline.select_rows(batch, part, g, stratified=False)
    sub_t = jax.tree.map(lambda x: x[part], sub_t)

  loss, _, grads = jax.jit(
    lambda l_, b_, t_: train_step.loss_and_grads(s, ctx.params, l_, b_, t_, None, None, sc.window)
  )(lora, sub, sub_t)
  updated = None
  if with_update:
    lr = optimizer.learning_rate(spec.optim, spec.train.num_steps, 0)

    def step(g_, l_):
      state = optimizer.set_learning_rate(tx.init(l_), np.float32(lr))
      return optax.apply_updates(l_, tx.update(g_, state, l_)[0])

    updated = _peft_keyed(jax.jit(step)(grads, lora), ctx.model)
  return Ours(
    float(loss),
    _peft_keyed(grads, ctx.model),
    np.asarray(sc.rewards, np.float64),
    np.asarray(sc.base_scores, np.float64),
    np.asarray(tg.advantages, np.float64),
    updated,
  )


def _peft_keyed(tree, model_config) -> dict:
  """A LoraAdapter-shaped tree (the adapter or its gradient) -> {PEFT key: float64 array}, named
  as the family's PEFT adapter names them (the reference's keys come from peft itself)."""
  from markovian_jax.models import hf

  return {k: v.astype(np.float64) for k, v in hf.peft_tensors(tree, model_config).items()}


# ----------------------------------------------------------------------------- run config


def make_config(model_dir, **objective):
  """The run both sides step: arithmetic (6 terms), the sizes above, float32 on one device, the
  plain prompt format; `objective`: config.objective keys to override."""
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
  for key, value in {
    **OPTIM,
    "schedule": "constant",
    "warmup_steps": 0,
    "accumulation_steps": 1,
  }.items():
    c.optim[key] = value
  for key, value in objective.items():
    c.objective[key] = value
  return c


# ----------------------------------------------------------------------------- checks


def check_rewards(want, got):
  """r and b within R_ATOL nats; A within 2 R_ATOL / the smallest group std of R."""
  np.testing.assert_allclose(got.rewards, want.rewards, atol=R_ATOL, rtol=0, err_msg="r")
  np.testing.assert_allclose(
    got.baseline_scores, want.baseline_scores, atol=R_ATOL, rtol=0, err_msg="b"
  )
  # A = (R - mean) / std: R's absolute error is divided by the group's std.
  spread = want.normalized.reshape(Q, G).std(axis=1, ddof=1).min()
  assert spread > 0.02
  np.testing.assert_allclose(
    got.advantages, want.advantages, atol=2 * R_ATOL / spread, rtol=0, err_msg="advantages"
  )


def check_loss(want, got, atol=1e-5):
  """The loss within atol + 1e-4 relative."""
  np.testing.assert_allclose(got.loss, want.loss, atol=atol, rtol=1e-4, err_msg="loss")
