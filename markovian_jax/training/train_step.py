"""The jitted pieces of one Markovian training step, as pure functions of pytrees.

    score    (no gradient): per-token answer log-probs of the N sampled CoTs' answer rows under the
             scorer, the rewards r [N], and the reference's score b [Q] of its greedy CoT'
    targets  (no gradient): advantages etc. from r and b (objectives.advantage_targets)
    update   (grad w.r.t. the LoRA tree only): objective + clip + AdamW at the step's learning
             rate; a non-finite loss, gradient or update leaves the state unchanged

`Programs` holds the three jitted with their shardings; `pipeline` sequences them with sampling.
The policy terms run each question's prompt once for its G CoTs (`logprobs.continuation_logprobs`):
prompts are `[Q, P]` left-padded, CoTs `[N, K]` with N = Q * G (question-major). An answer row is
`[pad, answer prompt, answer]` with the answer span marked. Leading dims are sharded over the mesh
batch axes. The reference (KL, PPO ratio reference, baseline scores) is the base model or base +
a frozen adapter (`ref_lora`); for a method whose scorer is `ema` (NOVER) the trainer passes its
EMA-lagged adapter copy as `ref_lora` (reward scorer and KL reference), which `ema_update` moves
towards the policy after an optimizer step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from markovian_jax import objectives as obj
from markovian_jax.models import DecoderConfig
from markovian_jax.models import logprobs as lp_lib
from markovian_jax.runtime import sharding
from markovian_jax.training import optimizer


@struct.dataclass
class PolicyBatch:
  """Everything the update needs about the N sampled CoTs.

  prompt_tokens: int32 [Q', P], the CoT prompts left-padded to a bucket; row i // G is row i's
    prompt (Q' = N for minibatches that mix questions, each row then carrying its own prompt).
  prompt_mask: bool [Q', P], real tokens.
  cot_tokens: int32 [N, K], the K sampled tokens; cot_mask: bool [N, K], real (not after EOS).
  behaviour_logprobs: float32 [N, K], the sampler's log-probs of the CoT tokens.
  answer_tokens: int32 [N, A], answer prompt (with this row's CoT) + gold answer, left-padded.
  answer_mask: bool [N, A]; answer_span: bool [N, A], the scored answer tokens.
  answer_logprobs: float32 [N, A], the scorer's per-token answer log-probs (no gradient).
  baseline_scores: float32 [N], b of the row's question (0 when not normalising).
  """

  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  cot_tokens: jax.Array
  cot_mask: jax.Array
  behaviour_logprobs: jax.Array
  answer_tokens: jax.Array
  answer_mask: jax.Array
  answer_span: jax.Array
  answer_logprobs: jax.Array
  baseline_scores: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static settings of the jitted functions (hashable)."""

  model: DecoderConfig
  objective: obj.ObjectiveConfig
  temperature: float
  reward_scorer: str = "actor"
  logprob_chunk: int = 64


def scorer_adapter(who: str, lora, ref_lora):
  """The adapter that scores for `who` (a reward scorer: actor | base | ema): the policy `lora`
  for actor, else `ref_lora`, which the trainer sets to the frozen reference for base (None =
  the base model) and to the EMA-lagged copy for ema."""
  if who == "actor":
    return lora
  if who == "ema" and ref_lora is None:
    # Scoring with the base model instead would run, silently, as another method.
    raise ValueError("the 'ema' scorer needs the EMA adapter copy as ref_lora, got None")
  return ref_lora


def ema_update(ema, lora, decay: float):
  """ema <- decay * ema + (1 - decay) * lora over the adapters' params (LoraAdapters of the same
  layout), in float32, stored in `ema`'s dtype."""
  d = np.float32(decay)
  one_minus = np.float32(1.0 - decay)

  def mix(e, x):
    return (d * e.astype(jnp.float32) + one_minus * x.astype(jnp.float32)).astype(e.dtype)

  return ema.replace(params=jax.tree.map(mix, ema.params, lora.params))


def answer_logprobs(
  s: StepSettings, params, lora, tokens, mask, span, last_n: Optional[int] = None
):
  """float32 [N, A] per-token log-probs of the answer span (unscaled logits), 0 elsewhere.
  `last_n`: the span lies within the last `last_n` tokens of every row (`answer_window`), so the
  vocabulary projection runs on those positions only."""
  out = lp_lib.token_logprobs(
    s.model,
    params,
    tokens,
    mask,
    lora=lora,
    temperature=1.0,
    chunk_size=s.logprob_chunk,
    last_n=last_n,
  )
  return jnp.where(span, out.logprobs, 0.0)


def answer_window(*spans: np.ndarray, multiple: int = 8) -> int:
  """How many trailing tokens of every row hold its answer span (bool [N, A] arrays), rounded
  up to `multiple` so that a run compiles one or two scoring programs."""
  width = 1
  for span in spans:
    span = np.asarray(span, bool)
    has = span.any(axis=1)
    first = np.argmax(span, axis=1)
    width = max(width, int((span.shape[1] - first[has]).max(initial=1)))
  return -(-width // multiple) * multiple


def rewards(s: StepSettings, answer_lp, span):
  """float32 [N]: the reward of each answer row from its per-token log-probs (reward_kind)."""
  cfg = s.objective
  return obj.answer_reward(answer_lp, span, cfg.logprob_reduction, kind=cfg.reward_kind)


def score(
  s: StepSettings,
  params,
  lora,
  ref_lora,
  answer_tokens,
  answer_mask,
  answer_span,
  base_tokens=None,
  base_mask=None,
  base_span=None,
  last_n: Optional[int] = None,
):
  """Rewards without gradient.

  Args:
    lora: the policy adapter; ref_lora: the reference adapter (None = base model), or the EMA
      copy for reward_scorer='ema' (`scorer_adapter`).
    answer_*: [N, A] rows of the sampled CoTs; base_*: [Q, A'] rows of the reference's CoT', or
      None when the reward is not normalised (no CoT' is sampled then). With an answer-likelihood
      method (objective.method) base_* are instead its no-reasoning rows (the answer prompt with
      an empty CoT), scored by the method's no_reasoning_scorer.
    last_n: `answer_window` of the spans (static), or None to project every position.
  Returns:
    (answer_logprobs float32 [N, A] under the scorer, r float32 [N], b float32 [Q] or None; with
    a method, b is the no-reasoning rows' per-token log-probs float32 [Q, A'], 0 off the span).
  """
  scorer = scorer_adapter(s.reward_scorer, lora, ref_lora)
  ans = jax.lax.stop_gradient(
    answer_logprobs(s, params, scorer, answer_tokens, answer_mask, answer_span, last_n)
  )
  b = None
  method = obj.method_of(s.objective)
  if base_tokens is not None and method is not None:
    nr_scorer = scorer_adapter(method.no_reasoning_scorer, lora, ref_lora)
    b = jax.lax.stop_gradient(
      answer_logprobs(s, params, nr_scorer, base_tokens, base_mask, base_span, last_n)
    )
  elif base_tokens is not None:
    base = answer_logprobs(s, params, ref_lora, base_tokens, base_mask, base_span, last_n)
    b = jax.lax.stop_gradient(rewards(s, base, base_span))
  return ans, rewards(s, ans, answer_span), b


def reference_cot_logprobs(
  s: StepSettings, params, ref_lora, prompt_tokens, prompt_mask, cot_tokens, cot_mask
):
  """float32 [N, K]: the reference's log-probs of the sampled CoT tokens at the sampling
  temperature, no gradient (LaTRO's reward folds the sequence log-ratio to it in)."""
  out = lp_lib.continuation_logprobs(
    s.model,
    params,
    prompt_tokens,
    prompt_mask,
    cot_tokens,
    cot_mask,
    lora=ref_lora,
    temperature=s.temperature,
    chunk_size=s.logprob_chunk,
  )
  return jax.lax.stop_gradient(out.logprobs)


def loss_inputs(
  s: StepSettings,
  params,
  lora,
  batch: PolicyBatch,
  dropout_rng: Optional[jax.Array],
  ref_lora=None,
  answer_last_n: Optional[int] = None,
) -> obj.LossInputs:
  """Teacher-forced policy terms on the CoT positions (differentiable w.r.t. `lora`).
  `answer_last_n`: the answer window (`answer_window`) for reward_grad='paper', which re-scores
  the answer rows with gradient."""
  cfg = s.objective
  need_ref = cfg.kl_estimator != "full" or (cfg.kind == "ppo" and cfg.ppo_ratio_reference == "base")
  out = lp_lib.continuation_logprobs(
    s.model,
    params,
    batch.prompt_tokens,
    batch.prompt_mask,
    batch.cot_tokens,
    batch.cot_mask,
    lora=lora,
    temperature=s.temperature,
    chunk_size=s.logprob_chunk,
    dropout_rng=dropout_rng,
    with_kl=cfg.kl_estimator == "full",
    with_entropy=True,
    with_reference=need_ref,
    reference_lora=ref_lora,
  )
  method = obj.method_of(cfg)
  if cfg.reward_grad == "paper" or (method is not None and method.has_answer_term):
    answers = answer_logprobs(
      s, params, lora, batch.answer_tokens, batch.answer_mask, batch.answer_span, answer_last_n
    )
  else:
    answers = batch.answer_logprobs
  return obj.LossInputs(
    cot_logprobs=out.logprobs,
    cot_mask=batch.cot_mask,
    answer_logprobs=answers,
    answer_mask=batch.answer_span,
    behaviour_logprobs=batch.behaviour_logprobs,
    ref_logprobs=out.ref_logprobs,
    kl=out.kl,
    entropy=out.entropy,
    baseline_scores=batch.baseline_scores,
  )


def loss_and_grads(
  s: StepSettings,
  params,
  lora,
  batch: PolicyBatch,
  targets: obj.Targets,
  dropout_rng=None,
  ref_lora=None,
  answer_last_n: Optional[int] = None,
):
  """(loss float32 scalar, metrics dict, gradient w.r.t. `lora`: a LoRA-shaped tree)."""
  method = obj.method_of(s.objective)

  def loss_fn(lora_):
    inputs = loss_inputs(s, params, lora_, batch, dropout_rng, ref_lora, answer_last_n)
    if method is not None:
      return obj.method_loss_from_targets(inputs, targets, method)
    return obj.loss_from_targets(inputs, targets, s.objective)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora)
  return loss, metrics, grads


def update(
  s: StepSettings,
  tx: optax.GradientTransformation,
  params,
  lora,
  opt_state,
  batch: PolicyBatch,
  targets: obj.Targets,
  dropout_rng,
  ref_lora=None,
  lr=None,
  answer_last_n: Optional[int] = None,
):
  """One optimizer step on the LoRA tree at learning rate `lr` (float32 scalar; None keeps the
  state's); a non-finite loss, gradient or update leaves LoRA and optimizer state unchanged.

  Returns (lora, opt_state, metrics dict of float32 scalars: the loss terms, grad_norm,
  learning_rate (the value applied) and nonfinite (1 when the update was skipped)).
  """
  if lr is not None:
    opt_state = optimizer.set_learning_rate(opt_state, lr)
  loss, metrics, grads = loss_and_grads(
    s, params, lora, batch, targets, dropout_rng, ref_lora, answer_last_n
  )
  grad_norm = optax.tree.norm(grads)
  updates, new_opt = tx.update(grads, opt_state, lora)
  new_lora = optax.apply_updates(lora, updates)
  # A finite gradient can still give a non-finite update (e.g. a diverged schedule): check both.
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
  metrics = {
    **metrics,
    "grad_norm": grad_norm,
    "learning_rate": optimizer.applied_learning_rate(opt_state),
    "nonfinite": (~ok).astype(jnp.float32),
  }
  return keep(new_lora, lora), keep(new_opt, opt_state), metrics


def tree_shardings(tree, mesh):
  """Shardings for a LoRA or optimizer-state tree: LoRA-shaped leaves follow the LoRA rules
  (matched by path suffix), scalars (step counts, the learning rate) are replicated."""

  def one(path, leaf):
    if leaf.ndim == 0:
      return sharding.replicated(mesh)
    axes = sharding.param_logical_axes(sharding.path_str(path), leaf.ndim)
    return sharding.named_sharding(mesh, axes, leaf.shape)

  return jax.tree_util.tree_map_with_path(one, tree)


class Programs:
  """The step's three jitted programs, built once per run.

  score(params, lora, ref_lora, answer rows..., base rows... or None, last_n=) -> `score`
  targets(r [N], b [N] or None, baseline_state) -> objectives.advantage_targets
  method_targets(LossInputs, baseline_state) -> objectives.method_targets (objective.method set)
  reference_cot(params, ref_lora, prompt rows, CoT rows) -> `reference_cot_logprobs` (the same)
  update(params, lora, opt_state, batch, targets, dropout_rng, ref_lora, lr, answer_last_n=)
    -> `update`; donates the LoRA and optimizer state and keeps their shardings.
  ema_update(ema, lora) -> `ema_update` at objective.scorer_ema_decay (a method whose scorer is
    `ema`, else None); donates `ema` and keeps the LoRA's shardings.
  Batch arrays are sharded on their leading dim by the caller (`run_context.put`).
  """

  def __init__(self, s: StepSettings, tx, mesh, lora_sh, opt_sh):
    self.settings = s
    rep = sharding.replicated(mesh)
    self.score = jax.jit(
      lambda p, l, ref, *rows, last_n=None: score(s, p, l, ref, *rows, last_n=last_n),
      static_argnames=("last_n",),
    )
    self.targets = jax.jit(lambda r, b, state: obj.advantage_targets(r, b, s.objective, state))
    method = obj.method_of(s.objective)
    if method is not None:
      self.method_targets = jax.jit(lambda inputs, state: obj.method_targets(inputs, method, state))
      self.reference_cot = jax.jit(lambda p, ref, *rows: reference_cot_logprobs(s, p, ref, *rows))
    self.update = jax.jit(
      lambda p, l, o, b, t, r, ref, lr, answer_last_n=None: update(
        s, tx, p, l, o, b, t, r, ref, lr, answer_last_n
      ),
      static_argnames=("answer_last_n",),
      out_shardings=(lora_sh, opt_sh, rep),
      donate_argnums=(1, 2),
    )
    self.ema_update = None
    if method is not None and method.scorer == "ema":
      decay = s.objective.scorer_ema_decay
      self.ema_update = jax.jit(
        lambda e, x: ema_update(e, x, decay), out_shardings=lora_sh, donate_argnums=(0,)
      )
