"""The training loop end to end on a tiny model: logging, checkpoints, exact resume, sharding."""

import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests.helpers import lora_leaves, make_config, run_module

TB_TAGS = [
  "answer/normalized_reward",
  "answer/logprob",
  "answer/baseline_logprob",
  "answer/cot_contains_answer",
  "train/loss",
  "train/pg_loss",
  "train/grad_norm",
  "train/learning_rate",
  "train/advantage_mean",
  "train/advantage_std",
  "train/advantage_min",
  "train/advantage_max",
  "train/updates",
  "policy/kl",
  "policy/entropy",
  "policy/cot_logprob",
  "policy/repetition_rate",
  "policy/behaviour_logprob_diff_mean",
  "guard/nonfinite_update",
  "guard/collapse_alarm",
  "perf/sample_s",
  "perf/score_s",
  "perf/update_s",
  "perf/tokens_per_s",
  "eval/anchor/accuracy",
  "eval/simple/accuracy",
  "selection/anchor/accuracy",
  "selection/simple/accuracy",
]
# Constant under the default config, or the same quantity under another name: never logged.
NOT_LOGGED = [
  "train/active_fraction",
  "reward/raw",
  "reward_mean",
  "answer_logprob/actor",
  "policy/ppo_ratio_mean",
  "train/ema_baseline",
  "policy/cot_length",
]


@pytest.mark.slow
def test_demo_like_run_logs_checkpoints_and_evaluates(tiny_model_dir, tmp_path):
  from markovian_jax.runtime import summary
  from markovian_jax.trainer import Trainer

  c = make_config(tiny_model_dir, tmp_path / "run")
  trainer = Trainer(c)
  assert trainer.run() == 4
  scalars = summary.read_scalars(str(tmp_path / "run"))
  missing = [t for t in TB_TAGS if t not in scalars]
  assert not missing, f"missing TensorBoard tags {missing}"
  assert not [t for t in NOT_LOGGED if t in scalars]
  assert all("/" in t for t in scalars), "every tag belongs to a section"
  assert [s for s, _ in scalars["eval/anchor/accuracy"]] == [0, 2, 4]
  assert all(np.isfinite(v) for _, v in scalars["train/loss"])
  steps = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert steps[-1] == 4 and 2 in steps
  # The LoRA moved away from zero-B (the update is applied).
  b = np.asarray(trainer.lora.params["layers"]["attn"]["q"]["b"])
  assert np.abs(b).max() > 0
  # Checkpoints are ranked by the selection split, which is disjoint from the reported test set.
  run = tmp_path / "run"
  sel = {e.id for e in trainer.selection_examples}
  assert sel and not sel & {e.id for e in trainer.eval_examples}
  assert (run / "eval" / "selection" / "step_2.jsonl").is_file()
  from markovian_jax.training import export

  step, reason = export.best_step(str(run / "checkpoints"))
  by_selection = dict(scalars["selection/anchor/accuracy"])
  assert "validation" in reason and by_selection[step] == max(by_selection[s] for s in (2, 4))
  # The final adapter is written in PEFT form, and `sample --lora` reads it.
  from markovian_jax import sample

  rows = sample.sample_texts(
    tiny_model_dir, ["1 + 2 ="], lora_dir=str(run / "adapter"), max_new_tokens=3, temperature=0.0
  )
  direct = sample.sample_texts(tiny_model_dir, ["1 + 2 ="], max_new_tokens=3, temperature=0.0)
  assert len(rows[0]["tokens"]) == 3 and rows[0]["logprob"] != direct[0]["logprob"]
  # evaluate --all_steps: one row per step, selection and test accuracy side by side.
  args = [
    "--config=configs/demo.py",
    f"--config.model.path={tiny_model_dir}",
    "--config.host_allocator=system",
    "--config.compilation_cache_dir=",
    "--config.sampling.cot_length=8",
    "--config.eval.num_examples=4",
    "--config.eval.final_num_examples=4",
    "--config.eval.batch_size=4",
    "--config.eval.answer_max_tokens=4",
    f"--checkpoint_dir={run / 'checkpoints'}",
    f"--output_dir={tmp_path / 'ev'}",
  ]
  done = run_module("markovian_jax.evaluate", *args, "--all_steps")
  assert done.returncode == 0, done.stderr[-3000:]
  table = (tmp_path / "ev" / "steps.md").read_text()
  assert "anchor selection" in table and "step_2" in table and "step_4" in table
  assert f"step_{step} (best selection)" in table
  best = run_module(
    "markovian_jax.evaluate", *args[:-1], f"--output_dir={tmp_path / 'best'}", "--best"
  )
  assert best.returncode == 0 and (tmp_path / "best" / f"step_{step}.jsonl").is_file()


def test_resume_is_exact(tiny_model_dir, tmp_path):
  from markovian_jax.trainer import Trainer

  straight = Trainer(make_config(tiny_model_dir, tmp_path / "a", **{"train.eval_every": 100}))
  seen = []  # after the default hooks: what a hook is handed
  straight.add_hook(
    lambda info: seen.append(
      (
        info.step,
        info.state.step,
        info.eval,
        len(info.updates),
        info.targets is not None,
        len(info.rollout.cot_texts),
      )
    ),
    name="spy",
  )
  straight.run()
  # Each step's own state and outputs; the evaluation hook's result rides to the later hooks
  # only in the round it ran (train.eval_every=100: at the end).
  assert [x[:2] for x in seen] == [(s, s) for s in (1, 2, 3, 4)]
  assert all(x[3] == 1 and x[4] and x[5] == 4 for x in seen)  # PG: one update; Q * G = 1 * 4
  assert [x[2] is None for x in seen] == [True, True, True, False] and seen[-1][2].step == 4
  first = Trainer(
    make_config(tiny_model_dir, tmp_path / "b", **{"train.eval_every": 100, "train.num_steps": 2})
  )
  first.run()
  resumed = Trainer(
    make_config(tiny_model_dir, tmp_path / "b", **{"train.eval_every": 100, "train.resume": True})
  )
  assert resumed.step_num == 2
  resumed.run()
  assert resumed.train_stream.state() == straight.train_stream.state()
  np.testing.assert_array_equal(
    np.asarray(jax.random.key_data(resumed.rng)), np.asarray(jax.random.key_data(straight.rng))
  )
  # The same programs on the same inputs (measured: bit-identical); 16 float32 ulps of each
  # leaf's largest entry, as Adam's step of an entry near 0 has the size of the others'.
  for a, b in zip(lora_leaves(resumed), lora_leaves(straight)):
    np.testing.assert_allclose(a, b, rtol=0, atol=helpers.ulps(16, of=b))


def test_train_state_checkpoints_as_one_pytree_in_the_readers_layout(tmp_path):
  """A TrainState saved and restored comes back leaf for leaf, bit for bit, with its step, key
  and baseline; on disk it keeps the layout the readers use (orbax items lora / opt_state /
  state; the JSON keys step, data, rng, baseline, config, lora {rank, alpha, dropout}), read
  here by orbax's own handler (benchmarks/faults.py's `arrays`) and json, not by our restore. A
  checkpoint written item by item through the Checkpointer, as runs before the TrainState wrote
  them, restores alike."""
  import json

  from benchmarks import faults
  from markovian_jax import objectives as obj
  from markovian_jax.models import LoraAdapter
  from markovian_jax.runtime import checkpointing
  from markovian_jax.training import config_validation, optimizer
  from markovian_jax.training import state as state_lib

  c = importlib.import_module("configs.demo").get_config()
  tx = optimizer.make_optimizer(config_validation.validate(c).optim)
  rng = np.random.default_rng(0)

  def adapter():  # two layers, one target; jitted optimizer calls: one compilation each
    ab = {
      k: jnp.asarray(rng.normal(size=shape), jnp.float32)
      for k, shape in (("a", (2, 8, 4)), ("b", (2, 4, 8)))
    }
    return LoraAdapter({"layers": {"attn": {"q": ab}}}, rank=4, alpha=8.0, dropout=0.1)

  init = jax.jit(tx.init)
  lora = adapter()
  updates, opt = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, lora), init(lora), lora)
  baseline = {
    "ema_value": -1.25,
    "ema_weight": 0.75,
    "ei_count": 6,
    "ei_mean": -2.5,
    "ei_m2": 3.0,
    "ei_batches": 2,
  }
  state = state_lib.TrainState(
    lora=jax.tree.map(lambda p, u: p + u, lora, updates),
    opt_state=opt,
    rng=jnp.asarray([7, 11], jnp.uint32),
    baseline=obj.BaselineState.from_json(baseline),
    step=7,
  )
  fresh = adapter()
  like = state_lib.TrainState.create(fresh, init(fresh), seed=0)
  ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", keep_best=False)
  state_lib.save(ckpt, state, data={"epoch": 1, "index": 3}, config={"task": "x"})

  root = tmp_path / "checkpoints" / "7"
  assert {"lora", "opt_state", "state"} <= set(os.listdir(root))
  saved = json.loads((root / "state" / "metadata").read_text())
  assert list(saved) == ["step", "data", "rng", "baseline", "config", "lora"]
  assert saved["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.1} and saved["step"] == 7
  assert saved["rng"] == np.asarray(state.rng).tolist()
  assert {k: saved["baseline"][k] for k in baseline} == baseline
  on_disk = faults.arrays(tmp_path, 7)
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.lora.params):
    np.testing.assert_array_equal(on_disk["lora" + jax.tree_util.keystr(path)], leaf)

  def same(restored, data):
    assert data["data"] == {"epoch": 1, "index": 3} and restored.step == 7
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
      assert np.asarray(a).dtype == np.asarray(b).dtype
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()

  same(*state_lib.restore(ckpt, 7, like=like))
  # The item-by-item form of the runs before the TrainState, with the same JSON dict.
  ckpt.save(8, state.lora.params, state.opt_state, dict(saved, step=8))
  restored, data = state_lib.restore(ckpt, 8, like=like)
  same(restored.replace(step=7), data)
  assert restored.step == 8


def _step_terms(trainer):
  """One step's batch and targets (rollout -> score -> targets), the loss and LoRA gradient on
  it before any optimizer step, and the LoRA after one update on it (jitted on the trainer's
  mesh)."""
  import functools

  from markovian_jax.training import pipeline, train_step

  ex = trainer.train_stream.take(trainer.spec.train.questions_per_step)
  ro = pipeline.rollout(trainer.ctx, trainer.spec, trainer.lora, None, ex, jax.random.PRNGKey(7))
  sc = pipeline.score(trainer.ctx, trainer.programs, trainer.lora, None, ro)
  tg, _, _ = pipeline.targets(trainer.ctx, trainer.programs, sc, trainer.baseline_state)
  batch = pipeline.policy_batch(trainer.ctx, ro, sc)
  fn = jax.jit(functools.partial(train_step.loss_and_grads, trainer.settings))
  loss, _, grads = fn(trainer.ctx.params, trainer.lora, batch, tg)
  grads = [np.asarray(g) for g in jax.tree.leaves(grads.params)]
  new, _, _ = trainer.programs.update(
    trainer.ctx.params,
    jax.tree.map(jnp.copy, trainer.lora),
    jax.tree.map(jnp.copy, trainer.opt_state),
    batch,
    tg,
    None,
    None,
    np.float32(3e-4),
    answer_last_n=sc.window,
  )
  return ro, float(loss), grads, [np.asarray(x) for x in jax.tree.leaves(new.params)]


def test_sharded_step_matches_single_device(tiny_model_dir, tmp_path):
  """What sharding can change is the reduction order: the loss and the LoRA gradient before the
  optimizer agree to a tolerance set by their scale. Adam turns a near-zero gradient into a step
  of about +-lr whose sign is that rounding noise, so the updated LoRA is compared only where the
  gradient is well above it."""
  from markovian_jax.trainer import Trainer

  one = Trainer(make_config(tiny_model_dir, tmp_path / "one", **{"mesh.shape": (1, 1, 1)}))
  eight = Trainer(make_config(tiny_model_dir, tmp_path / "eight", **{"mesh.shape": (2, 2, 2)}))
  ro1, loss1, g1, new1 = _step_terms(one)
  ro8, loss8, g8, new8 = _step_terms(eight)
  np.testing.assert_array_equal(ro1.cot_tokens, ro8.cot_tokens)  # same samples (same key)
  assert abs(loss1 - loss8) <= 1e-5 * max(1.0, abs(loss1))
  scale = max(np.abs(g).max() for g in g1)
  for a, b in zip(g1, g8):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)
  compared = 0
  for a, b, g in zip(new1, new8, g1):  # (LoRA A has zero gradient while B starts at zero)
    well = np.abs(g) > 1e-3 * scale
    compared += well.sum()
    np.testing.assert_allclose(a[well], b[well], rtol=1e-4, atol=1e-6)
  assert compared > 100
  # The whole step (the trainers' streams are at the same place) logs the same loss.
  s1, s8 = one.step(), eight.step()
  assert abs(s1["train/loss"] - s8["train/loss"]) <= 1e-5 * max(1.0, abs(s1["train/loss"]))


def test_invalid_config_fails_before_loading(tmp_path):
  from markovian_jax.trainer import Trainer
  from markovian_jax.training.config_validation import InvalidConfig

  c = make_config("/nonexistent/model", tmp_path, **{"train.group_size": 1})
  with pytest.raises(InvalidConfig, match="group_size"):
    Trainer(c)


@pytest.mark.slow
def test_non_finite_updates_are_skipped_then_stop(tiny_model_dir, tmp_path):
  from markovian_jax.trainer import Trainer, TrainingStopped

  # An update of 1e30 per element overflows the update norm: every update is non-finite.
  c = make_config(
    tiny_model_dir,
    tmp_path / "nan",
    **{"optim.lr": 1e30, "train.nan_patience": 2, "train.eval_every": 100},
  )
  trainer = Trainer(c)
  with pytest.raises(TrainingStopped, match="2 consecutive non-finite updates"):
    trainer.run()
  assert all(np.isfinite(x).all() for x in lora_leaves(trainer))
  assert trainer.ckpt.latest_step() == 2  # the last good state is saved


@pytest.mark.slow
def test_a_full_disk_outside_a_checkpoint_is_one_line_and_keeps_the_checkpoints(
  tiny_model_dir, tmp_path
):
  """A full disk met while a step writes anything but a checkpoint (samples, evaluation rows,
  TensorBoard; here an ENOSPC injected in step 2's update) ends the run with DiskFull, a
  UserError (the CLI's one `error:` line, exit 2) naming the workdir and the checkpoints that
  stay intact, not a raw OSError."""
  from benchmarks.faults import injected
  from markovian_jax.runtime.checkpointing import DiskFull
  from markovian_jax.runtime.errors import UserError
  from markovian_jax.trainer import Trainer

  workdir = tmp_path / "full"
  trainer = Trainer(
    make_config(
      tiny_model_dir,
      workdir,
      **{"train.num_steps": 3, "train.checkpoint_every": 1, "train.eval_every": 100},
    )
  )
  with injected("enospc@update:2"), pytest.raises(DiskFull) as err:
    trainer.run()
  assert isinstance(err.value, UserError) and isinstance(err.value.__cause__, OSError)
  msg = str(err.value)
  assert str(workdir) in msg and "after step 1" in msg and "intact: [1]" in msg, msg
  assert "\n" not in msg
  assert trainer.ckpt.all_steps() == [1]


@pytest.mark.slow
def test_collapse_rollback_then_stop(tiny_model_dir, tmp_path):
  from markovian_jax.trainer import Trainer, TrainingStopped

  # KL >= 0 > -1 always alarms: the run rolls back to its step-1 checkpoint each time, then stops.
  c = make_config(
    tiny_model_dir,
    tmp_path / "collapse",
    **{
      "train.collapse_action": "rollback",
      "train.collapse_kl": -1.0,
      "train.max_rollbacks": 2,
      "train.checkpoint_every": 1,
      "train.eval_every": 100,
      "train.num_steps": 10,
    },
  )
  trainer = Trainer(c)
  with pytest.raises(TrainingStopped, match="still collapsing after 2 rollbacks to step 1"):
    trainer.run()
  assert trainer.step_num == 2 and trainer.ckpt.all_steps() == [1]


@pytest.mark.slow
def test_ppo_minibatches_and_initial_adapter_reference(tiny_model_dir, tmp_path):
  """PPO with 2 epochs x 2 minibatches (rows of one question split across minibatches, each
  row then carrying its own prompt) against a frozen initial adapter: the minibatch rows give
  the policy terms of the shared-prompt batch, and two steps run with the reference intact."""
  import jax.numpy as jnp

  from markovian_jax.models import hf, init_lora, load_checkpoint
  from markovian_jax.trainer import Trainer
  from markovian_jax.training import train_step
  from markovian_jax.training.pipeline import minibatch_rows
  from markovian_jax.training.pipeline import select_rows as _rows

  config, _ = load_checkpoint(tiny_model_dir, dtype="float32")
  adapter = init_lora(config, jax.random.PRNGKey(5), rank=4, alpha=8.0)
  adapter = adapter.replace(params=jax.tree.map(lambda x: x + 0.01, adapter.params))
  hf.save_peft_adapter(adapter, config, str(tmp_path / "adapter"))
  c = make_config(
    tiny_model_dir,
    tmp_path / "run",
    **{
      "objective.kind": "ppo",
      "objective.ppo_epochs": 2,
      "objective.ppo_minibatches": 2,
      "objective.kl_estimator": "k3",
      "lora.init_from": str(tmp_path / "adapter"),
      "lora.rank": 4,
      "lora.alpha": 8.0,
      "lora.reference": "initial_adapter",
      "train.eval_every": 100,
      "train.num_steps": 2,
    },
  )
  trainer = Trainer(c)

  q, g, k = 2, 4, 3
  rng = np.random.default_rng(0)
  pmask = np.ones((q, 6), bool)
  pmask[1, :2] = False
  batch = train_step.PolicyBatch(
    prompt_tokens=jnp.asarray(rng.integers(3, 100, (q, 6)), jnp.int32),
    prompt_mask=jnp.asarray(pmask),
    cot_tokens=jnp.asarray(rng.integers(3, 100, (q * g, k)), jnp.int32),
    cot_mask=jnp.ones((q * g, k), bool),
    behaviour_logprobs=jnp.zeros((q * g, k)),
    answer_tokens=jnp.zeros((q * g, 4), jnp.int32),
    answer_mask=jnp.ones((q * g, 4), bool),
    answer_span=jnp.ones((q * g, 4), bool),
    answer_logprobs=jnp.zeros((q * g, 4)),
    baseline_scores=jnp.zeros((q * g,)),
  )
  part = np.array([6, 1, 3, 4])
  # Jitted once per batch shape: op-by-op, the model's forward compiles every primitive anew.
  loss_inputs = jax.jit(functools.partial(train_step.loss_inputs, trainer.settings))
  whole = loss_inputs(trainer.ctx.params, trainer.lora, batch, None, trainer.ref_lora)
  split = loss_inputs(
    trainer.ctx.params, trainer.lora, _rows(batch, part, g), None, trainer.ref_lora
  )
  # Log-probs (~ -6 here) of two float32 programs (other batch shapes): 16 ulps of the values.
  np.testing.assert_allclose(
    split.cot_logprobs, np.asarray(whole.cot_logprobs)[part], rtol=helpers.ulps(16)
  )
  np.testing.assert_allclose(
    split.ref_logprobs, np.asarray(whole.ref_logprobs)[part], rtol=helpers.ulps(16)
  )
  # Stratified minibatches (M divides G) keep one prompt per question and give the same terms.
  parts, stratified = minibatch_rows(jax.random.PRNGKey(3), q, g, 2)
  assert stratified
  assert sorted(np.concatenate(parts).tolist()) == list(range(q * g))
  for part in parts:
    assert [i // g for i in part] == [0, 0, 1, 1]  # G / M rows of each question, question-major
    mb = _rows(batch, part, g, stratified=True)
    assert mb.prompt_tokens.shape == (q, 6)
    split = loss_inputs(trainer.ctx.params, trainer.lora, mb, None, trainer.ref_lora)
    np.testing.assert_allclose(
      split.cot_logprobs, np.asarray(whole.cot_logprobs)[part], rtol=helpers.ulps(16)
    )
    np.testing.assert_allclose(
      split.ref_logprobs, np.asarray(whole.ref_logprobs)[part], rtol=helpers.ulps(16)
    )
  other, _ = minibatch_rows(jax.random.PRNGKey(4), q, g, 2)
  assert [p.tolist() for p in parts] != [p.tolist() for p in other]
  # M does not divide G: a shuffle across questions, still a partition.
  parts, stratified = minibatch_rows(jax.random.PRNGKey(3), q, g, 8)
  assert not stratified
  assert sorted(np.concatenate(parts).tolist()) == list(range(q * g)) and len(parts) == 8
  # The reference is the starting adapter, not the base: the policy starts at KL 0 from it.
  np.testing.assert_allclose(whole.ref_logprobs, whole.cot_logprobs, rtol=helpers.ulps(16))

  initial = [np.asarray(x) for x in jax.tree.leaves(trainer.ref_lora.params)]
  assert trainer.run() == 2
  for a, b in zip(initial, jax.tree.leaves(trainer.ref_lora.params)):
    np.testing.assert_array_equal(a, np.asarray(b))  # still alive after donating updates
  assert any(not np.allclose(a, b) for a, b in zip(initial, lora_leaves(trainer)))


def test_scoring_projects_only_the_answer_window(tiny_config):
  """`answer_window` covers every row's answer span, and scoring with it equals scoring with the
  projection over every position."""
  from markovian_jax.models import init_lora, init_params
  from markovian_jax.training import config_validation, train_step

  c = importlib.import_module("configs.demo").get_config()
  c.objective.reward_grad = "paper"
  s = train_step.StepSettings(
    model=tiny_config, objective=config_validation.validate(c).objective.loss, temperature=1.0
  )
  params = init_params(tiny_config, jax.random.PRNGKey(0))
  lora = init_lora(tiny_config, jax.random.PRNGKey(1), rank=4)
  lora = lora.replace(params=jax.tree.map(lambda x: x + 0.05, lora.params))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 100, (3, 24)), jnp.int32)
  mask = np.ones((3, 24), bool)
  mask[2, :5] = False
  span = np.zeros((3, 24), bool)
  span[0, -3:] = span[1, -9:-1] = span[2, -1:] = True  # row 1: 9 trailing tokens hold its span
  assert train_step.answer_window(span) == 16
  assert train_step.answer_window(span[:1], span[2:]) == 8
  args = (
    tokens,
    jnp.asarray(mask),
    jnp.asarray(span),
    tokens[:2],
    jnp.asarray(mask[:2]),
    jnp.asarray(span[:2]),
  )
  # Jitted (last_n static), as the step runs them: op-by-op, every primitive compiles anew.
  score = jax.jit(functools.partial(train_step.score, s), static_argnames=("last_n",))
  loss_inputs = jax.jit(
    functools.partial(train_step.loss_inputs, s), static_argnames=("answer_last_n",)
  )
  full = score(params, lora, None, *args)
  window = score(params, lora, None, *args, last_n=train_step.answer_window(span))
  for a, b in zip(full, window):  # log-probs and their means: 16 float32 ulps of the values
    np.testing.assert_allclose(a, b, rtol=helpers.ulps(16))
  assert np.count_nonzero(np.asarray(full[0])) == span.sum()
  # reward_grad='paper' re-scores the rows with gradient through the same window.
  batch = train_step.PolicyBatch(
    prompt_tokens=tokens[:3, :4],
    prompt_mask=jnp.ones((3, 4), bool),
    cot_tokens=tokens[:, :3],
    cot_mask=jnp.ones((3, 3), bool),
    behaviour_logprobs=jnp.zeros((3, 3)),
    answer_tokens=tokens,
    answer_mask=jnp.asarray(mask),
    answer_span=jnp.asarray(span),
    answer_logprobs=full[0],
    baseline_scores=jnp.zeros((3,)),
  )
  whole = loss_inputs(params, lora, batch, None)
  windowed = loss_inputs(params, lora, batch, None, answer_last_n=train_step.answer_window(span))
  np.testing.assert_allclose(whole.answer_logprobs, windowed.answer_logprobs, rtol=helpers.ulps(16))
