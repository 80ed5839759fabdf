"""The answer-likelihood methods as config variants (`--config=configs/gsm8k.py:<method>` and
`:<method>_markovian`): the config check, and one training step of the methods on the tiny
model, whose targets must be the float64 reference's (tests/torch_answer_likelihood.py) of the
log-probs the step scored. NOVER's step scores with its EMA adapter copy, set apart from the
policy here so that the check tells the two apart, and takes its KL to that copy."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from markovian_jax import objectives as obj
from markovian_jax.configs import base
from markovian_jax.objectives import methods as M
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.training import config_validation
from tests import helpers
from tests.helpers import make_config


def test_every_method_and_twin_is_a_variant_with_its_scorer_and_context():
  assert set(M.METHOD_NAMES) <= set(base.VARIANTS)
  assert set(base.ANSWER_LIKELIHOOD_SCORERS) == set(M.METHODS)
  for method, spec in M.METHODS.items():
    scorer = spec.get("scorer", "actor")
    assert base.ANSWER_LIKELIHOOD_SCORERS[method] == scorer
    for name in (method, method + "_markovian"):
      c = base.task_config("gsm8k", name)
      assert c.objective.method == name and c.variant == name
      assert c.prompt.markovian == name.endswith("_markovian")
      spec_ = config_validation.validate(c)
      assert obj.method_of(spec_.objective.loss).name == name
      assert spec_.objective.reward_scorer == scorer


@pytest.mark.parametrize(
  "key,value,needle",
  [
    ("objective.method", "grpo", "verifree_markovian"),
    ("prompt.markovian", True, "prompt.markovian"),
    ("objective.normalize_reward", True, "objective.normalize_reward"),
    ("objective.reward_scorer", "base", "objective.reward_scorer"),
  ],
)
def test_a_method_with_conflicting_keys_is_one_line_naming_the_key(key, value, needle):
  c = base.task_config("gsm8k", "rlpr")
  section, _, leaf = key.rpartition(".")
  c[section][leaf] = value
  with pytest.raises(InvalidConfig, match=needle) as e:
    config_validation.validate(c)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "key,value,needle",
  [
    ("objective.reward_scorer", "actor", "config.objective.reward_scorer: 'nover' scores with"),
    ("objective.scorer_ema_decay", 1.5, "config.objective.scorer_ema_decay: .* in \\[0, 1\\]"),
    ("objective.scorer_ema_decay", float("nan"), "config.objective.scorer_ema_decay: .*finite"),
    ("objective.scorer_ema_every", 0, "config.objective.scorer_ema_every: .* >= 1"),
    ("lora.reference", "initial_adapter", "config.lora.reference: objective.method='nover' takes"),
  ],
)
def test_nover_with_conflicting_or_bad_ema_keys_is_one_line_naming_the_key(key, value, needle):
  c = base.task_config("gsm8k", "nover")
  section, _, leaf = key.rpartition(".")
  c[section][leaf] = value
  c.lora.init_from = "/an/adapter"  # what lora.reference='initial_adapter' needs besides
  with pytest.raises(InvalidConfig, match=needle) as e:
    config_validation.validate(c)
  assert "\n" not in str(e.value)
  # Its own knobs at other values in range are a valid NOVER run.
  c = base.task_config("gsm8k", "nover_markovian")
  c.objective.scorer_ema_decay, c.objective.scorer_ema_every = 0.9, 1000
  loss = config_validation.validate(c).objective.loss
  assert (loss.scorer_ema_decay, loss.scorer_ema_every) == (0.9, 1000)


@pytest.mark.parametrize(
  "variant,key,value,needle",
  [
    ("rlpr", "method_answer_weight", 1.0, "method_answer_weight: 1.0 .*'rlpr' has none"),
    ("", "method_answer_weight", 1.0, "method_answer_weight: 1.0 .*this run has no method"),
    ("latro", "method_length_penalty", 0.1, "method_length_penalty: 0.1 .*'latro' has none"),
    ("latro", "method_answer_weight", -0.5, "method_answer_weight: .*-1 for the method's own"),
  ],
)
def test_a_method_knob_without_its_term_is_one_line_naming_the_key(variant, key, value, needle):
  c = base.task_config("gsm8k", variant) if variant else base.task_config("gsm8k")
  c.objective[key] = value
  with pytest.raises(InvalidConfig, match=needle) as e:
    config_validation.validate(c)
  assert "\n" not in str(e.value)


def test_latro_at_its_papers_weight_and_dro_with_a_length_penalty():
  """The keys reach the method: LaTRO at its paper's answer weight 1 has an answer term (its
  released weight 0 has none); DRO's reward falls by exactly c * K_i / K per row (hand-derived
  from the lengths), its other terms unchanged."""
  from markovian_jax.objectives.inputs import LossInputs

  def loss_of(variant, **keys):
    c = base.task_config("gsm8k", variant)
    for k, v in keys.items():
      c.objective[k] = v
    return config_validation.validate(c).objective.loss

  assert not obj.method_of(loss_of("latro")).has_answer_term
  paper = obj.method_of(loss_of("latro", method_answer_weight=1.0))
  assert paper.answer_weight_value == 1.0 and paper.has_answer_term
  dro = obj.method_of(loss_of("dro_markovian"))
  penalised = obj.method_of(loss_of("dro_markovian", method_length_penalty=0.3))
  assert (dro.length_penalty, penalised.length_penalty) == (0.0, 0.3)
  g, k = dro.group_size, 6
  n = 2 * g
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, k + 1, n)
  inputs = LossInputs(
    cot_logprobs=np.zeros((n, k), np.float32),
    cot_mask=np.arange(k)[None, :] < lengths[:, None],
    answer_logprobs=-rng.random((n, 3)).astype(np.float32),
    answer_mask=np.ones((n, 3), bool),
    no_reasoning_logprobs=-rng.random((2, 3)).astype(np.float32),
    no_reasoning_mask=np.ones((2, 3), bool),
  )
  _, r0, _ = M.method_rewards(inputs, dro)
  _, r1, _ = M.method_rewards(inputs, penalised)
  np.testing.assert_allclose(
    np.asarray(r0) - np.asarray(r1), 0.3 * lengths / k, rtol=helpers.ulps(8), atol=0
  )


# Each step compiles its own programs (~50 s on 2 CPU cores): CI runs the answer term's path
# (verifree) and the no-reasoning rows + filter's (rlpr_markovian); the EMA scorer's wiring runs
# in CI in tests/training/test_ema_scorer.py. MARKOVIAN_ALL_METHODS=1 runs every method here.
WIRED = (
  "verifree",
  "rlpr_markovian",
  "nover",
  "latro_markovian",
  "vrcli",
  "dro_markovian",
  "jepo",
  "nover_markovian",
)
STEPPED = WIRED if os.environ.get("MARKOVIAN_ALL_METHODS") else WIRED[:2]


@pytest.mark.slow
@pytest.mark.parametrize("variant", STEPPED)
def test_one_step_of_a_wired_method_matches_the_reference(variant, tiny_model_dir, tmp_path):
  """The pipeline's targets from what it scored = the float64 reference's from the same
  log-probs; then one update runs and logs the method's tags."""
  from markovian_jax.trainer import Trainer
  from markovian_jax.training.run_context import fetch
  from tests import torch_answer_likelihood as ref

  c = make_config(
    tiny_model_dir, tmp_path / variant, **{"train.eval_every": 100, "lora.dropout": 0.0}
  )
  c = base.apply_arg(c, variant)
  t = Trainer(c)
  method = obj.method_of(t.spec.objective.loss)
  ema = method.scorer == "ema"
  if ema:
    # The copy starts as the policy; apart from it, scoring with either is told apart.
    t.state = t.state.replace(ema_lora=helpers.set_apart(t.state.ema_lora))
    ema_before = [np.asarray(x) for x in jax.tree.leaves(t.state.ema_lora.params)]
  # NOVER: the key the step will draw, so that the step's KL can be checked on these CoTs.
  _, ro, sc, tg, _, _ = helpers.step_stages(t, None if ema else jax.random.PRNGKey(3))
  w = sc.window
  lp = np.asarray(fetch(sc.answer_logprobs), np.float64)[:, -w:]
  span = sc.answer_span[:, -w:]
  kw = {}
  if method.needs_no_reasoning:
    kw.update(
      lp0=np.asarray(fetch(sc.no_reasoning_logprobs), np.float64), amask0=sc.no_reasoning_span
    )
    # The no-reasoning row's answer is the same tokens, right-aligned.
    assert (sc.no_reasoning_span.sum(1) == span.reshape(len(ro.examples), -1, w)[:, 0].sum(1)).all()
  if sc.ref_cot_logprobs is not None:
    kw.update(ref=np.asarray(fetch(sc.ref_cot_logprobs), np.float64))
  g = t.spec.train.group_size
  want = ref.step(
    method.method,
    lp=np.where(span, lp, np.nan),
    amask=span,
    cot=np.asarray(ro.behaviour_logprobs, np.float64),
    cmask=ro.cot_mask,
    g=g,
    kl=np.zeros(ro.cot_mask.shape),
    **kw,
  )
  got_adv = np.asarray(fetch(tg.advantages), np.float64)
  scale = max(1.0, float(np.max(np.abs(want["reward"]))))
  spread = np.std(want["reward"].reshape(-1, g), axis=1, ddof=1)
  tol = helpers.ulps(256) * scale / max(float(np.min(spread)), 1e-3)
  np.testing.assert_allclose(got_adv, want["advantages"], rtol=0, atol=tol)
  np.testing.assert_allclose(
    np.asarray(fetch(tg.answer_weight)),
    want["answer_weight"],
    rtol=helpers.ulps(256),
    atol=helpers.ulps(256, of=want["answer_weight"]),
  )
  if ema:
    _check_the_ema_copy_scored(t, sc)
    # The KL of these CoTs under the policy before the step to the copy and to the base model
    # (which the fresh policy equals: KL 0), to tell which the step took.
    kl = {}
    for name, ref in (("ema", t.reference(t.state)), ("base", None)):
      kl[name] = float(_loss_metrics(t, ro, sc, tg, ref)["kl"])
    assert kl["ema"] > 1e-3 and kl["base"] < 1e-6, kl
  s = t.step()
  assert s["train/updates"] == 1 and s["guard/nonfinite_update"] == 0.0
  assert "answer/method_reward" in s and "policy/cot_length" in s
  if method.needs_no_reasoning:
    assert "answer/no_reasoning_score" in s
  if ema:
    # The step sampled the same CoTs (the same key) and took its KL to the copy.
    assert ro.cot_texts == t.last_info.rollout.cot_texts
    np.testing.assert_allclose(s["policy/kl"], kl["ema"], rtol=helpers.ulps(256))
    # No sync after step 1 (objective.scorer_ema_every 100): the copy is as it was, bit for bit.
    for a, b in zip(jax.tree.leaves(t.state.ema_lora.params), ema_before):
      assert np.asarray(a).tobytes() == b.tobytes()


def _loss_metrics(t, ro, sc, tg, ref):
  """The update's loss metrics on the step's batch from the policy before it, KL to `ref`."""
  import functools

  from markovian_jax.training import pipeline, train_step

  batch = pipeline.policy_batch(t.ctx, ro, sc)
  fn = jax.jit(functools.partial(train_step.loss_and_grads, t.settings, answer_last_n=None))
  _, metrics, _ = fn(t.ctx.params, t.lora, batch, tg, None, ref)
  return metrics


def _check_the_ema_copy_scored(t, sc):
  """The step's answer log-probs are the EMA copy's, not the policy's."""
  import functools

  from markovian_jax.training import train_step
  from markovian_jax.training.run_context import fetch

  w = sc.window
  got = np.asarray(fetch(sc.answer_logprobs))[:, -w:]
  span = sc.answer_span[:, -w:]
  score = jax.jit(functools.partial(train_step.answer_logprobs, t.settings, last_n=w))
  by = {}
  for name, adapter in (("ema", t.state.ema_lora), ("policy", t.lora)):
    lp = score(t.ctx.params, adapter, sc.answer_tokens, sc.answer_mask, sc.answer_span)
    by[name] = np.asarray(fetch(lp))[:, -w:]
  np.testing.assert_allclose(
    got[span], by["ema"][span], rtol=0, atol=helpers.ulps(64, of=by["ema"][span])
  )
  assert np.max(np.abs(got[span] - by["policy"][span])) > 1e-2
