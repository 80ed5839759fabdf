"""One Markovian training step as stages over plain data; `train.Trainer` only sequences them.

    rollout(...)  -> Rollout   sample G CoTs per question (+ the reference's greedy CoT' when the
                               reward is normalised) and decode them
    score(...)    -> Scores    answer rows with the question hidden; rewards r [N], baseline b [Q]
    targets(...)  -> (objectives.Targets, BaselineState, metrics)   advantages, jitted
    update(...)   -> (lora, opt_state, metrics)   PG: one update on the whole batch; PPO: epochs x
                               minibatches; none when expert iteration keeps no sample
    scalars(...)  -> dict      the step's TensorBoard scalars, grouped by section

N = Q * G rows, question-major (row i answers question i // G). Host arrays are numpy; device
arrays are global arrays sharded on their leading dim (`run_context.put`).

CoT length (docs/method.md#free-length-cots): every CoT is sampled as K = sampling.cot_length
token slots. With sampling.cot_stops_at_eos=False (the reference) EOS is blocked and every row
fills all K; with True EOS may end a row early, and a row's length is the sampler's count: its
tokens up to and including the EOS that ended it (the EOS is the policy's decision to stop, so it
is a CoT token of the loss), K when none did. `cot_mask` marks those tokens; the pads after them
(the sampler writes eos_ids[0] with log-prob 0) and the EOS are not part of the CoT's text.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import jax
import numpy as np

from markovian_jax import objectives as obj
from markovian_jax import sampling
from markovian_jax.sampling import batching
from markovian_jax.training import metrics as metrics_lib
from markovian_jax.training import train_step
from markovian_jax.training.run_context import RunContext, fetch, put


@dataclasses.dataclass
class Rollout:
  """The sampled CoTs of one step (host arrays).

  examples: the Q questions. prompt_tokens int32 [Q, P] / prompt_mask bool [Q, P]: the CoT
  prompts, left-padded to the prompt bucket. cot_tokens int32 [N, K]; cot_mask bool [N, K]: the
  row's CoT tokens, a prefix of each row (all K unless sampling.cot_stops_at_eos; module
  docstring); behaviour_logprobs float32 [N, K] (the sampler's, at the sampling temperature; 0
  after a row's end); cot_texts: N strings, each row's tokens before its EOS. base_tokens int32
  [Q, K] and base_texts: the reference's greedy CoT' (None when the reward is not normalised).
  """

  examples: list
  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  cot_tokens: np.ndarray
  cot_mask: np.ndarray
  behaviour_logprobs: np.ndarray
  cot_texts: list
  base_tokens: Optional[np.ndarray] = None
  base_texts: Optional[list] = None

  @property
  def group_size(self) -> int:
    return self.cot_tokens.shape[0] // len(self.examples)

  @property
  def row_examples(self) -> list:
    """The example of each of the N rows."""
    return [ex for ex in self.examples for _ in range(self.group_size)]

  @property
  def cot_lengths(self) -> np.ndarray:
    """int64 [N]: each row's CoT length in tokens (the sampler's `lengths`)."""
    return np.asarray(self.cot_mask, bool).sum(axis=1)


@dataclasses.dataclass
class Scores:
  """The rewards of one step.

  answer_tokens int32 [N, A], answer_mask bool [N, A], answer_span bool [N, A]: the scoring rows
  (host). window: the static answer window of those rows (`train_step.answer_window`).
  answer_logprobs float32 [N, A] and rewards float32 [N] (device, under the scorer).
  base_scores float32 [Q] (host) b of the reference's CoT', or None when not normalising;
  baseline_rows float32 [N]: b of each row's question (zeros when not normalising).
  With an answer-likelihood method (objective.method; docs/answer-likelihood.md), what its
  targets read: cot_logprobs float32 [N, K] (the sampler's) and cot_mask bool [N, K] (host);
  no_reasoning_logprobs float32 [Q, W] (device) / no_reasoning_span bool [Q, W] (host), the answer
  after an empty CoT, and ref_cot_logprobs float32 [N, K] (device), the reference's log-probs of
  the CoT tokens; each None when the method does not read it. W = `window`: every answer span
  ends its row, so the last W columns of any two rows hold the same answer tokens.
  """

  answer_tokens: np.ndarray
  answer_mask: np.ndarray
  answer_span: np.ndarray
  window: int
  answer_logprobs: jax.Array
  rewards: jax.Array
  base_scores: Optional[np.ndarray]
  baseline_rows: np.ndarray
  cot_logprobs: Optional[np.ndarray] = None
  cot_mask: Optional[np.ndarray] = None
  no_reasoning_logprobs: Optional[jax.Array] = None
  no_reasoning_span: Optional[np.ndarray] = None
  ref_cot_logprobs: Optional[jax.Array] = None


def cot_mask(lengths, k: int) -> np.ndarray:
  """bool [N, K]: the first lengths[i] of row i's K token slots (lengths: int [N], the sampler's
  count, EOS included)."""
  return np.arange(k)[None, :] < np.asarray(lengths)[:, None]


def decode_cots(ctx: RunContext, tokens: np.ndarray, lengths) -> list:
  """The texts of sampled CoTs: row i's first lengths[i] tokens (int [N, K], lengths int [N])
  without the EOS that ended it, so neither the EOS nor the pads after it reach the answer rows."""
  eos = set(ctx.eos_ids)
  texts = []
  for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
    n = int(n)
    if n and int(row[n - 1]) in eos:
      n -= 1
    texts.append(ctx.decode(row[None, :n])[0])
  return texts


def min_new_tokens(spec) -> int:
  """The sampler's min_new_tokens for a CoT: K (EOS blocked, the reference) or 0 when
  sampling.cot_stops_at_eos lets EOS end it."""
  return 0 if spec.sampling.cot_stops_at_eos else spec.sampling.cot_length


def rollout(ctx: RunContext, spec, lora, ref_lora, examples: Sequence, key: jax.Array) -> Rollout:
  """Samples `spec.train.group_size` CoTs of `spec.sampling.cot_length` tokens per example (at
  most that many when sampling.cot_stops_at_eos; the reference's CoT' follows the same rule)."""
  s, g, k = spec.sampling, spec.train.group_size, spec.sampling.cot_length
  prompts = [ctx.cot_prompt_ids(ex) for ex in examples]
  kw = dict(max_new_tokens=k, min_new_tokens=min_new_tokens(spec), eos_ids=ctx.eos_ids)
  policy_kw = dict(
    rng=key, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, num_samples=g, **kw
  )
  base_out = None
  if not spec.objective.loss.normalize_reward:
    out = sampling.generate(ctx.model, ctx.params, prompts, lora=lora, **policy_kw)
  elif ref_lora is None:  # the base model's CoT' rides along in the same decode loop
    out, base_out = sampling.generate_with_reference(
      ctx.model, ctx.params, prompts, lora=lora, **policy_kw
    )
  else:
    out = sampling.generate(ctx.model, ctx.params, prompts, lora=lora, **policy_kw)
    base_out = sampling.generate(
      ctx.model, ctx.params, prompts, temperature=0.0, lora=ref_lora, **kw
    )
  cot_tokens = fetch(out.tokens).astype(np.int32)
  lengths = fetch(out.lengths)
  length = batching.bucket(max(len(p) for p in prompts), s.prompt_bucket)
  p_tokens, p_mask = batching.pad_left(prompts, length)
  base_tokens = None if base_out is None else fetch(base_out.tokens).astype(np.int32)
  return Rollout(
    examples=list(examples),
    prompt_tokens=p_tokens,
    prompt_mask=p_mask,
    cot_tokens=cot_tokens,
    cot_mask=cot_mask(lengths, k),
    behaviour_logprobs=fetch(out.logprobs).astype(np.float32),
    cot_texts=decode_cots(ctx, cot_tokens, lengths),
    base_tokens=base_tokens,
    base_texts=None
    if base_tokens is None
    else decode_cots(ctx, base_tokens, fetch(base_out.lengths)),
  )


def score(ctx: RunContext, programs: train_step.Programs, lora, ref_lora, ro: Rollout) -> Scores:
  """Builds each row's answer row (question hidden when prompt.markovian) and scores it.

  An answer-likelihood method also scores the answer after an empty CoT (its no-reasoning
  score, when its no-reasoning subtraction reads one) and, for LaTRO's KL-in-reward, the
  reference's log-probs of the CoT tokens."""
  method = obj.method_of(ctx.spec.objective.loss)
  tokens, mask, span = ctx.answer_rows(ro.row_examples, ro.cot_texts)
  base_rows = (None, None, None)
  spans = [span]
  if ro.base_texts is not None:
    base_rows = ctx.answer_rows(ro.examples, ro.base_texts)
    spans.append(base_rows[2])
  elif method is not None and method.needs_no_reasoning:
    # The method's masked / absent reasoning: the same answer prompt with nothing as the CoT.
    base_rows = ctx.answer_rows(ro.examples, [""] * len(ro.examples))
    spans.append(base_rows[2])
  window = train_step.answer_window(*spans)
  mesh = ctx.mesh
  dev = lambda x: None if x is None else put(x, mesh)  # noqa: E731
  answer_lp, r, b = programs.score(
    ctx.params,
    lora,
    ref_lora,
    dev(tokens),
    dev(mask),
    dev(span),
    *[dev(x) for x in base_rows],
    last_n=window,
  )
  if method is not None:
    ref_cot = None
    if "kl_to_reference" in method.shaping:
      ref_cot = programs.reference_cot(
        ctx.params,
        ref_lora,
        dev(ro.prompt_tokens),
        dev(ro.prompt_mask),
        dev(ro.cot_tokens),
        dev(ro.cot_mask),
      )
    return Scores(
      tokens,
      mask,
      span,
      window,
      answer_lp,
      r,
      None,
      np.zeros(len(ro.cot_texts), np.float32),
      ro.behaviour_logprobs,
      ro.cot_mask,
      None if b is None else b[:, -window:],
      None if b is None else base_rows[2][:, -window:],
      ref_cot,
    )
  base_scores = None if b is None else fetch(b)
  rows = (
    np.zeros(len(ro.cot_texts), np.float32)
    if base_scores is None
    else np.repeat(base_scores, ro.group_size).astype(np.float32)
  )
  return Scores(tokens, mask, span, window, answer_lp, r, base_scores, rows)


def targets(ctx: RunContext, programs: train_step.Programs, sc: Scores, state: obj.BaselineState):
  """(Targets, BaselineState after this step, metrics): the step's advantages, jitted. With an
  answer-likelihood method: (objectives.MethodTargets, ...) from its pieces."""
  if obj.method_of(ctx.spec.objective.loss) is not None:
    w = sc.window
    d = lambda x: None if x is None else put(np.asarray(x), ctx.mesh)  # noqa: E731
    nr = sc.no_reasoning_logprobs
    inputs = obj.LossInputs(
      cot_logprobs=d(sc.cot_logprobs),
      cot_mask=d(sc.cot_mask),
      answer_logprobs=sc.answer_logprobs[:, -w:],
      answer_mask=d(sc.answer_span[:, -w:]),
      ref_logprobs=sc.ref_cot_logprobs,
      no_reasoning_logprobs=nr,
      no_reasoning_mask=None if nr is None else d(sc.no_reasoning_span),
    )
    return programs.method_targets(inputs, state)
  b = None if sc.base_scores is None else put(sc.baseline_rows, ctx.mesh)
  return programs.targets(sc.rewards, b, state)


def policy_batch(ctx: RunContext, ro: Rollout, sc: Scores) -> train_step.PolicyBatch:
  """The update's device batch from a step's rollout and scores."""
  d = lambda x: put(x, ctx.mesh)  # noqa: E731
  return train_step.PolicyBatch(
    prompt_tokens=d(ro.prompt_tokens),
    prompt_mask=d(ro.prompt_mask),
    cot_tokens=d(ro.cot_tokens),
    cot_mask=d(ro.cot_mask),
    behaviour_logprobs=d(ro.behaviour_logprobs),
    answer_tokens=d(sc.answer_tokens),
    answer_mask=d(sc.answer_mask),
    answer_span=d(sc.answer_span),
    answer_logprobs=sc.answer_logprobs,
    baseline_scores=d(sc.baseline_rows),
  )


def minibatch_rows(
  key: jax.Array, questions: int, group: int, minibatches: int
) -> tuple[list[np.ndarray], bool]:
  """A random partition of the Q * G question-major rows into `minibatches` row-index arrays,
  and whether it is stratified.

  When `minibatches` divides G the partition is stratified: every minibatch holds G / M random
  samples of every question, question-major, so it keeps the one-prompt-per-question layout and
  each question's prompt still runs once per pass. Otherwise the rows are shuffled across
  questions and each row carries its own prompt.
  """
  n = questions * group
  if group % minibatches:
    return np.split(np.asarray(jax.random.permutation(key, n)), minibatches), False
  per_question = np.stack(
    [
      np.asarray(jax.random.permutation(jax.random.fold_in(key, i), group)) + i * group
      for i in range(questions)
    ]
  )  # [Q, G]
  return [chunk.reshape(-1) for chunk in np.split(per_question, minibatches, axis=1)], True


def select_rows(
  batch: train_step.PolicyBatch, part: np.ndarray, group: int, stratified: bool = False
) -> train_step.PolicyBatch:
  """The minibatch of rows `part`. Stratified (`minibatch_rows` with M | G): the same G / M rows
  of every question, question-major, sharing the question's prompt; otherwise each row carries
  its own prompt."""
  rows = {
    f: getattr(batch, f)[part]
    for f in (
      "cot_tokens",
      "cot_mask",
      "behaviour_logprobs",
      "answer_tokens",
      "answer_mask",
      "answer_span",
      "answer_logprobs",
      "baseline_scores",
    )
  }
  if stratified:
    return batch.replace(**rows)
  prompts = part // group
  return batch.replace(
    prompt_tokens=batch.prompt_tokens[prompts], prompt_mask=batch.prompt_mask[prompts], **rows
  )


def update(
  ctx: RunContext,
  spec,
  programs: train_step.Programs,
  lora,
  opt_state,
  batch: train_step.PolicyBatch,
  tg: obj.Targets,
  key: jax.Array,
  ref_lora,
  lr: float,
  window: int,
):
  """The step's optimizer updates. Returns (lora, opt_state, list of per-update metric dicts).

  PG: one update on the whole batch, with LoRA dropout. PPO: `ppo_epochs` passes of
  `ppo_minibatches` updates, without LoRA dropout: the ratio pi / pi_behaviour must compare the
  function the sampler ran, so that the first minibatch of the first pass is exactly on-policy
  (rho = 1). Expert iteration that keeps no sample makes no update at all (no AdamW step, no
  moment or weight-decay change), as the reference skips the step.
  """
  o = spec.objective
  method = obj.method_of(o.loss)
  filters = o.loss.ei_std is not None or (method is not None and method.filter != "none")
  if filters and not bool(fetch(tg.active).any()):
    return lora, opt_state, []
  lr = np.float32(lr)
  # The window is static: only the paper's reward gradient and a method's answer term read it,
  # so only then may its changes compile another update program.
  rescored = o.loss.reward_grad == "paper" or (method is not None and method.has_answer_term)
  window = window if rescored else None
  if o.kind != "ppo":
    lora, opt_state, m = programs.update(
      ctx.params,
      lora,
      opt_state,
      batch,
      tg,
      jax.random.fold_in(key, 0),
      ref_lora,
      lr,
      answer_last_n=window,
    )
    return lora, opt_state, [m]
  q, g = len(batch.prompt_tokens), spec.train.group_size
  out = []
  for epoch in range(o.ppo_epochs):
    if o.ppo_minibatches == 1:
      parts, stratified = [None], True
    else:
      parts, stratified = minibatch_rows(
        jax.random.fold_in(key, 1000 + epoch), q, g, o.ppo_minibatches
      )
    for part in parts:
      sub = batch if part is None else select_rows(batch, part, g, stratified)
      sub_t = tg if part is None else jax.tree.map(lambda x, p=part: x[p], tg)
      lora, opt_state, m = programs.update(
        ctx.params, lora, opt_state, sub, sub_t, None, ref_lora, lr, answer_last_n=window
      )
      out.append(m)
  return lora, opt_state, out


# Objective and update metrics -> TensorBoard tags. Sections: answer/ (what the reward measures;
# first in TensorBoard's alphabetical order), eval/, guard/, perf/, policy/ (the CoT distribution),
# train/ (the optimisation). Keys not listed go under train/.
_TAGS = {
  "loss": "train/loss",
  "pg_loss": "train/pg_loss",
  "reward_grad_loss": "train/reward_grad_loss",
  "grad_norm": "train/grad_norm",
  "learning_rate": "train/learning_rate",
  "kl": "policy/kl",
  "entropy": "policy/entropy",
  "behaviour_logprob_diff_mean": "policy/behaviour_logprob_diff_mean",
  "behaviour_logprob_diff_max": "policy/behaviour_logprob_diff_max",
  "ppo_ratio_mean": "policy/ppo_ratio_mean",
  "ppo_ratio_max": "policy/ppo_ratio_max",
  "ppo_seq_ratio_max": "policy/ppo_seq_ratio_max",
  "ppo_clip_fraction": "policy/ppo_clip_fraction",
  "nonfinite": "guard/nonfinite_update",
}
# The same quantity as an answer/ tag (the rewards are logged from the scores themselves).
_DUPLICATES = ("reward_mean", "normalized_reward_mean")
_MAXIMA = ("ppo_ratio_max", "ppo_seq_ratio_max", "behaviour_logprob_diff_max")
# An answer-likelihood method's own reward, score and no-reasoning score, and the CoT length the
# methods' comparison reports (docs/answer-likelihood.md).
_METHOD_TAGS = {
  "reward_mean": "answer/method_reward",
  "score_mean": "answer/method_score",
  "no_reasoning_score_mean": "answer/no_reasoning_score",
  "cot_length_mean": "policy/cot_length",
  "answer_loss": "train/answer_loss",
}


def _mean_updates(per_update: list[dict]) -> dict:
  """One value per key over a step's updates: the max for maxima, otherwise the mean."""
  if not per_update:
    return {}
  keys = per_update[0].keys()
  vals = {k: [float(m[k]) for m in per_update] for k in keys}
  return {k: (max(v) if k in _MAXIMA else float(np.mean(v))) for k, v in vals.items()}


def scalars(
  spec,
  ctx: RunContext,
  ro: Rollout,
  sc: Scores,
  target_metrics: dict,
  per_update: list[dict],
  times: dict,
) -> dict:
  """The step's TensorBoard scalars, one tag per quantity, only those the config can change.

  answer/logprob is the scorer's log-prob of the gold answer (reduced by logprob_reduction): the
  reward itself when reward_kind='logprob', otherwise logged beside answer/<reward_kind>.
  answer/baseline_<kind> is b, the reference's score of its own greedy CoT', and
  answer/normalized_reward R = r - b (both only when the reward is normalised).
  """
  kind = spec.objective.loss.reward_kind
  r = fetch(sc.rewards)
  span = sc.answer_span
  lp = fetch(sc.answer_logprobs)
  answer_lp = obj.reduce_tokens(lp, span, spec.objective.loss.logprob_reduction)
  out = {
    "answer/logprob": float(np.mean(answer_lp)),
    "answer/cot_contains_answer": metrics_lib.contains_answer(
      ro.cot_texts, [ex.answer for ex in ro.row_examples]
    ),
  }
  if kind != "logprob":
    out[f"answer/{kind}"] = float(np.mean(r))
  if sc.base_scores is not None:
    out[f"answer/baseline_{kind}"] = float(np.mean(sc.base_scores))
    out["answer/normalized_reward"] = float(np.mean(r - sc.baseline_rows))
  method = spec.objective.loss.method
  for key, v in target_metrics.items():
    if method and key in _METHOD_TAGS:
      out[_METHOD_TAGS[key]] = float(v)
    elif key not in _DUPLICATES:
      out[_TAGS.get(key, f"train/{key}")] = float(v)
  for key, v in _mean_updates(per_update).items():
    out[_TAGS.get(key, f"train/{key}")] = v
  out["train/updates"] = float(sum(1 for m in per_update if not float(m["nonfinite"])))
  out.setdefault("guard/nonfinite_update", 0.0)
  seq_lp = obj.reduce_tokens(
    ro.behaviour_logprobs, ro.cot_mask, spec.objective.loss.logprob_reduction
  )
  out["policy/cot_logprob"] = float(np.mean(seq_lp))
  if spec.sampling.cot_stops_at_eos or method:
    # Every objective's CoT length is the sampler's (a method's own cot_length_mean is the same
    # count from the same mask); constant K, and so not logged, for the reference's draw.
    out["policy/cot_length"] = float(np.mean(ro.cot_lengths))
  out["policy/repetition_rate"] = _repetition_rate(ro)
  out.update(_perf(spec, ctx, ro, sc, len(per_update), times))
  return out


_REPETITION_N = 3  # metrics_lib.repetition_rate's n-gram size


def _repetition_rate(ro: Rollout) -> float:
  """policy/repetition_rate over each row's CoT tokens only: the pads after an early EOS repeat
  one id and would read as a collapse. Rows too short for one n-gram are left out, as
  repetition_rate leaves them out, so full-length rows give its value exactly."""
  rates = [
    metrics_lib.repetition_rate(row[None, :n], _REPETITION_N)
    for row, n in zip(ro.cot_tokens, ro.cot_lengths)
    if n >= _REPETITION_N
  ]
  return float(np.mean(rates)) if rates else 0.0


def _perf(spec, ctx: RunContext, ro: Rollout, sc: Scores, updates: int, times: dict) -> dict:
  """perf/: seconds per stage, tokens/s and (on known accelerators) MFU."""
  total = sum(times.values())
  base = 0 if ro.base_tokens is None else ro.base_tokens.size * 2  # CoT' and its answer row
  fwd_tokens = ro.cot_tokens.size + sc.answer_tokens.size + base
  full_kl = spec.objective.loss.kl_estimator == "full"
  train_tokens = (ro.prompt_tokens.size + ro.cot_tokens.size) * updates * (2 if full_kl else 1)
  flops = metrics_lib.step_flops(
    ctx.model.num_params, fwd_tokens, train_tokens, ctx.model.remat != "none"
  )
  out = {f"perf/{k}_s": v for k, v in times.items()}
  out["perf/step_s"] = total
  out["perf/sample_tokens_per_s"] = ro.cot_tokens.size / max(times["sample"], 1e-9)
  out["perf/tokens_per_s"] = (fwd_tokens + train_tokens) / max(total, 1e-9)
  peak = metrics_lib.device_peak_flops()
  if peak:
    out["perf/mfu"] = flops / max(total, 1e-9) / peak
  return out


class Timer:
  """Wall seconds per named stage: `with timer("sample"): ...`; `timer.times` in order."""

  def __init__(self):
    self.times: dict[str, float] = {}

  def __call__(self, name: str):
    timer = self

    class _Stage:
      def __enter__(self):
        self.t0 = time.perf_counter()

      def __exit__(self, *exc):
        timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0

    return _Stage()
