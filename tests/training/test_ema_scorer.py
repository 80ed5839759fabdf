"""NOVER's EMA-lagged adapter copy (docs/answer-likelihood.md, "NOVER's EMA scorer"): the sync
rule against numpy, its interval and decay over a run's steps re-derived from the adapters the
steps left, and its checkpoint round trip (bit for bit; a checkpoint without it refused in one
line; other runs ignore it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from markovian_jax.configs import base
from markovian_jax.models import LoraAdapter
from markovian_jax.runtime.errors import CheckpointError
from markovian_jax.training import state as state_lib
from markovian_jax.training import train_step
from tests import helpers
from tests.helpers import make_config

DECAY = 0.6  # objective.scorer_ema_decay's default (NOVER's released ref_model_mixup_alpha)


def _adapter(rng, dtype):
  ab = {
    k: jnp.asarray(rng.normal(size=shape), dtype)
    for k, shape in (("a", (2, 8, 4)), ("b", (2, 4, 8)))
  }
  return LoraAdapter({"layers": {"mlp": {"up": ab}}}, rank=4, alpha=8.0, dropout=0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ema_update_is_the_float32_mix_stored_in_the_adapters_dtype(dtype):
  """copy <- d copy + (1 - d) policy in float32 (numpy), rounded once to the adapter's dtype:
  bit for bit in bfloat16 (one rounding of the same float32 value), within float32 rounding in
  float32."""
  rng = np.random.default_rng(0)
  ema, lora = _adapter(rng, dtype), _adapter(rng, dtype)
  got = jax.jit(lambda e, x: train_step.ema_update(e, x, DECAY))(ema, lora)
  assert (got.rank, got.alpha, got.dropout) == (4, 8.0, 0.0)
  for g, e, x in zip(*(jax.tree.leaves(t.params) for t in (got, ema, lora))):
    e32, x32 = np.asarray(e, np.float32), np.asarray(x, np.float32)
    want = np.float32(DECAY) * e32 + np.float32(1 - DECAY) * x32
    assert g.dtype == dtype
    if dtype == jnp.bfloat16:
      assert np.asarray(g).tobytes() == want.astype(ml_dtypes.bfloat16).tobytes()
    else:
      # An FMA would round once where numpy rounds twice: an ulp of the terms, not of the sum.
      terms = np.maximum(np.abs(e32), np.abs(x32))
      np.testing.assert_allclose(np.asarray(g), want, rtol=0, atol=helpers.ulps(2, of=terms))


def test_only_the_ema_scorer_needs_the_copy():
  lora, ref = object(), object()
  assert train_step.scorer_adapter("actor", lora, ref) is lora
  assert train_step.scorer_adapter("base", lora, None) is None  # the base model
  assert train_step.scorer_adapter("ema", lora, ref) is ref
  with pytest.raises(ValueError, match="'ema' scorer needs the EMA adapter copy"):
    train_step.scorer_adapter("ema", lora, None)


def _leaves(adapter):
  return [np.asarray(x) for x in jax.tree.leaves(adapter.params)]


@pytest.mark.slow
def test_the_copy_over_steps_and_its_checkpoint(tiny_model_dir, tmp_path):
  """A NOVER run syncing every 2 steps. The copy starts as the starting adapter; set apart from
  it (c0), it is what step 1 scores the answers with (the pipeline's log-probs are the copy's,
  not the policy's) and takes its KL to (> 0, where the fresh policy's KL to the base model and
  to itself is 0: its `b` are 0). It is left as it was after steps 1 and 3, and after steps 2
  and 4 is, from the adapters l_s the steps left, d c0 + (1 - d) l2 and d (d c0 + (1 - d) l2) +
  (1 - d) l4 (float64 numpy, within float32 rounding). A checkpoint restores it bit for bit; a
  run without a copy ignores the item; a checkpoint without one is refused to NOVER in one line.
  One trainer for all of it: each compiles its step's programs (~50 s on 2 cores)."""
  from markovian_jax.trainer import Trainer
  from markovian_jax.training import optimizer, pipeline
  from markovian_jax.training.run_context import fetch, put

  c = make_config(
    tiny_model_dir,
    tmp_path / "nover",
    **{"lora.dropout": 0.0, "optim.lr": 1e-3, "objective.scorer_ema_every": 2},
  )
  t = Trainer(base.apply_arg(c, "nover"))
  assert t.spec.objective.loss.scorer_ema_decay == DECAY
  policy = [_leaves(t.lora)]
  assert [x.tobytes() for x in _leaves(t.state.ema_lora)] == [x.tobytes() for x in policy[0]]
  assert not any(
    np.any(x) for p, x in jax.tree_util.tree_leaves_with_path(t.lora.params) if p[-1].key == "b"
  )
  t.state = t.state.replace(ema_lora=helpers.set_apart(t.state.ema_lora))
  ema = [_leaves(t.state.ema_lora)]

  # Step 1's stages apart, as `advance` runs them (its sampling key, its questions, its reference).
  ref, ro, sc, tg, _, _ = helpers.step_stages(t)
  rows = [put(x, t.mesh) for x in (sc.answer_tokens, sc.answer_mask, sc.answer_span)]
  by = {  # the step's own scoring program, given each adapter as the copy
    name: np.asarray(
      fetch(t.programs.score(t.ctx.params, t.lora, a, *rows, None, None, None, last_n=sc.window)[0])
    )
    for name, a in (("copy", ref), ("policy", t.lora))
  }
  got = np.asarray(fetch(sc.answer_logprobs))
  assert got.tobytes() == by["copy"].tobytes()
  assert np.max(np.abs(got - by["policy"])[sc.answer_span]) > 1e-2
  lr = np.float32(optimizer.learning_rate(t.spec.optim, t.spec.train.num_steps, 0))
  copy = lambda x: jax.tree.map(jnp.copy, x)  # noqa: E731 - the update donates its inputs
  _, _, m = t.programs.update(
    t.ctx.params,
    copy(t.lora),
    copy(t.opt_state),
    pipeline.policy_batch(t.ctx, ro, sc),
    tg,
    jax.random.PRNGKey(0),
    ref,
    lr,
    answer_last_n=None,
  )
  kl_to_copy = float(m["kl"])
  assert kl_to_copy > 1e-3

  for step in range(1, 5):
    s = t.step()
    assert s["train/updates"] == 1 and s["guard/nonfinite_update"] == 0.0
    if step == 1:
      assert t.last_info.rollout.cot_texts == ro.cot_texts  # the CoTs checked above
      np.testing.assert_allclose(s["policy/kl"], kl_to_copy, rtol=helpers.ulps(16))
    policy.append(_leaves(t.lora))
    ema.append(_leaves(t.state.ema_lora))
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(policy[2], policy[0]))
  assert moved > 1e-4  # the steps moved the policy: a wrong mix would show
  d = np.float64(DECAY)
  for step, before in ((1, 0), (3, 2)):
    assert [x.tobytes() for x in ema[step]] == [x.tobytes() for x in ema[before]], step
  mix2 = [d * c0 + (1 - d) * l2 for c0, l2 in zip(*(map(_f64, (ema[0], policy[2]))))]
  mix4 = [d * m + (1 - d) * l4 for m, l4 in zip(mix2, _f64(policy[4]))]
  for step, want in ((2, mix2), (4, mix4)):
    for got, w in zip(ema[step], want):
      assert got.dtype == np.float32
      np.testing.assert_allclose(got, w, rtol=0, atol=helpers.ulps(4, of=w), err_msg=str(step))

  t.save(force=True)
  root = tmp_path / "nover" / "checkpoints" / "4"
  assert (root / "ema_lora").is_dir() and (root / "lora").is_dir()
  # Into a state whose arrays are zeros (a resumed run's fresh start), so that only what was
  # read from the checkpoint can match.
  zeros = lambda a: a.replace(params=jax.tree.map(jnp.zeros_like, a.params))  # noqa: E731
  like = t.state.replace(lora=zeros(t.lora), ema_lora=zeros(t.state.ema_lora), step=0)
  restored, saved = state_lib.restore(t.ckpt, 4, like=like)
  assert saved["step"] == 4 and restored.step == 4
  assert [x.tobytes() for x in _leaves(restored.ema_lora)] == [x.tobytes() for x in ema[4]]
  assert [x.tobytes() for x in _leaves(restored.lora)] == [x.tobytes() for x in policy[4]]
  # A run that keeps no copy restores the same checkpoint without it.
  other, _ = state_lib.restore(t.ckpt, 4, like=like.replace(ema_lora=None))
  assert other.ema_lora is None
  assert [x.tobytes() for x in _leaves(other.lora)] == [x.tobytes() for x in policy[4]]
  # A checkpoint saved without a copy (another method's run): NOVER refuses it in one line.
  t.ckpt.save(5, t.lora.params, t.opt_state, dict(t.state_json(), step=5))
  with pytest.raises(CheckpointError, match="step 5 .* holds no EMA adapter copy") as e:
    state_lib.restore(t.ckpt, 5, like=like)
  assert "\n" not in str(e.value) and "objective.method" in str(e.value)
  assert state_lib.restore(t.ckpt, 5, like=like.replace(ema_lora=None))[0].step == 5


def _f64(leaves):
  return [np.asarray(x, np.float64) for x in leaves]
