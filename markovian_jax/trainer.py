"""The training run: `Trainer` owns a run's state and sequences the step's stages and hooks.

It sits above the packages it joins (training, planning, analysis); `train.py` is its CLI.
Start-up, in order, so that bad input fails in seconds: the config (every section checked), the
workdir (a run there is resumed with train.resume=True, never silently mixed with a new one), the
tokenizer and the data, then the base model and the LoRA (fresh, PEFT init, or resumed).
Each step is `pipeline`'s stages: rollout -> score -> targets -> update -> scalars. Everything
else runs as hooks between steps (`add_hook`): TensorBoard scalars and samples, the stability
guards, evaluation every `eval_every` steps (and at step 0: the base model), checkpoints every
`checkpoint_every` steps, at the end and on SIGTERM/SIGINT. Everything lands under config.workdir.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from markovian_jax.data import selection as selection_lib
from markovian_jax.runtime import checkpointing
from markovian_jax.runtime import cli
from markovian_jax.training import config_validation
from markovian_jax.runtime import distributed
from markovian_jax.runtime import progress
from markovian_jax.runtime import faults
from markovian_jax.runtime import workdir_lock
from markovian_jax.training import resume as resume_lib
from markovian_jax.training import evaluation
from markovian_jax.training import guards
from markovian_jax.training import hooks as hooks_lib
from markovian_jax import objectives as obj
from markovian_jax.training import optimizer
from markovian_jax.training import pipeline
from markovian_jax.runtime import summary
from markovian_jax.training import train_step
from markovian_jax.planning import plan as memory_plan
from markovian_jax.data import ExampleStream
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.models import hf, init_lora, load_tokenizer
from markovian_jax.training.run_context import RunContext, fetch, run_splits

TrainingStopped = guards.TrainingStopped


def check_workdir(spec) -> list:
  """Refuses to start a second run in a workdir that holds one, unless it is a resume with the
  eval.seed and eval.selection_size the run started with. Returns the saved steps."""
  workdir = epath.Path(spec.workdir)  # local or gs://...
  ckpt_dir = workdir / "checkpoints"
  steps = sorted(int(d.name) for d in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
                 if d.name.isdigit())
  events = list(workdir.glob("events.out.tfevents.*")) if workdir.is_dir() else []
  if steps and not spec.train.resume:
    raise InvalidConfig(
        f"config.train.resume: {ckpt_dir} already holds checkpoints of steps {steps}; set "
        "--config.train.resume=True to continue that run, or give a new --config.workdir to "
        "start over")
  if events and not steps:
    raise InvalidConfig(
        f"config.workdir: {spec.workdir} holds the TensorBoard events of an earlier run but no "
        "checkpoint to resume from; give a new --config.workdir (or delete that directory) to "
        "start over")
  recorded = workdir / "config.json"
  if steps and recorded.is_file():
    selection_lib.check_resume(json.loads(recorded.read_text()), spec.eval.seed,
                               spec.eval.selection_size, str(recorded))
  return steps


class Trainer:
  """Owns the run's state; `step()` is one Markovian step, `run()` the loop with its hooks."""

  def __init__(self, config):
    self._lock = None
    try:
      self._start(config)
    except BaseException:
      if self._lock is not None:  # a run that did not start leaves its workdir free
        self._lock.release()
      raise

  def _start(self, config):
    """The start-up of the module docstring, in that order."""
    self.config = config
    self.spec = spec = config_validation.validate(config)
    # One run per workdir (a second is refused; a dead run's lock is taken over).
    self._lock = workdir_lock.acquire(spec.workdir) if jax.process_index() == 0 else None
    resuming = bool(check_workdir(spec)) and spec.train.resume
    distributed.sync("workdir checked")  # before process 0 writes the first file there
    t = spec.train
    if spec.lora.init_from and not os.path.isfile(
        os.path.join(spec.lora.init_from, "adapter_config.json")):
      raise checkpointing.CheckpointError(
          f"config.lora.init_from: {spec.lora.init_from} is not a PEFT adapter directory (no "
          "adapter_config.json)")
    tokenizer = load_tokenizer(spec.model.path)
    # Three disjoint sets: train, selection (checkpoint choice, keep_best) and the reported test.
    self.splits = run_splits(spec, tokenizer)
    self.train_stream = ExampleStream(self.splits.train, t.seed)
    self.eval_examples, self.selection_examples = self.splits.test, self.splits.selection
    # Rows rule on the real device count, weights split, memory verdict: before the model loads.
    self.plan = memory_plan.check(spec, tokenizer=tokenizer, examples=self.splits.train)
    self.ctx = RunContext.create(config, spec=spec, tokenizer=tokenizer)
    self.mesh = self.ctx.mesh
    self.workdir = epath.Path(spec.workdir)
    if jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      selection_lib.write_record(self.workdir / "selection.json", self.splits, resuming)
    if spec.objective.kind == "ppo" and spec.lora.dropout > 0:
      logging.info("PPO updates run without LoRA dropout (lora.dropout=%s applies to PG): the "
                   "ratio must compare the function the sampler ran", spec.lora.dropout)
    self.settings = train_step.StepSettings(
        model=self.ctx.model, objective=spec.objective.loss,
        temperature=float(spec.sampling.temperature),
        reward_scorer=spec.objective.reward_scorer)
    self.tx = optimizer.make_optimizer(spec.optim)

    if spec.lora.init_from:
      lora = hf.load_peft_adapter(spec.lora.init_from, self.ctx.model)
    else:
      lora = init_lora(self.ctx.model, jax.random.PRNGKey(t.seed + 1), rank=spec.lora.rank,
                       alpha=spec.lora.alpha, dropout=spec.lora.dropout,
                       targets=spec.lora.targets)
    self.lora_sh = train_step.tree_shardings(lora, self.mesh)
    self.lora = jax.device_put(lora, self.lora_sh)
    # The KL/baseline reference: LoRA off, or a frozen copy of the starting adapter.
    # A copy: the update donates (deletes) the buffers of self.lora.
    self.ref_lora = (jax.tree.map(jnp.copy, self.lora) if spec.lora.reference == "initial_adapter"
                     else None)
    opt_state = self.tx.init(self.lora)
    self.opt_sh = train_step.tree_shardings(opt_state, self.mesh)
    self.opt_state = jax.device_put(opt_state, self.opt_sh)
    self.programs = train_step.Programs(self.settings, self.tx, self.mesh, self.lora_sh,
                                        self.opt_sh)

    self.step_num = 0
    self.rng = jax.random.PRNGKey(t.seed)
    self.baseline_state = obj.BaselineState.init()
    self.last_eval = None
    self.last_rollout = self.last_scores = self.last_targets = self.last_updates = None
    self.ckpt = checkpointing.Checkpointer(self.workdir / "checkpoints",
                                           max_to_keep=t.max_to_keep, keep_best=t.keep_best)
    self.writer = summary.SummaryWriter(self.workdir)
    if jax.process_index() == 0:  # the run's full config, for reports and analyses
      with (self.workdir / "config.json").open("w") as f:
        json.dump(config.to_dict(), f, indent=1, default=str)
    self.hooks = hooks_lib.Hooks()
    self.add_hook(self._write_scalars, name="scalars")
    self.add_hook(self._write_samples, every=t.text_every, name="samples", at_start=True)
    self.add_hook(guards.NonFiniteGuard(self, t.nan_patience, t.nonfinite_action,
                                                t.max_rollbacks), name="nonfinite_guard")
    self.add_hook(guards.CollapseGuard(self, spec), name="collapse_guard")
    self.add_hook(self._evaluate_hook, every=t.eval_every, name="eval", at_end=True)
    if spec.eval.fragility_every:
      self.add_hook(self._fragility_hook, every=spec.eval.fragility_every, name="fragility")
    self.add_hook(self._checkpoint_hook, every=t.checkpoint_every, name="checkpoint", at_end=True)
    if t.resume and self.ckpt.latest_step() is not None:
      resume_lib.resume(self)  # the newest complete checkpoint; lost steps' files superseded
    elif t.resume:
      logging.info("resume requested but %s has no checkpoints: starting fresh",
                   self.ckpt.directory)

  def add_hook(self, fn, every: int = 1, *, name=None, at_start=False, at_end=False):
    """Runs `fn(info: hooks.StepInfo)` after every `every`-th step (see `hooks`)."""
    return self.hooks.add(fn, every, name=name, at_start=at_start, at_end=at_end)

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
    # The events up to this step reach the disk before the checkpoint does: a run killed later
    # resumes here and must find them (tensorboardX otherwise holds them for up to 2 minutes).
    self.writer.flush()
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

  def rollback(self, step: int):
    """Back to checkpoint `step`, keeping the data cursor: fresh data rather than a replay."""
    stream = self.train_stream.state()
    self.restore(step)
    self.train_stream.restore(stream)

  # ------------------------------------------------------------------ one step
  def step(self) -> dict:
    """One Markovian step (pipeline stages); returns its TensorBoard scalars."""
    spec, ctx, p = self.spec, self.ctx, self.programs
    examples = self.train_stream.take(spec.train.questions_per_step)
    self.rng, sample_key, update_key = jax.random.split(self.rng, 3)
    timer = pipeline.Timer()
    with timer("sample"):
      faults.at("sample", self.step_num + 1)  # tests only (MARKOVIAN_TEST_FAULTS)
      ro = pipeline.rollout(ctx, spec, self.lora, self.ref_lora, examples, sample_key)
    with timer("score"):
      sc = pipeline.score(ctx, p, self.lora, self.ref_lora, ro)
      tg, new_state, target_metrics = pipeline.targets(ctx, p, sc, self.baseline_state)
      if faults.at("loss", self.step_num + 1):  # tests only: a non-finite loss at this step
        tg = tg._replace(advantages=tg.advantages * jnp.nan)
    with timer("update"):
      faults.at("update", self.step_num + 1, self.workdir)
      lr = optimizer.learning_rate(spec.optim, spec.train.num_steps, self.step_num)
      batch = pipeline.policy_batch(ctx, ro, sc)
      self.lora, self.opt_state, per_update = pipeline.update(
          ctx, spec, p, self.lora, self.opt_state, batch, tg, update_key, self.ref_lora, lr,
          sc.window)
      per_update = [{k: float(v) for k, v in m.items()} for m in per_update]
    if not any(m["nonfinite"] for m in per_update):
      self.baseline_state = new_state
    self.step_num += 1
    self.last_rollout, self.last_scores = ro, sc
    self.last_targets, self.last_updates = tg, per_update
    scalars = pipeline.scalars(spec, ctx, ro, sc, target_metrics, per_update, timer.times)
    if not per_update:  # expert iteration kept nothing: report the schedule's value
      scalars["train/learning_rate"] = lr
    return scalars

  # ------------------------------------------------------------------ hooks
  def _write_scalars(self, info: hooks_lib.StepInfo):
    self.writer.scalars(info.step, info.scalars)
    self.writer.histogram(info.step, "train/advantages", fetch(self.last_targets.advantages))

  def _write_samples(self, info: hooks_lib.StepInfo):
    """The step's CoTs: three as TensorBoard text, all of them in samples.jsonl (one line per
    question: CoTs, rewards r, normalised rewards R, the reference's CoT' and its score b)."""
    ro = info.rollout
    cots = "\n\n".join(f"**CoT {i}**: {t}" for i, t in enumerate(ro.cot_texts[:3]))
    base = "" if ro.base_texts is None else f"**Baseline CoT'**: {ro.base_texts[0]}\n\n"
    self.writer.text(info.step, "samples", (
        f"**Question**: {ro.examples[0].question}\n\n{cots}\n\n{base}"
        f"**Answer**: {ro.examples[0].answer}"))
    r = fetch(self.last_scores.rewards).astype(float)  # a collective: before process 0 alone
    if jax.process_index() != 0:
      return
    g = ro.group_size
    b = self.last_scores.base_scores
    with (self.workdir / "samples.jsonl").open("a") as f:
      for q, ex in enumerate(ro.examples):
        rows = slice(q * g, (q + 1) * g)
        f.write(json.dumps({
            "step": info.step, "task": self.spec.task, "id": ex.id, "question": ex.question,
            "answer": ex.answer, "cots": ro.cot_texts[rows], "rewards": r[rows].tolist(),
            "normalized": None if b is None else (r[rows] - float(b[q])).tolist(),
            "base_cot": None if ro.base_texts is None else ro.base_texts[q],
            "base_score": None if b is None else float(b[q])}) + "\n")

  def _evaluate_hook(self, info: hooks_lib.StepInfo):
    self.evaluate()

  def _fragility_hook(self, info: hooks_lib.StepInfo):
    """fragility/<kind>/p<percent>: the mean drop in the answer log-prob (under the current
    policy) when the step's CoTs are perturbed; a CoT the answer really depends on drops more."""
    from markovian_jax.analysis import fragility
    ro = info.rollout
    res = fragility.fragility_scores(self.ctx, self.lora, ro.row_examples, ro.cot_texts,
                                     severities=(0, 40, 100), seed=info.step,
                                     batch_size=self.spec.eval.batch_size, progress=False)
    self.writer.scalars(info.step, {f"fragility/{k}/p{p}": float(res.effect(k, p).mean())
                                    for k in res.kinds for p in (40, 100)})

  def _checkpoint_hook(self, info: hooks_lib.StepInfo):
    score = self.last_eval[1] if self.last_eval and self.last_eval[0] == info.step else None
    self.save(score=score)

  def evaluate(self) -> dict:
    """Evaluates the current adapter on the selection split (scalars `selection/`, rows under
    eval/selection/; its primary score ranks checkpoints for keep_best) and on the reported test
    split (scalars `eval/`, rows under eval/). Returns the test summary."""
    for name, examples, prefix, folder in (
        ("selection", self.selection_examples, "selection/", self.workdir / "eval" / "selection"),
        ("test", self.eval_examples, "eval/", self.workdir / "eval")):
      summ = self._evaluate_on(examples, prefix, folder, f"{name}@{self.step_num}")
      if name == "selection":
        self.last_eval = (self.step_num, evaluation.primary_score(summ))
        faults.at("eval", self.step_num)  # tests only: between the two evaluations
    return summ

  def _evaluate_on(self, examples, prefix: str, folder: epath.Path, desc: str) -> dict:
    e = self.spec.eval
    summ, rows = evaluation.evaluate(
        self.ctx, self.lora, examples, num_samples=e.num_samples,
        temperature=e.temperature, reader=e.reader, answer_max_tokens=e.answer_max_tokens,
        answer_first_line=e.answer_first_line, batch_size=e.batch_size, seed=e.seed,
        desc=desc)
    self.writer.scalars(self.step_num, evaluation.scalars(summ), prefix=prefix)
    if jax.process_index() == 0:
      path = folder / f"step_{self.step_num}.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      with path.open("w") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
    logging.info("%s: %s", desc, json.dumps(evaluation.scalars(summ)))
    return summ

  def export_adapter(self) -> epath.Path:
    """Writes the current adapter in PEFT form to <workdir>/adapter (loads in transformers +
    peft and in `sample --lora`)."""
    out = self.workdir / "adapter"
    params = jax.tree.map(fetch, self.lora.params)  # every process joins the gather
    if jax.process_index() == 0:
      # The PEFT writer takes a local directory; a gs:// workdir gets a copy through epath.
      with tempfile.TemporaryDirectory() as local:
        hf.save_peft_adapter(self.lora.replace(params=params), self.ctx.model, local,
                             base_model_name_or_path=self.spec.model.path)
        out.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(local):
          (out / name).write_bytes(epath.Path(local, name).read_bytes())
      logging.info("wrote the step-%d adapter (PEFT) to %s", self.step_num, out)
    return out

  # ------------------------------------------------------------------ loop
  def run(self):
    t = self.spec.train
    # SIGTERM/SIGINT on any process: every process stops after the same step and checkpoints.
    stop = distributed.StopOnSignal()
    stop.install()
    try:
      if self.step_num == 0:
        self.evaluate()  # the base-model baseline
      bar = progress.bar(t.num_steps, "train", unit="step", initial=self.step_num)
      while self.step_num < t.num_steps and not stop.requested(self.step_num):
        s = self.step()
        bar.update(1)
        bar.set_postfix(reward=f"{s.get('answer/normalized_reward', s['answer/logprob']):.3f}",
                        loss=f"{s.get('train/loss', float('nan')):.3f}")
        self.hooks.run(hooks_lib.StepInfo(self.step_num, s, self.last_rollout,
                                          last=self.step_num == t.num_steps))
      bar.close()
      self.save()
      self.export_adapter()
    finally:
      stop.uninstall()
      self.writer.close()
      if self._lock is not None:
        self._lock.release()
    return self.step_num
