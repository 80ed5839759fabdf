"""Markovian training entry point.

  python -m markovian_jax.train --config=configs/svamp.py [--config.key=value ...]

config -> mesh -> base model + tokenizer -> LoRA/optimizer (fresh, PEFT init, or resumed) -> loop:
sample Q x G CoTs (+ the base model's greedy CoT'), score answers, update the LoRA, log to
TensorBoard, evaluate every `eval_every` steps (and at step 0: the base model), checkpoint every
`checkpoint_every` steps, at the end and on SIGTERM/SIGINT. Everything lands under config.workdir.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from markovian_jax import batching, checkpointing, evaluation, metrics as metrics_lib
from markovian_jax import objectives as obj
from markovian_jax import sampling, summary, train_step
from markovian_jax.config_validation import InvalidConfig
from markovian_jax.data import ExampleStream
from markovian_jax.models import init_lora, lora as lora_lib
from markovian_jax.run_context import RunContext, fetch, put

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/<task>.py).")


def minibatch_rows(key: jax.Array, questions: int, group: int, minibatches: int
                   ) -> tuple[list[np.ndarray], bool]:
  """A random partition of the Q * G question-major rows into `minibatches` row-index arrays,
  and whether it is stratified (the `stratified` argument of `_rows`).

  When `minibatches` divides G the partition is stratified: every minibatch holds G / M random
  samples of every question, question-major, so it keeps the one-prompt-per-question layout and
  each question's prompt still runs once per pass (`stratified=True` in `_rows`). Otherwise the
  rows are shuffled across questions and each row carries its own prompt.
  """
  n = questions * group
  if group % minibatches:
    return np.split(np.asarray(jax.random.permutation(key, n)), minibatches), False
  per_question = np.stack([np.asarray(jax.random.permutation(jax.random.fold_in(key, i), group))
                           + i * group for i in range(questions)])  # [Q, G]
  return [chunk.reshape(-1) for chunk in np.split(per_question, minibatches, axis=1)], True


def _rows(batch: train_step.PolicyBatch, part: np.ndarray, group: int,
          stratified: bool = False) -> train_step.PolicyBatch:
  """The PPO minibatch of rows `part`. Stratified (`minibatch_rows` with M | G): the same G / M
  rows of every question, question-major, sharing the question's prompt; otherwise each row
  carries its own prompt."""
  rows = {f: getattr(batch, f)[part] for f in ("cot_tokens", "cot_mask", "behaviour_logprobs",
                                               "answer_tokens", "answer_mask", "answer_span",
                                               "answer_logprobs", "baseline_scores")}
  if stratified:
    return batch.replace(**rows)
  prompts = part // group
  return batch.replace(prompt_tokens=batch.prompt_tokens[prompts],
                       prompt_mask=batch.prompt_mask[prompts], **rows)


class TrainingStopped(RuntimeError):
  """Training cannot continue (non-finite updates, collapse with action=stop)."""


class Trainer:
  """Owns the run's state; `step()` is one Markovian step, `run()` the loop."""

  def __init__(self, config):
    self.config = c = config
    self.ctx = RunContext.create(config)
    self.mesh = self.ctx.mesh
    self.workdir = c.workdir
    os.makedirs(self.workdir, exist_ok=True)
    self.obj_cfg = obj.ObjectiveConfig.from_config(c)
    self.settings = train_step.StepSettings(
        model=self.ctx.model, objective=self.obj_cfg, temperature=float(c.sampling.temperature),
        reward_scorer=c.objective.reward_scorer)
    self.tx = train_step.make_optimizer(c.optim, c.train.num_steps)

    self.train_stream = ExampleStream(self.ctx.load_examples(c.data.train_split), c.train.seed)
    self.eval_examples = self.ctx.load_examples(c.data.eval_split, c.eval.num_examples)

    lora = init_lora(self.ctx.model, jax.random.PRNGKey(c.train.seed + 1), rank=c.lora.rank,
                     alpha=c.lora.alpha, dropout=c.lora.dropout, targets=tuple(c.lora.targets))
    if c.lora.init_from:
      from markovian_jax.models import hf
      lora = hf.load_peft_adapter(c.lora.init_from, self.ctx.model)
    self.lora_sh = train_step.tree_shardings(lora, self.mesh)
    self.lora = jax.device_put(lora, self.lora_sh)
    # The KL/baseline reference: LoRA off, or a frozen copy of the starting adapter.
    # A copy: the update donates (deletes) the buffers of self.lora.
    self.ref_lora = (jax.tree.map(jnp.copy, self.lora) if c.lora.reference == "initial_adapter"
                     else None)
    opt_state = self.tx.init(self.lora)
    self.opt_sh = train_step.tree_shardings(opt_state, self.mesh)
    self.opt_state = jax.device_put(opt_state, self.opt_sh)
    self.score_fn, self.update_fn = train_step.jit_functions(
        self.settings, self.tx, self.mesh, None, self.lora_sh, self.opt_sh)

    self.step_num = 0
    self.rng = jax.random.PRNGKey(c.train.seed)
    self.baseline_state = obj.BaselineState.init()
    self.bad_updates = 0
    self.rollbacks = 0
    self.last_eval = None
    self.ckpt = checkpointing.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                           max_to_keep=c.train.max_to_keep,
                                           keep_best=c.train.keep_best)
    self.writer = summary.SummaryWriter(self.workdir)
    self._stop_signal = None
    if c.train.resume and self.ckpt.latest_step() is not None:
      self.restore(self.ckpt.latest_step())
    elif c.train.resume:
      logging.info("resume requested but %s has no checkpoints: starting fresh",
                   self.ckpt.directory)

  # ------------------------------------------------------------------ state
  def state_json(self) -> dict:
    return {"step": self.step_num, "data": self.train_stream.state(),
            "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
            "baseline": self.baseline_state.to_json(), "config": self.config.to_dict(),
            "lora": {"rank": self.lora.rank, "alpha": self.lora.alpha,
                     "dropout": self.lora.dropout}}

  def save(self, score=None, force=True):
    if self.ckpt.latest_step() == self.step_num:
      return
    self.ckpt.save(self.step_num, self.lora.params, self.opt_state, self.state_json(),
                   score=score, force=force)
    logging.info("saved checkpoint at step %d", self.step_num)

  def restore(self, step: int):
    params, opt_state, state = self.ckpt.restore(step, self.lora.params, self.opt_state)
    self.lora = self.lora.replace(params=params)
    self.opt_state = opt_state
    self.step_num = int(state["step"])
    self.train_stream.restore(state["data"])
    self.rng = jnp.asarray(np.asarray(state["rng"], np.uint32))
    self.baseline_state = obj.BaselineState.from_json(state["baseline"])
    logging.info("restored step %d from %s", self.step_num, self.ckpt.directory)

  # ------------------------------------------------------------------ one step
  def step(self) -> dict:
    c, ctx = self.config, self.ctx
    q, g, k = c.train.questions_per_step, c.train.group_size, c.sampling.cot_length
    examples = self.train_stream.take(q)
    self.rng, sample_key, dropout_key = jax.random.split(self.rng, 3)
    t0 = time.perf_counter()
    prompts = [ctx.cot_prompt_ids(ex) for ex in examples]
    kw = dict(max_new_tokens=k, min_new_tokens=k, eos_ids=ctx.eos_ids)
    policy_kw = dict(rng=sample_key, temperature=c.sampling.temperature, top_k=c.sampling.top_k,
                     top_p=c.sampling.top_p, num_samples=g, **kw)
    if self.ref_lora is None:  # the base model's CoT' rides along in the same decode loop
      out, base_out = sampling.generate_with_reference(ctx.model, ctx.params, prompts,
                                                       lora=self.lora, **policy_kw)
    else:
      out = sampling.generate(ctx.model, ctx.params, prompts, lora=self.lora, **policy_kw)
      base_out = sampling.generate(ctx.model, ctx.params, prompts, temperature=0.0,
                                   lora=self.ref_lora, **kw)
    cot_tokens, behaviour = fetch(out.tokens), fetch(out.logprobs)
    base_tokens = fetch(base_out.tokens)
    t1 = time.perf_counter()

    cot_texts, base_texts = ctx.decode(cot_tokens), ctx.decode(base_tokens)
    rows = [ex for ex in examples for _ in range(g)]
    ans_tokens, ans_mask, ans_span = ctx.answer_rows(rows, cot_texts)
    base_rows = ctx.answer_rows(examples, base_texts)
    length = batching.bucket(max(len(p) for p in prompts), c.sampling.prompt_bucket)
    p_tokens, p_mask = batching.pad_left(prompts, length)
    answer_lp, b = self.score_fn(ctx.params, self.lora, self.ref_lora, put(ans_tokens, self.mesh),
                                 put(ans_mask, self.mesh), put(ans_span, self.mesh),
                                 *[put(x, self.mesh) for x in base_rows],
                                 last_n=train_step.answer_window(ans_span, base_rows[2]))
    b_rows = np.repeat(fetch(b), g) if self.obj_cfg.normalize_reward else np.zeros(q * g, np.float32)
    r = obj.answer_reward(answer_lp, put(ans_span, self.mesh), self.obj_cfg.logprob_reduction)
    targets, new_state, adv_metrics = obj.advantage_targets(
        r, put(b_rows, self.mesh), self.obj_cfg, self.baseline_state)
    t2 = time.perf_counter()

    batch = train_step.PolicyBatch(
        prompt_tokens=put(p_tokens, self.mesh), prompt_mask=put(p_mask, self.mesh),
        cot_tokens=put(cot_tokens.astype(np.int32), self.mesh),
        cot_mask=put(np.ones(cot_tokens.shape, bool), self.mesh),
        behaviour_logprobs=put(behaviour.astype(np.float32), self.mesh),
        answer_tokens=put(ans_tokens, self.mesh), answer_mask=put(ans_mask, self.mesh),
        answer_span=put(ans_span, self.mesh), answer_logprobs=answer_lp,
        baseline_scores=put(b_rows.astype(np.float32), self.mesh))
    step_metrics = []
    n, mbs = q * g, c.objective.ppo_minibatches
    epochs = c.objective.ppo_epochs if c.objective.kind == "ppo" else 1
    for epoch in range(epochs):
      parts, stratified = ([np.arange(n)], True) if mbs == 1 else minibatch_rows(
          jax.random.fold_in(dropout_key, 1000 + epoch), q, g, mbs)
      for part in parts:
        sub = batch if mbs == 1 else _rows(batch, part, g, stratified)
        sub_t = targets if mbs == 1 else jax.tree.map(lambda x: x[part], targets)
        key = jax.random.fold_in(dropout_key, len(step_metrics))
        self.lora, self.opt_state, m = self.update_fn(ctx.params, self.lora, self.opt_state, sub,
                                                      sub_t, key, self.ref_lora)
        step_metrics.append(m)
    upd = {k_: float(np.mean([float(m[k_]) for m in step_metrics])) for k_ in step_metrics[0]}
    upd["ppo_ratio_max"] = max(float(m.get("ppo_ratio_max", 0.0)) for m in step_metrics)
    skipped = upd.pop("update_skipped") > 0
    if not skipped:
      self.baseline_state = new_state
    t3 = time.perf_counter()

    self.step_num += 1
    lp_seq = obj.reduce_tokens(jnp.asarray(behaviour), jnp.ones(behaviour.shape, bool),
                               self.obj_cfg.logprob_reduction)
    num_params = ctx.model.num_params
    fwd_tokens = cot_tokens.size + base_tokens.size + ans_tokens.size + base_rows[0].size
    train_tokens = (p_tokens.size + cot_tokens.size) * epochs * (2 if self.settings.objective.kl_estimator == "full"
                                                  else 1)
    flops = metrics_lib.step_flops(num_params, fwd_tokens, train_tokens, ctx.model.remat != "none")
    peak = metrics_lib.device_peak_flops()
    scalars = {
        **upd, **{k_: float(v) for k_, v in adv_metrics.items()},
        "reward/raw": float(jnp.mean(r)), "reward/normalized": float(np.mean(fetch(r) - b_rows)),
        "answer_logprob/actor": float(jnp.mean(r)),
        "answer_logprob/base": float(np.mean(fetch(b))),
        "cot_logprob": float(jnp.mean(lp_seq)),
        "cot_length": float(np.mean(fetch(out.lengths))),
        "repetition_rate": metrics_lib.repetition_rate(cot_tokens),
        "contains_answer": metrics_lib.contains_answer(cot_texts, [ex.answer for ex in rows]),
        "learning_rate": train_step.learning_rate(c.optim, c.train.num_steps, self.step_num - 1),
        "update_skipped": float(skipped),
        "perf/sample_s": t1 - t0, "perf/score_s": t2 - t1, "perf/update_s": t3 - t2,
        "perf/step_s": t3 - t0, "perf/sample_tokens_per_s": cot_tokens.size / max(t1 - t0, 1e-9),
        "perf/tokens_per_s": (fwd_tokens + train_tokens) / max(t3 - t0, 1e-9),
    }
    if peak:
      scalars["perf/mfu"] = flops / (t3 - t0) / peak
    self.writer.scalars(self.step_num, scalars)
    self.writer.histogram(self.step_num, "advantages", fetch(targets.advantages))
    if self.step_num % c.train.text_every == 1 or c.train.text_every == 1:
      samples = "\n\n".join(f"**CoT {i}**: {t}" for i, t in enumerate(cot_texts[:3]))
      self.writer.text(self.step_num, "samples", (
          f"**Question**: {examples[0].question}\n\n{samples}\n\n"
          f"**Baseline CoT'**: {base_texts[0]}\n\n**Answer**: {examples[0].answer}"))
    self._guards(scalars, skipped)
    return scalars

  # ------------------------------------------------------------------ guards
  def _guards(self, s: dict, skipped: bool):
    c = self.config.train
    if skipped:
      self.bad_updates += 1
      logging.warning("step %d: non-finite loss or gradient (loss=%s grad_norm=%s); update "
                      "skipped (%d in a row)", self.step_num, s.get("loss"), s.get("grad_norm"),
                      self.bad_updates)
      if self.bad_updates >= c.nan_patience:
        self.save()
        raise TrainingStopped(f"{self.bad_updates} consecutive non-finite updates at step "
                              f"{self.step_num}: stopping (last good state saved)")
    else:
      self.bad_updates = 0
    alarms = []
    if s["repetition_rate"] > c.collapse_repetition:
      alarms.append(f"repetition rate {s['repetition_rate']:.2f} > {c.collapse_repetition}")
    if s.get("ppo_ratio_max", 0.0) > c.collapse_ppo_ratio:
      alarms.append(f"PPO ratio max {s['ppo_ratio_max']:.1f} > {c.collapse_ppo_ratio}")
    if s.get("kl", 0.0) > c.collapse_kl:
      alarms.append(f"KL {s['kl']:.2f} > {c.collapse_kl}")
    self.writer.scalars(self.step_num, {"guard/collapse_alarm": float(bool(alarms))})
    if not alarms:
      self.rollbacks = 0
      return
    msg = f"step {self.step_num}: collapse signal: " + "; ".join(alarms)
    if c.collapse_action == "warn":
      logging.warning(msg)
    elif c.collapse_action == "stop":
      self.save()
      raise TrainingStopped(msg + " (collapse_action=stop; state saved)")
    else:
      good = [st for st in self.ckpt.all_steps() if st < self.step_num]
      if not good:
        logging.warning(msg + "; no earlier checkpoint to roll back to")
        return
      self.rollbacks += 1
      if self.rollbacks > c.max_rollbacks:
        raise TrainingStopped(msg + f"; still collapsing after {c.max_rollbacks} rollbacks to "
                              f"step {good[-1]}: stopping")
      stream = self.train_stream.state()
      self.restore(good[-1])
      self.train_stream.restore(stream)  # move on to fresh data rather than replay the same
      logging.warning(msg + f"; rolled back to step {good[-1]}")

  # ------------------------------------------------------------------ loop
  def evaluate(self) -> dict:
    c = self.config
    summ, rows = evaluation.evaluate(
        self.ctx, self.lora, self.eval_examples, num_samples=c.eval.num_samples,
        temperature=c.eval.temperature, reader=c.eval.reader,
        answer_max_tokens=c.eval.answer_max_tokens,
        answer_first_line=c.eval.answer_first_line, batch_size=c.eval.batch_size,
        seed=c.eval.seed, desc=f"eval@{self.step_num}")
    self.writer.scalars(self.step_num, evaluation.scalars(summ), prefix="eval/")
    if jax.process_index() == 0:
      path = os.path.join(self.workdir, "eval", f"step_{self.step_num}.jsonl")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
    logging.info("eval at step %d: %s", self.step_num, json.dumps(evaluation.scalars(summ)))
    self.last_eval = (self.step_num, evaluation.primary_score(summ))
    return summ

  def _on_signal(self, signum, frame):
    del frame
    self._stop_signal = signum
    logging.warning("signal %d: checkpointing and stopping after this step", signum)

  def run(self):
    c = self.config.train
    handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      if self.step_num == 0:
        self.evaluate()  # the base-model baseline
      bar = tqdm(total=c.num_steps, initial=self.step_num, desc="train",
                 disable=jax.process_index() != 0)
      while self.step_num < c.num_steps and self._stop_signal is None:
        s = self.step()
        bar.update(1)
        bar.set_postfix(reward=f"{s['reward/normalized']:.3f}", loss=f"{s['loss']:.3f}")
        score = None
        if self.step_num % c.eval_every == 0 or self.step_num == c.num_steps:
          score = evaluation.primary_score(self.evaluate())
        if self.step_num % c.checkpoint_every == 0 or self.step_num == c.num_steps:
          self.save(score=score)
      bar.close()
      self.save()
    finally:
      for s, h in handlers.items():
        signal.signal(s, h)
      self.writer.close()
    return self.step_num


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (e.g. --config=configs/demo.py)")
  absl_logger = pylogging.getLogger("absl")
  absl_logger.setLevel(pylogging.INFO)
  # orbax logs every save step at INFO through absl; keep its warnings, drop the chatter.
  absl_logger.addFilter(lambda r: r.levelno >= pylogging.WARNING or "orbax" not in r.pathname)
  from markovian_jax import compilation_cache, distributed, host_allocator
  try:
    host_allocator.ensure(_CONFIG.value.host_allocator)  # may restart this command
    distributed.initialize()
    cache = compilation_cache.enable(_CONFIG.value.compilation_cache_dir)
    Trainer(_CONFIG.value).run()
    if cache:
      logging.info("compilation cache %s: %s", cache, compilation_cache.stats())
  except (InvalidConfig, TrainingStopped, FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
