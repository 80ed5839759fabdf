"""One Markovian training step in bfloat16 against the float64 PyTorch reference.

The setup of tests/test_step_reference.py (its fixtures, its `ours` entry point and the reference in
tests/torch_markovian.py), with one change: the tiny model's weights are rounded to bfloat16 first,
so that the float64 reference and our bfloat16 run hold the same model and the differences below
are rounding in our bfloat16 computation only. The LoRA (float32 in our runs) is the reference's.

Tolerances, from bfloat16 rounding (nothing here was widened after a run):

  u = 2^-8, bfloat16's unit roundoff (8 significant bits): each rounding to bfloat16 returns
  x (1 + e), |e| <= u. Matmuls accumulate in float32 (the reduction adds ~2^-24 per term, nothing
  at these lengths), so what counts is the number of roundings a value passes through.
  Forward, per decoder layer, on the longest path along the residual stream:
    attention: norm output, q/k/v matmul output, LoRA delta cast, LoRA add, RoPE cast,
      probabilities cast, probabilities x values (+1 where the shared-prompt and own parts are
      added), o matmul output, LoRA cast, LoRA add, residual add                         12
    MLP: norm output, gate/up output, LoRA cast, LoRA add, SiLU, gate*up, down output, LoRA cast,
      LoRA add, residual add                                                               10
  so K_F = 22 L + 1 (the final norm) = 45 for L = 2; the backward's cotangents pass through as
  many (K_B = K_F). Rounding errors are independent and zero-mean, so their relative effect grows
  as sqrt(count) u, not count * u (the probabilistic bound of Higham & Mary 2019), and the small
  random layers (weights 0.02) do not amplify a relative perturbation. With LAMBDA = 4 standard
  deviations per compared value:

  logits z_v = y . W_v (y: the final norm's output, rms <= max|g| of its weight; W_v: column v of
    the head): sigma_z = sqrt(K_F) u max|g| max_v ||W_v||_2.
  log-probs lp = z_t - logsumexp(z): sigma_lp <= sqrt(2) sigma_z (the target logit and the
    softmax mean of the others).                     TOL_LP = LAMBDA sigma_lp   (~0.03 nats here)
  rewards r and baseline scores b (means of lp over the answer): TOL_LP.
  KL_t = sum_v p (log p - log q): to first order dKL = Cov_p(log p - log q, dz_p - dz_q)
    <= sqrt(2 KL_t) sqrt(2) sigma_z, so the mean KL moves by <= 2 LAMBDA sigma_z sqrt(mean KL).
  loss: mean_i |A_i| rho_max TOL_LP (the policy term) + kl_penalty x the KL bound
    (+ TOL_LP / min scale for reward_grad="paper", whose term reads r_i directly).
  LoRA gradient, per matrix, in Frobenius norm relative to the reference's:
    TAU = LAMBDA sqrt(K_F + K_B) u (~0.15); + TOL_LP for PPO (rho = exp(lp - behaviour) carries
    lp's error into the gradient's weight).

What bfloat16 does not allow here: the advantages. A = (R - mean) / std divides R's error by the
group's std of R, 0.024-0.032 nats on this model, the same size as TOL_LP: bfloat16 rounding of r
(observed ~3e-3) moves A by ~0.1, and a bound from TOL_LP would exceed |A| itself. So the loss and
the gradient are checked with the reference's advantages (and, for "paper", its group mean and
scale of r) handed to our loss pass; the rewards are checked on their own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_step_reference import (  # noqa: F401  (setup, torch_mod: fixtures)
    G, KL_PENALTY, PPO_ROWS, Q, make_config, ours, setup, torch_mod, _reference)

pytestmark = pytest.mark.slow  # three reference steps and three jitted bfloat16 steps

U = 2.0 ** -8
LAMBDA = 4.0
SIGMA_FLOOR, ADV_EPS = 1e-2, 1e-8  # the reference's (and configs/base.py's) defaults
PPO_EPS = 0.2


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_model_dir, tmp_path_factory):
  """conftest's tiny random Llama with every weight rounded to bfloat16 (stored as float32)."""
  from markovian_jax.models import hf, load_checkpoint, load_tokenizer
  config, params = load_checkpoint(tiny_model_dir)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  d = str(tmp_path_factory.mktemp("tiny_llama_bf16_weights"))
  hf.save_hf(config, params, d, tokenizer=load_tokenizer(tiny_model_dir))
  return d


class Bounds:
  """The tolerances of the module docstring, from the reference model's own weights."""

  def __init__(self, ref):
    base = ref.model.get_base_model()
    layers = base.config.num_hidden_layers
    head = base.lm_head.weight.detach().numpy()  # [V, D]
    g = base.model.norm.weight.detach().numpy()
    self.k_f = 22 * layers + 1
    self.sigma_z = np.sqrt(self.k_f) * U * np.abs(g).max() * np.linalg.norm(head, axis=1).max()
    self.lp = LAMBDA * np.sqrt(2.0) * self.sigma_z
    self.grad = LAMBDA * np.sqrt(2 * self.k_f) * U

  def kl(self, mean_kl: float) -> float:
    return 2 * LAMBDA * self.sigma_z * np.sqrt(mean_kl)


@pytest.fixture(scope="module")
def bounds(setup):
  b = Bounds(setup[1])
  assert 0 < b.lp < 0.05 and b.grad < 0.2  # a bound this loose would check nothing
  return b


def _targets(want, *, paper=False):
  """Our Targets holding the reference's advantages (and group mean / scale of r for paper)."""
  from markovian_jax.objectives.inputs import Targets
  n = want.rewards.size
  mean, scale = np.zeros(n), np.ones(n)
  if paper:
    r = want.rewards.reshape(Q, G)
    mean = np.repeat(r.mean(axis=1), G)
    scale = np.repeat(np.maximum(r.std(axis=1, ddof=1), SIGMA_FLOOR) + ADV_EPS, G)
  f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return Targets(advantages=f(want.advantages), active=jnp.ones((n,), bool),
                 reward_mean=f(mean), reward_scale=f(scale))


def _ours_bf16(setup, model_dir, want, objective=None, **kw):
  lora, _, examples, cot, base_cot = setup
  objective = objective or {}
  config = make_config(model_dir, **objective)
  config.model.dtype = "bfloat16"
  return ours(config, lora, examples, cot, base_cot,
              targets=_targets(want, paper=objective.get("reward_grad") == "paper"), **kw)


def _check_grads(want, got, tol):
  assert sorted(got.grads) == sorted(want.grads)
  for key, g in want.grads.items():
    assert np.linalg.norm(g) > 0, key
    err = np.linalg.norm(got.grads[key] - g) / np.linalg.norm(g)
    assert err <= tol, f"{key}: relative error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def pg(setup, tiny_model_dir):
  want = _reference(setup)
  return want, _ours_bf16(setup, tiny_model_dir, want)


def test_bf16_rewards(pg, bounds):
  want, got = pg
  np.testing.assert_allclose(got.rewards, want.rewards, atol=bounds.lp, rtol=0, err_msg="r")
  np.testing.assert_allclose(got.baseline_scores, want.baseline_scores, atol=bounds.lp, rtol=0,
                             err_msg="b")
  # Not a float32 model in disguise: bfloat16 rounding is visible in r (float32: ~1e-6).
  assert np.abs(got.rewards - want.rewards).max() > 1e-4


def test_bf16_pg_loss_and_gradient(pg, bounds):
  want, got = pg
  assert want.kl_loss > 1e-3
  tol = (np.abs(want.advantages).mean() * bounds.lp + KL_PENALTY * bounds.kl(want.kl_loss))
  np.testing.assert_allclose(got.loss, want.loss, atol=tol, rtol=0, err_msg="loss")
  _check_grads(want, got, bounds.grad)


def test_bf16_ppo_minibatch(setup, tiny_model_dir, bounds):
  # Behaviour log-probs: the policy's own (float64) shifted by +-0.02 (ratio inside the clip
  # range) or +-0.6 (outside): every ratio is >= 0.18 from a clip boundary, over twice what
  # bfloat16 can move it (rho * TOL_LP), so both sides take the same branch at every token.
  own = _reference(setup, with_grads=False).cot_logprobs
  shift = np.random.default_rng(1).choice([-0.6, -0.02, 0.02, 0.6], own.shape)
  behaviour = own + shift
  rho = np.exp(own - behaviour)[PPO_ROWS]
  outside = (rho < 1 - PPO_EPS) | (rho > 1 + PPO_EPS)
  assert 0.2 < outside.mean() < 0.8
  assert np.abs(np.abs(rho - 1) - PPO_EPS).min() > 2 * rho.max() * bounds.lp
  want = _reference(setup, kind="ppo", behaviour_logprobs=behaviour, rows=PPO_ROWS)
  got = _ours_bf16(setup, tiny_model_dir, want, {"kind": "ppo"}, behaviour_logprobs=behaviour,
                   rows=PPO_ROWS)
  tol = (np.abs(want.advantages[PPO_ROWS]).mean() * rho.max() * bounds.lp
         + KL_PENALTY * bounds.kl(want.kl_loss))
  np.testing.assert_allclose(got.loss, want.loss, atol=tol, rtol=0, err_msg="loss")
  _check_grads(want, got, bounds.grad + bounds.lp)


def test_bf16_reward_grad_paper(setup, tiny_model_dir, pg, bounds):
  want = _reference(setup, reward_grad="paper")
  got = _ours_bf16(setup, tiny_model_dir, want, {"reward_grad": "paper"})
  # The reward term changes the gradient well beyond bfloat16's bound, so a dropped term fails.
  base = pg[0].grads
  assert max(np.linalg.norm(want.grads[k] - base[k]) / np.linalg.norm(want.grads[k])
             for k in want.grads) > 3 * bounds.grad
  scale = np.maximum(want.rewards.reshape(Q, G).std(axis=1, ddof=1), SIGMA_FLOOR).min()
  tol = (np.abs(want.advantages).mean() * bounds.lp + KL_PENALTY * bounds.kl(want.kl_loss)
         + bounds.lp / scale)
  np.testing.assert_allclose(got.loss, want.loss, atol=tol, rtol=0, err_msg="loss")
  _check_grads(want, got, bounds.grad)
