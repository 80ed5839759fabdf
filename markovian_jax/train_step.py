"""The jitted pieces of one Markovian training step, as pure functions of pytrees.

    sample (sampling.generate)  ->  host: decode CoTs, build "<Redacted> ... Answer: a" texts
      -> score_fn (no gradient): r = answer log-prob under the scorer, b = reference on its CoT'
      -> host: advantages (objectives.advantage_targets), once per step
      -> update_fn (grad w.r.t. the LoRA tree only): objective + clip + AdamW, NaN-guarded

The policy terms run each question's prompt once for its G CoTs (`logprobs.continuation_logprobs`):
prompts are `[Q, P]` left-padded, CoTs `[N, K]` with N = Q * G (question-major). An answer row is
`[pad, answer prompt, answer]` with the answer span marked. Leading dims are sharded over the mesh
batch axes. The reference (KL, PPO ratio reference, baseline scores) is the base model or base +
a frozen adapter (`ref_lora`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from markovian_jax import logprobs as lp_lib
from markovian_jax import objectives as obj
from markovian_jax import sharding
from markovian_jax.models import LlamaConfig


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
  model: LlamaConfig
  objective: obj.ObjectiveConfig
  temperature: float
  reward_scorer: str = "actor"
  logprob_chunk: int = 64


def answer_logprobs(s: StepSettings, params, lora, tokens, mask, span,
                    last_n: Optional[int] = None):
  """float32 [N, A] per-token log-probs of the answer span (unscaled logits), 0 elsewhere.
  `last_n`: the span lies within the last `last_n` tokens of every row (`answer_window`), so the
  vocabulary projection runs on those positions only."""
  out = lp_lib.token_logprobs(s.model, params, tokens, mask, lora=lora, temperature=1.0,
                              chunk_size=s.logprob_chunk, last_n=last_n)
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


def score(s: StepSettings, params, lora, ref_lora, answer_tokens, answer_mask, answer_span,
          base_tokens, base_mask, base_span, last_n: Optional[int] = None):
  """Rewards without gradient.

  Args:
    lora: the policy adapter; ref_lora: the reference adapter (None = base model).
    answer_*: [N, A] rows of the sampled CoTs; base_*: [Q, A'] rows of the reference's CoT'.
    last_n: `answer_window` of both spans (static), or None to project every position.
  Returns:
    (answer_logprobs float32 [N, A] under the scorer, base_scores float32 [Q]).
  """
  scorer = lora if s.reward_scorer == "actor" else ref_lora
  ans = answer_logprobs(s, params, scorer, answer_tokens, answer_mask, answer_span, last_n)
  base = answer_logprobs(s, params, ref_lora, base_tokens, base_mask, base_span, last_n)
  b = obj.reduce_tokens(base, base_span, s.objective.logprob_reduction)
  return jax.lax.stop_gradient(ans), jax.lax.stop_gradient(b)


def loss_inputs(s: StepSettings, params, lora, batch: PolicyBatch,
                dropout_rng: Optional[jax.Array], ref_lora=None) -> obj.LossInputs:
  """Teacher-forced policy terms on the CoT positions (differentiable w.r.t. `lora`)."""
  cfg = s.objective
  need_ref = cfg.kl_estimator != "full" or (cfg.kind == "ppo" and cfg.ppo_ratio_reference == "base")
  out = lp_lib.continuation_logprobs(
      s.model, params, batch.prompt_tokens, batch.prompt_mask, batch.cot_tokens, batch.cot_mask,
      lora=lora, temperature=s.temperature, chunk_size=s.logprob_chunk, dropout_rng=dropout_rng,
      with_kl=cfg.kl_estimator == "full", with_entropy=True, with_reference=need_ref,
      reference_lora=ref_lora)
  if cfg.reward_grad == "paper":
    answers = answer_logprobs(s, params, lora, batch.answer_tokens, batch.answer_mask,
                              batch.answer_span)
  else:
    answers = batch.answer_logprobs
  return obj.LossInputs(
      cot_logprobs=out.logprobs, cot_mask=batch.cot_mask,
      answer_logprobs=answers, answer_mask=batch.answer_span,
      behaviour_logprobs=batch.behaviour_logprobs, ref_logprobs=out.ref_logprobs,
      kl=out.kl, entropy=out.entropy, baseline_scores=batch.baseline_scores)


def _schedule(optim, num_steps: int) -> optax.Schedule:
  """The learning-rate schedule of `optim` (config.optim), in optimizer updates."""
  if optim.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, max(optim.warmup_steps, 1),
                                              max(num_steps, optim.warmup_steps + 1))
  if optim.warmup_steps > 0:
    return optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)
  return optax.constant_schedule(optim.lr)


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with the configured schedule (`optim`: config.optim)."""
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                   optax.adamw(_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2,
                               eps=optim.eps, weight_decay=optim.weight_decay))
  if optim.accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.accumulation_steps)
  return tx


def learning_rate(optim, num_steps: int, step: int) -> float:
  """The schedule's value at training step `step`, for logging."""
  return float(_schedule(optim, num_steps)(step // max(optim.accumulation_steps, 1)))


def update(s: StepSettings, tx: optax.GradientTransformation, params, lora, opt_state,
           batch: PolicyBatch, targets: obj.Targets, dropout_rng, ref_lora=None):
  """One optimizer step on the LoRA tree; a non-finite loss or gradient leaves state unchanged.

  Returns (lora, opt_state, metrics dict of float32 scalars).
  """
  def loss_fn(lora_):
    inputs = loss_inputs(s, params, lora_, batch, dropout_rng, ref_lora)
    return obj.loss_from_targets(inputs, targets, s.objective)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora)
  grad_norm = optax.tree.norm(grads)
  updates, new_opt = tx.update(grads, opt_state, lora)
  new_lora = optax.apply_updates(lora, updates)
  # A finite gradient can still give a non-finite update (e.g. a diverged schedule): check both.
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
  metrics = {**metrics, "grad_norm": grad_norm, "update_skipped": (~ok).astype(jnp.float32)}
  return keep(new_lora, lora), keep(new_opt, opt_state), metrics


def tree_shardings(tree, mesh):
  """Shardings for a LoRA or optimizer-state tree: LoRA-shaped leaves follow the LoRA rules
  (matched by path suffix), scalars (step counts) are replicated."""
  def one(path, leaf):
    if leaf.ndim == 0:
      return sharding.replicated(mesh)
    axes = sharding.param_logical_axes(sharding.path_str(path), leaf.ndim)
    return sharding.named_sharding(mesh, axes, leaf.shape)
  return jax.tree_util.tree_map_with_path(one, tree)


def jit_functions(s: StepSettings, tx, mesh, params_sh, lora_sh, opt_sh
                  ) -> tuple[Callable, Callable]:
  """(score_fn, update_fn) jitted with explicit shardings; update donates LoRA + optimizer state.

  Batch arrays are sharded on their leading dim by the caller (`sharding.batch_sharding`); outputs
  are left to the compiler except the state, which keeps its layout.
  """
  rep = sharding.replicated(mesh)
  score_fn = jax.jit(lambda p, l, *arrays, last_n=None: score(s, p, l, *arrays, last_n=last_n),
                     static_argnames=("last_n",))
  update_fn = jax.jit(
      lambda p, l, o, b, t, r, ref: update(s, tx, p, l, o, b, t, r, ref),
      out_shardings=(lora_sh, opt_sh, rep), donate_argnums=(1, 2))
  del params_sh
  return score_fn, update_fn
