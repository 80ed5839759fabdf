"""One Markovian training step against an independent PyTorch reference (tests/torch_markovian.py).

On the tiny random Llama (`tiny_model_dir`) with a rank-4 LoRA whose B is not zero, fixed CoT tokens
(Q=2 arithmetic questions x G=4 CoTs of K=12 tokens, temperature 0.7) and fixed baseline CoT'
tokens, our pipeline and the reference (transformers + peft + torch.autograd, float64, built from
the method's formulas and its own prompt templates) must agree on:

  rewards r and baseline scores b   atol 2e-5 nats (ours is float32: ~1e-6 off here)
  advantages A                      atol 2 * 2e-5 / (min group std of R, ~0.025 here): A divides
                                    R's error by the group's std
  loss                              atol 1e-5 + rtol 1e-4 (reward_grad="paper": + 2 * 2e-5 /
                                    its sigma scale, see test_reward_grad_paper)
  LoRA gradient, every A/B matrix   rtol 1e-3 + atol 1e-3 * max|g| (max over all 28 matrices)
  one optimizer step                updated LoRA weights, atol 1e-6 (lr 1e-3), where the gradient
                                    is well conditioned: |g| > 1e-3 * max|g|

for kind=pg, one PPO pass over a minibatch of rows (behaviour log-probs = the policy's own,
perturbed so that the ratio is not 1 and both PPO branches occur) and reward_grad="paper".
Observed: r, b within 1e-6; A within 3e-5; gradients within 6e-5 * max|g|; AdamW within 3e-8.

Every call into our JAX pipeline is in `ours` (tests/step_reference.py, the single place to re-point
when the step's APIs change); the tests only compare its outputs with the reference's. The samples
and the reference are tests/training/conftest.py's fixtures (`setup`, `torch_mod`).
"""

import numpy as np
import pytest

from tests.step_reference import (
  KL_PENALTY,
  OPTIM,
  PPO_ROWS,
  R_ATOL,
  TEMPERATURE,
  G,
  K,
  Q,
  check_loss,
  check_rewards,
  make_config,
  ours,
)

# ----------------------------------------------------------------------------- fixtures


def _reference(setup, **kw):
  _, ref, examples, cot, base_cot = setup
  return ref.step(
    [(e.question, e.answer) for e in examples],
    cot,
    base_cot,
    cot_length=K,
    temperature=TEMPERATURE,
    kl_penalty=KL_PENALTY,
    **kw,
  )


def _ours(setup, model_dir, objective=None, **kw):
  lora, _, examples, cot, base_cot = setup
  return ours(make_config(model_dir, **(objective or {})), lora, examples, cot, base_cot, **kw)


@pytest.fixture(scope="module")
def pg(setup, tiny_model_dir):
  return _reference(setup), _ours(setup, tiny_model_dir, with_update=True)


# ----------------------------------------------------------------------------- checks


def _scale(grads: dict) -> float:
  return max(np.abs(g).max() for g in grads.values())


def _check_grads(want, got):
  assert sorted(got.grads) == sorted(want.grads)
  assert len(want.grads) == 2 * 7 * 2  # A and B of 7 projections in each of the 2 layers
  scale = _scale(want.grads)
  assert scale > 1e-4  # the gradient is not trivially zero
  for key, g in want.grads.items():
    np.testing.assert_allclose(got.grads[key], g, rtol=1e-3, atol=1e-3 * scale, err_msg=key)


def test_pg_rewards_and_advantages(pg):
  want, got = pg
  assert want.rewards.reshape(Q, G).std(axis=1).min() > 1e-3  # distinct rewards within groups
  assert np.abs(want.rewards - np.repeat(want.baseline_scores, G)).min() > 0
  check_rewards(want, got)


def test_pg_loss(pg):
  want, got = pg
  assert want.kl_loss > 1e-3  # the adapter moved the policy: the KL term is not trivially zero
  check_loss(want, got)


def test_pg_lora_gradient(pg):
  _check_grads(*pg)


def test_adamw_step(pg, setup):
  """Our optimizer on our gradient vs torch's clip_grad_norm_ + AdamW on the reference's."""
  want, got = pg
  ref = setup[1]
  before = ref.lora_weights()
  theirs = ref.adamw_step(
    want.grads,
    lr=OPTIM["lr"],
    betas=(OPTIM["b1"], OPTIM["b2"]),
    eps=OPTIM["eps"],
    weight_decay=OPTIM["weight_decay"],
    max_norm=OPTIM["grad_clip"],
  )
  scale = _scale(want.grads)
  compared = 0
  for key, g in want.grads.items():
    # Adam's first step is lr * g / (|g| + eps), about lr * sign(g): an element whose gradient is
    # near zero takes a full +-lr step whose sign is float noise. Compare only the elements whose
    # gradient is well conditioned (|g| > 1e-3 max|g|); elsewhere only bound the step by lr.
    well = np.abs(g) > 1e-3 * scale
    compared += well.sum()
    np.testing.assert_allclose(
      got.updated[key][well], theirs[key][well], atol=1e-6, rtol=0, err_msg=key
    )
    step = np.abs(got.updated[key] - before[key])
    assert (
      step.max() <= OPTIM["lr"] * (1 + OPTIM["weight_decay"] * np.abs(before[key]).max()) * 1.001
    ), key
  assert compared > 0.75 * sum(g.size for g in want.grads.values())


def test_ppo_minibatch(setup, tiny_model_dir):
  eps = 0.2
  # Behaviour log-probs: the policy's own (float64 reference), shifted by fixed noise so that
  # rho != 1 and both the clipped and the unclipped branch occur.
  own = _reference(setup, with_grads=False).cot_logprobs
  behaviour = own + np.random.default_rng(1).normal(0.0, 0.25, own.shape)
  rho = np.exp(own - behaviour)[PPO_ROWS]
  outside = (rho < 1 - eps) | (rho > 1 + eps)
  assert 0.1 < outside.mean() < 0.9
  # No ratio sits at a clip boundary, where float32 vs float64 could pick different branches.
  assert np.abs(np.abs(rho - 1) - eps).min() > 1e-4
  want = _reference(setup, kind="ppo", behaviour_logprobs=behaviour, rows=PPO_ROWS)
  got = _ours(setup, tiny_model_dir, {"kind": "ppo"}, behaviour_logprobs=behaviour, rows=PPO_ROWS)
  check_rewards(want, got)
  check_loss(want, got)
  _check_grads(want, got)


def test_reward_grad_paper(setup, pg, tiny_model_dir):
  want = _reference(setup, reward_grad="paper")
  got = _ours(setup, tiny_model_dir, {"reward_grad": "paper"})
  # The reward term changes the gradient (here it dominates it) ...
  assert max(np.abs(want.grads[k] - pg[0].grads[k]).max() for k in want.grads) > (
    0.5 * _scale(want.grads)
  )
  check_rewards(want, got)
  # ... while its value, mean_i (r_i - mu_g) / scale_g over whole groups, is 0 in exact arithmetic.
  # Ours takes mu from the scoring pass and r_i from the loss pass, two float32 computations of the
  # same r (each within R_ATOL); divided by scale (~0.03 here) the difference survives in the loss.
  r = want.rewards.reshape(Q, G)
  scale = np.maximum(r.std(axis=1, ddof=1), 1e-2).min()
  check_loss(want, got, atol=1e-5 + 2 * R_ATOL / scale)
  _check_grads(want, got)
