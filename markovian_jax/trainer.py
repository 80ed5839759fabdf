"""The training run: `Trainer` holds a run's state and sequences the step's stages and hooks.

    trainer = Trainer(spec, default_hooks=False)     # what the train CLI does (a RunSpec)
    add_default_hooks(trainer)                        # scalars, samples, guards, eval, checkpoints
    trainer.add_hook(my_fn, every=50)                 # my_fn(info: hooks.StepInfo)
    trainer.run()

It sits above the packages it joins (training, planning, analysis); `cli/train.py` is its CLI.
Start-up, in order, so that bad input fails in seconds: the config (every section checked), the
workdir (a run there is resumed with train.resume=True, never silently mixed with a new one), the
tokenizer and the data, then the base model and the LoRA (fresh, PEFT init, or resumed).
The run's state is one pytree, `training.state.TrainState` (adapter, optimizer state, rng,
baseline state, step; for NOVER its EMA-lagged adapter copy, the step's reward scorer and KL
reference); the data cursor is the stream's, host-side. Each step is `pipeline`'s
stages: rollout -> score -> targets -> update -> scalars, from one TrainState to the next.
Everything else runs as hooks between steps, each given the state and the step's outputs in its
`StepInfo`: TensorBoard scalars and samples, the stability guards, evaluation every `eval_every`
steps (and at step 0: the base model), checkpoints every `checkpoint_every` steps, at the end and
on SIGTERM/SIGINT. Everything lands under config.workdir.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp

from markovian_jax import objectives as obj
from markovian_jax.data import ExampleStream
from markovian_jax.data import selection as selection_lib
from markovian_jax.models import hf, init_lora, load_tokenizer
from markovian_jax.planning import plan as memory_plan
from markovian_jax.runtime import (
  checkpointing,
  distributed,
  faults,
  files,
  progress,
  summary,
  workdir_lock,
)
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.training import (
  config_validation,
  evaluation,
  guards,
  optimizer,
  pipeline,
  train_step,
)
from markovian_jax.training import hooks as hooks_lib
from markovian_jax.training import resume as resume_lib
from markovian_jax.training import state as state_lib
from markovian_jax.training.run_context import RunContext, fetch, run_splits
from markovian_jax.training.specs import RunSpec

TrainingStopped = guards.TrainingStopped


def check_workdir(spec) -> list:
  """Refuses to start a second run in a workdir that holds one, unless it is a resume with the
  eval.seed and eval.selection_size the run started with. Returns the saved steps."""
  workdir = epath.Path(spec.workdir)  # local or gs://...
  ckpt_dir = workdir / "checkpoints"
  steps = sorted(
    int(d.name) for d in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else []) if d.name.isdigit()
  )
  events = list(workdir.glob("events.out.tfevents.*")) if workdir.is_dir() else []
  if steps and not spec.train.resume:
    raise InvalidConfig(
      f"config.train.resume: {ckpt_dir} already holds checkpoints of steps {steps}; set "
      "--config.train.resume=True to continue that run, or give a new --config.workdir to "
      "start over"
    )
  if events and not steps:
    raise InvalidConfig(
      f"config.workdir: {spec.workdir} holds the TensorBoard events of an earlier run but no "
      "checkpoint to resume from; give a new --config.workdir (or delete that directory) to "
      "start over"
    )
  recorded = workdir / "config.json"
  if steps and recorded.is_file():
    selection_lib.check_resume(
      files.read_json(recorded), spec.eval.seed, spec.eval.selection_size, str(recorded)
    )
  return steps


class Trainer:
  """Sequences one run. `state` (a `training.state.TrainState`: adapter, optimizer state, rng,
  baseline state, step) is everything its steps change on the device, `train_stream` the host-side
  data cursor; `advance(state, examples)` is the step function, `step()` one step of the run,
  `run()` the loop with its hooks.

  `Trainer(spec)` (a RunSpec, or a ConfigDict to validate) wires the default hooks
  (`add_default_hooks`); with `default_hooks=False` the caller wires them (the train CLI does,
  and may add its own with `add_hook`).
  """

  def __init__(self, config, *, default_hooks: bool = True):
    self._lock = None
    try:
      self._start(config)
      if default_hooks:
        add_default_hooks(self)
    except BaseException:
      if self._lock is not None:  # a run that did not start leaves its workdir free
        self._lock.release()
      raise

  def _start(self, config):
    """The start-up of the module docstring, in that order. `config`: the RunSpec the train
    command validated, or a ConfigDict (tests, notebooks), validated here, the one time."""
    spec = config if isinstance(config, RunSpec) else config_validation.validate(config)
    self.spec = spec
    # One run per workdir (a second is refused; a dead run's lock is taken over).
    self._lock = workdir_lock.acquire(spec.workdir) if jax.process_index() == 0 else None
    resuming = bool(check_workdir(spec)) and spec.train.resume
    distributed.sync("workdir checked")  # before process 0 writes the first file there
    t = spec.train
    if spec.lora.init_from and not os.path.isfile(
      os.path.join(spec.lora.init_from, "adapter_config.json")
    ):
      raise checkpointing.CheckpointError(
        f"config.lora.init_from: {spec.lora.init_from} is not a PEFT adapter directory (no "
        "adapter_config.json)"
      )
    tokenizer = load_tokenizer(spec.model.path)
    # Three disjoint sets: train, selection (checkpoint choice, keep_best) and the reported test.
    self.splits = run_splits(spec, tokenizer)
    self.train_stream = ExampleStream(self.splits.train, t.seed)
    self.eval_examples, self.selection_examples = self.splits.test, self.splits.selection
    # Rows rule on the real device count, weights split, memory verdict: before the model loads.
    self.plan = memory_plan.check(spec, tokenizer=tokenizer, examples=self.splits.train)
    self.ctx = RunContext.create(spec, tokenizer=tokenizer)
    self.mesh = self.ctx.mesh
    self.workdir = epath.Path(spec.workdir)
    if jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      selection_lib.write_record(self.workdir / "selection.json", self.splits, resuming)
    if spec.objective.kind == "ppo" and spec.lora.dropout > 0:
      logging.info(
        "PPO updates run without LoRA dropout (lora.dropout=%s applies to PG): the "
        "ratio must compare the function the sampler ran",
        spec.lora.dropout,
      )
    self.settings = train_step.StepSettings(
      model=self.ctx.model,
      objective=spec.objective.loss,
      temperature=float(spec.sampling.temperature),
      reward_scorer=spec.objective.reward_scorer,
    )
    self.tx = optimizer.make_optimizer(spec.optim)

    if spec.lora.init_from:
      lora = hf.load_peft_adapter(spec.lora.init_from, self.ctx.model)
    else:
      lora = init_lora(
        self.ctx.model,
        jax.random.PRNGKey(t.seed + 1),
        rank=spec.lora.rank,
        alpha=spec.lora.alpha,
        dropout=spec.lora.dropout,
        targets=spec.lora.targets,
      )
    lora_sh = train_step.tree_shardings(lora, self.mesh)
    lora = jax.device_put(lora, lora_sh)
    # The KL/baseline reference: LoRA off, or a frozen copy of the starting adapter.
    # A copy: the update donates (deletes) the buffers of the state's adapter.
    self.ref_lora = (
      jax.tree.map(jnp.copy, lora) if spec.lora.reference == "initial_adapter" else None
    )
    # NOVER: the reference is instead the state's EMA-lagged adapter copy (`reference`).
    method = obj.method_of(spec.objective.loss)
    self.ema_scorer = method is not None and method.scorer == "ema"
    opt_state = self.tx.init(lora)
    opt_sh = train_step.tree_shardings(opt_state, self.mesh)
    self.programs = train_step.Programs(self.settings, self.tx, self.mesh, lora_sh, opt_sh)
    self.state = state_lib.TrainState.create(
      lora, jax.device_put(opt_state, opt_sh), t.seed, ema=self.ema_scorer
    )
    self.last_info = None  # the StepInfo of the latest step
    self.ckpt = checkpointing.Checkpointer(
      self.workdir / "checkpoints", max_to_keep=t.max_to_keep, keep_best=t.keep_best
    )
    self.writer = summary.SummaryWriter(self.workdir)
    if jax.process_index() == 0:  # the run's full config, for reports and analyses
      files.write_atomic(
        self.workdir / "config.json", json.dumps(spec.recorded, indent=1, default=str)
      )
    self.hooks = hooks_lib.Hooks()
    if t.resume and self.ckpt.latest_step() is not None:
      # The newest complete checkpoint; what the lost steps wrote is superseded.
      resume_lib.resume(self.ckpt, self.restore, self.workdir, self.writer)
    elif t.resume:
      logging.info(
        "resume requested but %s has no checkpoints: starting fresh", self.ckpt.directory
      )

  def add_hook(self, fn, every: int = 1, *, name=None, at_start=False, at_end=False):
    """Runs `fn(info: hooks.StepInfo)` after every `every`-th step (see `hooks`)."""
    return self.hooks.add(fn, every, name=name, at_start=at_start, at_end=at_end)

  # ------------------------------------------------------------------ state
  # Views of `state` for callers that read one part; the step writes `state` whole.
  @property
  def lora(self):
    return self.state.lora

  @lora.setter
  def lora(self, value):
    self.state = self.state.replace(lora=value)

  @property
  def step_num(self) -> int:
    return self.state.step

  @step_num.setter
  def step_num(self, value: int):
    self.state = self.state.replace(step=int(value))

  @property
  def opt_state(self):
    return self.state.opt_state

  @property
  def rng(self):
    return self.state.rng

  @property
  def baseline_state(self):
    return self.state.baseline

  def reference(self, state: state_lib.TrainState):
    """The adapter a step from `state` scores its reward with (unless the actor does) and takes
    its KL to: the EMA copy of a method whose scorer is `ema`, else the run's reference (None:
    the base model; lora.reference='initial_adapter': the frozen starting adapter)."""
    return state.ema_lora if self.ema_scorer else self.ref_lora

  def state_json(self) -> dict:
    """The checkpoint's JSON state of the run now (`training.state.checkpoint_json`)."""
    return state_lib.checkpoint_json(self.state, self.train_stream.state(), self.spec.recorded)

  def save(self, score=None, force=True, *, state=None):
    """Checkpoints `state` (the run's current one by default) with the data cursor; a step
    already saved is not saved again. `score`: the step's selection score (keep_best)."""
    state = self.state if state is None else state
    if self.ckpt.latest_step() == state.step:
      return
    # The events up to this step reach the disk before the checkpoint does: a run killed later
    # resumes here and must find them (tensorboardX otherwise holds them for up to 2 minutes).
    self.writer.flush()
    state_lib.save(
      self.ckpt,
      state,
      data=self.train_stream.state(),
      config=self.spec.recorded,
      score=score,
      force=force,
    )
    logging.info("saved checkpoint at step %d", state.step)

  def restore(self, step: int):
    """The run as checkpoint `step` saved it: the state and the data cursor."""
    self.state, saved = state_lib.restore(self.ckpt, step, like=self.state)
    self.train_stream.restore(saved["data"])
    logging.info("restored step %d from %s", self.state.step, self.ckpt.directory)

  def rollback(self, step: int):
    """Back to checkpoint `step`, keeping the data cursor: fresh data rather than a replay."""
    stream = self.train_stream.state()
    self.restore(step)
    self.train_stream.restore(stream)

  # ------------------------------------------------------------------ one step
  def step(self) -> dict:
    """One Markovian step on the stream's next questions: advances `state`, keeps the step's
    `StepInfo` in `last_info`, returns its TensorBoard scalars."""
    examples = self.train_stream.take(self.spec.train.questions_per_step)
    self.state, self.last_info = self.advance(self.state, examples)
    return self.last_info.scalars

  def advance(
    self, state: state_lib.TrainState, examples
  ) -> tuple[state_lib.TrainState, hooks_lib.StepInfo]:
    """The step function: the state after one step (pipeline stages) on `examples` from
    `state`, and the step's outputs as the hooks' StepInfo. The adapter and optimizer buffers of
    `state` (and its EMA copy's, at a sync) are donated to the update: only the returned state
    may be used afterwards."""
    spec, ctx, p = self.spec, self.ctx, self.programs
    step = state.step + 1
    ref = self.reference(state)
    rng, sample_key, update_key = jax.random.split(state.rng, 3)
    timer = pipeline.Timer()
    with timer("sample"):
      faults.at("sample", step)  # tests only (MARKOVIAN_TEST_FAULTS)
      ro = pipeline.rollout(ctx, spec, state.lora, ref, examples, sample_key)
    with timer("score"):
      sc = pipeline.score(ctx, p, state.lora, ref, ro)
      tg, baseline, target_metrics = pipeline.targets(ctx, p, sc, state.baseline)
      if faults.at("loss", step):  # tests only: a non-finite loss at this step
        tg = tg._replace(advantages=tg.advantages * jnp.nan)
    with timer("update"):
      faults.at("update", step, self.workdir)
      lr = optimizer.learning_rate(spec.optim, spec.train.num_steps, state.step)
      batch = pipeline.policy_batch(ctx, ro, sc)
      lora, opt_state, per_update = pipeline.update(
        ctx,
        spec,
        p,
        state.lora,
        state.opt_state,
        batch,
        tg,
        update_key,
        ref,
        lr,
        sc.window,
      )
      per_update = [{k: float(v) for k, v in m.items()} for m in per_update]
      ema = state.ema_lora
      if ema is not None and step % spec.objective.loss.scorer_ema_every == 0:
        # NOVER's sync, counted in steps as its code counts them (a step whose update was
        # skipped still mixes the unchanged policy in).
        ema = p.ema_update(ema, lora)
    if any(m["nonfinite"] for m in per_update):
      baseline = state.baseline  # a skipped update leaves the baseline where it was
    new = state.replace(
      lora=lora, opt_state=opt_state, rng=rng, baseline=baseline, step=step, ema_lora=ema
    )
    scalars = pipeline.scalars(spec, ctx, ro, sc, target_metrics, per_update, timer.times)
    if not per_update:  # expert iteration kept nothing: report the schedule's value
      scalars["train/learning_rate"] = lr
    return new, hooks_lib.StepInfo(
      step, scalars, state=new, rollout=ro, scores=sc, targets=tg, updates=per_update
    )

  # ------------------------------------------------------------------ evaluation, export
  def evaluate(self, state=None) -> dict:
    """`evaluate_state`'s test summary (of the run's current state by default)."""
    return self.evaluate_state(state).summary

  def evaluate_state(self, state=None) -> hooks_lib.Evaluation:
    """Evaluates the adapter of `state` (the run's current one by default) on the selection split
    (scalars `selection/`, rows under eval/selection/; its primary score ranks checkpoints for
    keep_best) and on the reported test split (scalars `eval/`, rows under eval/)."""
    state = self.state if state is None else state
    step = state.step
    selection = self._evaluate_on(
      state,
      self.selection_examples,
      "selection/",
      self.workdir / "eval" / "selection",
      f"selection@{step}",
    )
    score = evaluation.primary_score(selection)
    faults.at("eval", step)  # tests only: between the two evaluations
    test = self._evaluate_on(
      state, self.eval_examples, "eval/", self.workdir / "eval", f"test@{step}"
    )
    return hooks_lib.Evaluation(step, score, test)

  def _evaluate_on(self, state, examples, prefix: str, folder: epath.Path, desc: str) -> dict:
    e = self.spec.eval
    summ, rows = evaluation.evaluate(
      self.ctx,
      state.lora,
      examples,
      num_samples=e.num_samples,
      temperature=e.temperature,
      reader=e.reader,
      answer_max_tokens=e.answer_max_tokens,
      answer_first_line=e.answer_first_line,
      batch_size=e.batch_size,
      seed=e.seed,
      desc=desc,
    )
    self.writer.scalars(state.step, evaluation.scalars(summ), prefix=prefix)
    if jax.process_index() == 0:
      path = folder / f"step_{state.step}.jsonl"
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
    lora = self.state.lora
    params = jax.tree.map(fetch, lora.params)  # every process joins the gather
    if jax.process_index() == 0:
      # The PEFT writer takes a local directory; a gs:// workdir gets a copy through epath.
      with tempfile.TemporaryDirectory() as local:
        hf.save_peft_adapter(
          lora.replace(params=params),
          self.ctx.model,
          local,
          base_model_name_or_path=self.spec.model.path,
        )
        out.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(local):
          (out / name).write_bytes(epath.Path(local, name).read_bytes())
      logging.info("wrote the step-%d adapter (PEFT) to %s", self.state.step, out)
    return out

  # ------------------------------------------------------------------ loop
  def run(self):
    t = self.spec.train
    # SIGTERM/SIGINT on any process: every process stops after the same step and checkpoints.
    stop = distributed.StopOnSignal()
    stop.install()
    try:
      if self.state.step == 0:
        self.evaluate()  # the base-model baseline
      bar = progress.bar(t.num_steps, "train", unit="step", initial=self.state.step)
      while self.state.step < t.num_steps and not stop.requested(self.state.step):
        s = self.step()
        bar.update(1)
        bar.set_postfix(
          reward=f"{s.get('answer/normalized_reward', s['answer/logprob']):.3f}",
          loss=f"{s.get('train/loss', float('nan')):.3f}",
        )
        self.last_info.last = self.last_info.step == t.num_steps
        self.hooks.run(self.last_info)
      bar.close()
      self.save()
      self.export_adapter()
    except OSError as e:
      full = checkpointing.run_disk_full(e, self.workdir, self.state.step, self.ckpt.all_steps())
      if full is None:
        raise
      raise full from e
    finally:
      stop.uninstall()
      self.writer.close()
      if self._lock is not None:
        self._lock.release()
    return self.state.step


# ------------------------------------------------------------------ the default hooks
def add_default_hooks(trainer: Trainer) -> None:
  """Wires the run's default hooks on `trainer`, in this order (a guard that rolls back halts the
  round before the step is evaluated or checkpointed; the checkpoint saves the evaluation's
  score): TensorBoard scalars every step, samples every train.text_every steps (and after the
  first), the non-finite and collapse guards, evaluation every train.eval_every steps (and at
  the end), fragility every eval.fragility_every steps (when set), a checkpoint every
  train.checkpoint_every steps (and at the end). Each hook is given what it needs, not the
  Trainer."""
  spec, t, writer = trainer.spec, trainer.spec.train, trainer.writer
  recovery = dict(save=trainer.save, rollback=trainer.rollback, saved_steps=trainer.ckpt.all_steps)
  trainer.add_hook(functools.partial(write_scalars, writer), name="scalars")
  trainer.add_hook(
    functools.partial(
      write_samples, writer, trainer.workdir, spec.task, spec.sampling.cot_stops_at_eos
    ),
    every=t.text_every,
    name="samples",
    at_start=True,
  )
  trainer.add_hook(
    guards.NonFiniteGuard(
      checkpoint_every=t.checkpoint_every,
      patience=t.nan_patience,
      action=t.nonfinite_action,
      max_rollbacks=t.max_rollbacks,
      **recovery,
    ),
    name="nonfinite_guard",
  )
  trainer.add_hook(
    guards.CollapseGuard(spec, write_scalars=writer.scalars, **recovery), name="collapse_guard"
  )
  trainer.add_hook(
    functools.partial(evaluate_hook, trainer.evaluate_state),
    every=t.eval_every,
    name="eval",
    at_end=True,
  )
  if spec.eval.fragility_every:
    trainer.add_hook(
      functools.partial(fragility_hook, trainer.ctx, spec.eval.batch_size, writer.scalars),
      every=spec.eval.fragility_every,
      name="fragility",
    )
  trainer.add_hook(
    functools.partial(checkpoint_hook, trainer.save),
    every=t.checkpoint_every,
    name="checkpoint",
    at_end=True,
  )


def write_scalars(writer, info: hooks_lib.StepInfo):
  """The step's TensorBoard scalars and its advantages' histogram."""
  writer.scalars(info.step, info.scalars)
  writer.histogram(info.step, "train/advantages", fetch(info.targets.advantages))


def write_samples(writer, workdir, task: str, free_length: bool, info: hooks_lib.StepInfo):
  """The step's CoTs: three as TensorBoard text, all of them in <workdir>/samples.jsonl (one line
  per question: CoTs, rewards r, normalised rewards R, the reference's CoT' and its score b; with
  `free_length` (sampling.cot_stops_at_eos), each CoT's length in tokens, its EOS counted, as
  `cot_lengths`: with the key off every CoT is K tokens)."""
  ro, sc = info.rollout, info.scores
  cots = "\n\n".join(f"**CoT {i}**: {t}" for i, t in enumerate(ro.cot_texts[:3]))
  base = "" if ro.base_texts is None else f"**Baseline CoT'**: {ro.base_texts[0]}\n\n"
  writer.text(
    info.step,
    "samples",
    (
      f"**Question**: {ro.examples[0].question}\n\n{cots}\n\n{base}"
      f"**Answer**: {ro.examples[0].answer}"
    ),
  )
  r = fetch(sc.rewards).astype(float)  # a collective: before process 0 alone
  if jax.process_index() != 0:
    return
  g = ro.group_size
  b = sc.base_scores
  with (epath.Path(workdir) / "samples.jsonl").open("a") as f:
    for q, ex in enumerate(ro.examples):
      rows = slice(q * g, (q + 1) * g)
      f.write(
        json.dumps(
          {
            "step": info.step,
            "task": task,
            "id": ex.id,
            "question": ex.question,
            "answer": ex.answer,
            "cots": ro.cot_texts[rows],
            "rewards": r[rows].tolist(),
            "normalized": None if b is None else (r[rows] - float(b[q])).tolist(),
            "base_cot": None if ro.base_texts is None else ro.base_texts[q],
            "base_score": None if b is None else float(b[q]),
            **({"cot_lengths": ro.cot_lengths[rows].tolist()} if free_length else {}),
          }
        )
        + "\n"
      )


def evaluate_hook(evaluate_state, info: hooks_lib.StepInfo):
  """Evaluates the step's state; the result rides in `info.eval` to the checkpoint hook."""
  info.eval = evaluate_state(info.state)


def fragility_hook(ctx, batch_size: int, write_scalars_fn, info: hooks_lib.StepInfo):
  """fragility/<kind>/p<percent>: the mean drop in the answer log-prob (under the step's policy)
  when the step's CoTs are perturbed; a CoT the answer really depends on drops more."""
  from markovian_jax.analysis import fragility

  ro = info.rollout
  res = fragility.fragility_scores(
    ctx,
    info.state.lora,
    ro.row_examples,
    ro.cot_texts,
    severities=(0, 40, 100),
    seed=info.step,
    batch_size=batch_size,
    progress=False,
  )
  write_scalars_fn(
    info.step,
    {f"fragility/{k}/p{p}": float(res.effect(k, p).mean()) for k in res.kinds for p in (40, 100)},
  )


def checkpoint_hook(save, info: hooks_lib.StepInfo):
  """Saves the step's state, with the selection score when it was evaluated this round."""
  score = info.eval.score if info.eval is not None and info.eval.step == info.step else None
  save(score=score, state=info.state)
