"""The training step's stages on a tiny model: what each stage hands the next, checked against
hand-computed values and the prompt templates' own text."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests.helpers import lora_leaves, make_config


@pytest.fixture(scope="module")
def ppo_trainer(tiny_model_dir, tmp_path_factory):
  """PPO, 2 epochs x 2 minibatches, LoRA dropout 0.1, a warmup-cosine schedule over 4 steps."""
  from markovian_jax.trainer import Trainer

  c = make_config(
    tiny_model_dir,
    tmp_path_factory.mktemp("ppo"),
    **{
      "objective.kind": "ppo",
      "objective.ppo_epochs": 2,
      "objective.ppo_minibatches": 2,
      "lora.dropout": 0.1,
      "optim.schedule": "warmup_cosine",
      "optim.warmup_steps": 1,
      "optim.lr": 1e-3,
      "train.num_steps": 4,
      "train.eval_every": 100,
    },
  )
  return Trainer(c)


@pytest.mark.slow
def test_ppo_first_pass_is_on_policy_and_the_schedule_counts_training_steps(ppo_trainer):
  """The first PPO minibatch sees rho = 1 (no LoRA dropout in PPO's passes), and every update of
  training step s uses the schedule's value at s: warmup to 1e-3 at step 1, then a cosine over
  the remaining 3 steps (hand-computed: 1e-3 * (1 + cos(pi * k / 3)) / 2)."""
  want = [0.0, 1e-3, 0.75e-3]
  for step in range(3):
    s = ppo_trainer.step()
    updates = ppo_trainer.last_info.updates
    assert len(updates) == 4 and s["train/updates"] == 4
    assert abs(s["train/learning_rate"] - want[step]) < 1e-9
    assert all(abs(u["learning_rate"] - want[step]) < 1e-9 for u in updates)
    first = updates[0]
    assert first["behaviour_logprob_diff_max"] < 1e-4, first
    assert abs(first["ppo_ratio_max"] - 1.0) < 1e-4 and first["ppo_clip_fraction"] == 0.0
  # Once the policy has moved (lr > 0), later minibatches are off-policy.
  assert (
    max(u["behaviour_logprob_diff_max"] for u in updates[1:])
    > 10 * first["behaviour_logprob_diff_max"]
  )


@pytest.fixture(scope="module")
def ei_trainer(tiny_model_dir, tmp_path_factory):
  """Expert iteration whose threshold is still +inf (warm-up not over), unnormalised reward."""
  from markovian_jax.trainer import Trainer

  c = make_config(
    tiny_model_dir,
    tmp_path_factory.mktemp("ei"),
    **{
      "objective.ei_std": 0.0,
      "objective.ei_skip_initial": 1000,
      "objective.normalize_reward": False,
      "train.eval_every": 100,
    },
  )
  return Trainer(c)


@pytest.mark.slow
def test_no_kept_sample_means_no_optimizer_step_and_no_baseline_cot(ei_trainer):
  from markovian_jax.training import optimizer

  before = lora_leaves(ei_trainer)
  count = [np.asarray(x) for x in jax.tree.leaves(ei_trainer.opt_state) if np.ndim(x) == 0]
  s = ei_trainer.step()
  assert s["train/updates"] == 0 and s["train/active_fraction"] == 0.0
  for a, b in zip(before, lora_leaves(ei_trainer)):
    np.testing.assert_array_equal(a, b)
  after = [np.asarray(x) for x in jax.tree.leaves(ei_trainer.opt_state) if np.ndim(x) == 0]
  for a, b in zip(count, after):  # AdamW's step count (and so its moments) did not move
    np.testing.assert_array_equal(a, b)
  assert s["train/learning_rate"] == optimizer.learning_rate(ei_trainer.spec.optim, 4, 0)
  # Without normalisation no CoT' is sampled or scored, and nothing about one is logged.
  assert ei_trainer.last_info.rollout.base_tokens is None
  assert not [t for t in s if "baseline" in t or "normalized" in t]


@pytest.fixture(scope="module")
def pg_trainer(tiny_model_dir, tmp_path_factory):
  from markovian_jax.trainer import Trainer

  return Trainer(
    make_config(
      tiny_model_dir,
      tmp_path_factory.mktemp("pg"),
      **{"train.eval_every": 100, "lora.dropout": 0.0},
    )
  )


def test_updates_on_a_fixed_batch_lower_the_loss_and_follow_the_advantages(pg_trainer):
  """Behaviour, not tags: five updates on one batch lower its loss, and each sample's CoT
  log-prob moves in the direction of its advantage (up for the best, down for the worst)."""
  from markovian_jax.training import pipeline, train_step

  t = pg_trainer
  ex = t.train_stream.take(1)
  ro = pipeline.rollout(t.ctx, t.spec, t.lora, None, ex, jax.random.PRNGKey(3))
  sc = pipeline.score(t.ctx, t.programs, t.lora, None, ro)
  tg, _, _ = pipeline.targets(t.ctx, t.programs, sc, t.baseline_state)
  batch = pipeline.policy_batch(t.ctx, ro, sc)
  s = t.settings

  @jax.jit
  def terms(lora):
    loss, _, _ = train_step.loss_and_grads(s, t.ctx.params, lora, batch, tg)
    lp = train_step.loss_inputs(s, t.ctx.params, lora, batch, None).cot_logprobs
    return loss, jnp.mean(lp, axis=1)

  loss0, lp0 = terms(t.lora)
  lora, opt = jax.tree.map(jnp.copy, t.lora), jax.tree.map(jnp.copy, t.opt_state)
  for _ in range(5):
    lora, opt, m = t.programs.update(
      t.ctx.params, lora, opt, batch, tg, None, None, np.float32(1e-3), answer_last_n=sc.window
    )
    assert m["nonfinite"] == 0
  loss1, lp1 = terms(lora)
  adv, moved = np.asarray(tg.advantages), np.asarray(lp1 - lp0)
  assert float(loss1) < float(loss0)
  assert np.corrcoef(adv, moved)[0, 1] > 0.5, (adv, moved)
  assert moved[np.argmax(adv)] > 0 > moved[np.argmin(adv)]


def _scorer_rows(ctx, ro):
  """The token rows `pipeline.score` hands the jitted scorer, decoded, with their answer spans."""
  from markovian_jax.training import pipeline, train_step

  seen = []
  settings = train_step.StepSettings(
    model=ctx.model, objective=ctx.spec.objective.loss, temperature=1.0
  )
  real = jax.jit(functools.partial(train_step.score, settings), static_argnames=("last_n",))

  def spy(params, lora, ref, *rows, last_n=None):
    seen.append([None if r is None else np.asarray(r) for r in rows])
    return real(params, lora, ref, *rows, last_n=last_n)

  pipeline.score(ctx, types.SimpleNamespace(score=spy), None, None, ro)
  ((tokens, mask, span, btokens, bmask, bspan),) = seen
  decode = lambda t, m: ctx.tokenizer.decode(t[m], skip_special_tokens=True)  # noqa: E731
  rows = [(decode(t, m), decode(t, s)) for t, m, s in zip(tokens, mask, span)]
  base = [(decode(t, m), decode(t, s)) for t, m, s in zip(btokens, bmask, bspan)]
  return rows, base


def _rollout_of_texts(examples, cots, base_cots, group):
  from markovian_jax.training.pipeline import Rollout

  n = len(examples) * group
  z = np.zeros((n, 4), np.int32)
  return Rollout(
    examples=examples,
    prompt_tokens=z[: len(examples)],
    prompt_mask=z[: len(examples)],
    cot_tokens=z,
    cot_mask=z.astype(bool),
    behaviour_logprobs=z.astype(np.float32),
    cot_texts=cots,
    base_tokens=z[: len(examples)],
    base_texts=base_cots,
  )


@pytest.mark.parametrize("task", ["arithmetic", "arc"])
@pytest.mark.parametrize("markovian", [True, False])
def test_scorer_sees_the_redacted_question_the_cot_and_the_gold_answer(
  tiny_model_dir, tmp_path, task, markovian
):
  """Decodes the exact rows the scorer receives: the CoT prompt's frame with the question replaced
  by <Redacted> (the question itself when prompt.markovian=False), this row's CoT, and a span
  that is the gold answer; the reference's CoT' rows likewise, one per question."""
  from markovian_jax.training import config_validation
  from markovian_jax.training.run_context import RunContext, read_examples

  c = make_config(
    tiny_model_dir, tmp_path, **{"task": task, "prompt.markovian": markovian, "train.group_size": 2}
  )
  if task == "arc":
    c.data.path = str(helpers.shared_data_dir())
    c.sampling.cot_length = 8
  spec = config_validation.validate(c)
  ctx = RunContext.create(spec)
  examples = read_examples(spec, "test", ctx.tokenizer, 2)
  cots = [f" step {i}: think about it" for i in range(4)]
  rows, base = _scorer_rows(ctx, _rollout_of_texts(examples, cots, [" base one", " base two"], 2))
  for i, (text, span) in enumerate(rows):
    ex = examples[i // 2]
    stem = ex.question.split("\n")[0][:40]
    assert ("<Redacted>" in text) == markovian and (stem in text) != markovian, text
    assert f"Reasoning:{cots[i]} Answer: " in text
    assert span.strip() == ex.answer and text.endswith(ex.answer)
  for q, (text, span) in enumerate(base):
    assert f"Reasoning:{[' base one', ' base two'][q]} Answer: " in text
    assert span.strip() == examples[q].answer


@pytest.mark.slow
def test_fragility_hook_logs_the_answer_drop_per_perturbation(pg_trainer):
  """The eval.fragility_every hook: one scalar per perturbation kind and severity; deleting the
  whole CoT and truncating all of it from either end leave the same empty CoT, so they agree."""
  from markovian_jax.trainer import fragility_hook

  t = pg_trainer
  t.step()
  logged = {}
  fragility_hook(
    t.ctx, t.spec.eval.batch_size, lambda step, values: logged.update(values), t.last_info
  )
  sc = {k: v for k, v in logged.items() if k.startswith("fragility/")}
  assert len(sc) == 10 and all(np.isfinite(v) for v in sc.values())
  whole = [sc[f"fragility/{k}/p100"] for k in ("delete", "truncate_front", "truncate_back")]
  np.testing.assert_allclose(whole, whole[0], atol=1e-6)
