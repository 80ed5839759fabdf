"""One Markovian training step in bfloat16 against the float64 PyTorch reference.

The setup of tests/training/test_step_reference.py (the fixtures of tests/training/conftest.py, the
`ours` entry point of tests/step_reference.py and the reference in tests/torch_markovian.py), with
one change: the tiny model's weights are rounded to bfloat16 first, so that the float64 reference
and our bfloat16 run hold the same model and the differences below are rounding in our bfloat16
computation only. The LoRA (float32 in our runs) is the reference's.

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
  rewards r and baseline scores b: means of lp over a row's n_a answer tokens, each read from its
    own position's hidden state, rounded on its own: TOL_LP / sqrt(n_a) per row (~0.017 for
    n_a = 4). One bfloat16 rounding of r (|r| ~ 11 nats) is up to 2^-5, so rewards or log-probs
    computed or stored in bfloat16 fail it (a test below asserts the margin).
  KL_t = sum_v p (log p - log q): to first order dKL = Cov_p(log p - log q, dz_p - dz_q)
    <= sqrt(2 KL_t) sqrt(2) sigma_z, so the mean KL moves by <= 2 LAMBDA sigma_z sqrt(mean KL).
  loss: mean_i |A_i| rho_max TOL_LP (the policy term) + KL_PENALTY x the KL bound
    (+ TOL_LP / min scale for reward_grad="paper", whose term reads r_i directly).
  LoRA gradient, per matrix, in Frobenius norm relative to the reference's:
    TAU = LAMBDA sqrt(K_F + K_B) u (~0.15); + TOL_LP for PPO (rho = exp(lp - behaviour) carries
    lp's error into the gradient's weight).

What bfloat16 does not allow here: the advantages. A = (R - mean) / std divides R's error by the
group's std of R, 0.024-0.032 nats on this model, the same size as TOL_LP: bfloat16 rounding of r
(observed ~3e-3) moves A by ~0.1, and a bound from TOL_LP would exceed |A| itself. So the loss and
the gradient are checked with the reference's advantages (and, for "paper", its group mean and
scale of r) handed to our loss pass; the rewards are checked on their own, and our advantages
against a numpy group normalisation of our own rewards.

The KL penalty is 10 here (0.1 in tests/training/test_step_reference.py), so that a dropped KL term
fails: the loss without it differs by kl_penalty x KL (KL ~0.05 nats here), which must exceed 3x the
loss bound (the policy term's ~0.03 + kl_penalty x the KL bound's ~0.01). The KL term's share of the
LoRA gradient is within bfloat16's gradient bound (at penalty 1: 0.07-0.12 relative, bound 0.15), so
the loss is where a dropped term shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests.step_reference import PPO_ROWS, TEMPERATURE, G, K, Q, make_config, ours

pytestmark = pytest.mark.slow  # three reference steps and three jitted bfloat16 steps

U = 2.0**-8
LAMBDA = 4.0
SIGMA_FLOOR, ADV_EPS = 1e-2, 1e-8  # the reference's (and configs/base.py's) defaults
PPO_EPS = 0.2
KL_PENALTY = 10.0  # the module docstring: large enough that a dropped KL term fails


def _reference(setup, kl_penalty=KL_PENALTY, **kw):
  """The float64 reference step on the module's samples (test_step_reference.py's)."""
  _, ref, examples, cot, base_cot = setup
  return ref.step(
    [(e.question, e.answer) for e in examples],
    cot,
    base_cot,
    cot_length=K,
    temperature=TEMPERATURE,
    kl_penalty=kl_penalty,
    **kw,
  )


def _answer_lengths(setup):
  """n_a of each answer row [Q * G] and of each CoT' row [Q]: the tokens a reward averages."""
  _, ref, examples, cot, base_cot = setup

  def n(example, cot_text):
    ids, start = ref.answer_row(example.question, cot_text, example.answer, K)
    return len(ids) - start

  rows = [n(examples[i // G], t) for i, t in enumerate(ref.decode(cot))]
  return np.asarray(rows), np.asarray([n(e, t) for e, t in zip(examples, ref.decode(base_cot))])


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

  def reward(self, answer_tokens: np.ndarray) -> np.ndarray:
    """TOL_LP / sqrt(n_a) per row: a mean of n_a independently rounded log-probs."""
    return self.lp / np.sqrt(answer_tokens)


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
  return Targets(
    advantages=f(want.advantages),
    active=jnp.ones((n,), bool),
    reward_mean=f(mean),
    reward_scale=f(scale),
  )


def _ours_bf16(setup, model_dir, want, objective=None, **kw):
  lora, _, examples, cot, base_cot = setup
  objective = objective or {}
  config = make_config(model_dir, kl_penalty=KL_PENALTY, **objective)
  config.model.dtype = "bfloat16"
  return ours(
    config,
    lora,
    examples,
    cot,
    base_cot,
    targets=_targets(want, paper=objective.get("reward_grad") == "paper"),
    **kw,
  )


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


def test_bf16_rewards_and_advantages(setup, pg, bounds):
  want, got = pg
  rows, base = _answer_lengths(setup)
  tol_r, tol_b = bounds.reward(rows), bounds.reward(base)
  # The bound sees one bfloat16 rounding of r: a reward stored in bfloat16 is off by up to half an
  # ulp (2^-5 at |r| in [8, 16)), about uniformly, so all ten values within 0.6 of that: p < 1%.
  half_ulp = 2.0 ** (np.floor(np.log2(np.abs(want.rewards).min())) - 8)
  assert max(tol_r.max(), tol_b.max()) <= 0.6 * half_ulp, (tol_r, tol_b, half_ulp)
  np.testing.assert_array_less(np.abs(got.rewards - want.rewards), tol_r, err_msg="r")
  np.testing.assert_array_less(
    np.abs(got.baseline_scores - want.baseline_scores), tol_b, err_msg="b"
  )
  # Not a float32 model in disguise: bfloat16 rounding is visible in r (float32: ~1e-6).
  assert np.abs(got.rewards - want.rewards).max() > 1e-4
  # Our advantages are our rewards' group normalisation (float32 arithmetic on R of ~0.1 divided
  # by a std of ~0.03: ~1e-6).
  big_r = (got.rewards - np.repeat(got.baseline_scores, G)).reshape(Q, G)
  adv = (big_r - big_r.mean(1, keepdims=True)) / (big_r.std(1, ddof=1, keepdims=True) + ADV_EPS)
  np.testing.assert_allclose(got.advantages, adv.reshape(-1), atol=1e-5, rtol=0, err_msg="A")


def _kl_term_is_seen(setup, got, tol, **kw):
  """The reference's loss without the KL term is > 3 tol from ours: a dropped term fails."""
  no_kl = _reference(setup, kl_penalty=0.0, with_grads=False, **kw)
  assert abs(got.loss - no_kl.loss) > 3 * tol, (got.loss, no_kl.loss, tol)


def test_bf16_pg_loss_and_gradient(setup, pg, bounds):
  want, got = pg
  assert want.kl_loss > 1e-3
  tol = np.abs(want.advantages).mean() * bounds.lp + KL_PENALTY * bounds.kl(want.kl_loss)
  np.testing.assert_allclose(got.loss, want.loss, atol=tol, rtol=0, err_msg="loss")
  _check_grads(want, got, bounds.grad)
  _kl_term_is_seen(setup, got, tol)


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
  got = _ours_bf16(
    setup, tiny_model_dir, want, {"kind": "ppo"}, behaviour_logprobs=behaviour, rows=PPO_ROWS
  )
  tol = np.abs(want.advantages[PPO_ROWS]).mean() * rho.max() * bounds.lp + KL_PENALTY * bounds.kl(
    want.kl_loss
  )
  np.testing.assert_allclose(got.loss, want.loss, atol=tol, rtol=0, err_msg="loss")
  _check_grads(want, got, bounds.grad + bounds.lp)
  _kl_term_is_seen(setup, got, tol, kind="ppo", behaviour_logprobs=behaviour, rows=PPO_ROWS)


def test_bf16_reward_grad_paper(setup, tiny_model_dir, pg, bounds):
  want = _reference(setup, reward_grad="paper")
  got = _ours_bf16(setup, tiny_model_dir, want, {"reward_grad": "paper"})
  # The reward term changes the gradient well beyond bfloat16's bound, so a dropped term fails.
  base = pg[0].grads
  assert (
    max(np.linalg.norm(want.grads[k] - base[k]) / np.linalg.norm(want.grads[k]) for k in want.grads)
    > 3 * bounds.grad
  )
  scale = np.maximum(want.rewards.reshape(Q, G).std(axis=1, ddof=1), SIGMA_FLOOR).min()
  tol = (
    np.abs(want.advantages).mean() * bounds.lp
    + KL_PENALTY * bounds.kl(want.kl_loss)
    + bounds.lp / scale
  )
  np.testing.assert_allclose(got.loss, want.loss, atol=tol, rtol=0, err_msg="loss")
  _check_grads(want, got, bounds.grad)


def test_bf16_continuation_logprobs_are_float32_log_softmax(monkeypatch):
  """Under a bfloat16 model, `continuation_logprobs` is the float64 log-softmax of the float32
  logits of its own (bfloat16) predicting states: the log-probs are float32 (README), not
  bfloat16 (one rounding of |lp| ~ 6 is ~0.01)."""
  from markovian_jax.models import decoder, logprobs
  from markovian_jax.sampling import batching

  cfg = helpers.tiny_config(dtype="bfloat16", param_dtype="bfloat16")
  params32, lora = helpers.random_model(helpers.tiny_config())
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  rng = np.random.default_rng(5)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (9, 5)]
  p_tokens, p_mask = batching.pad_left(prompts, 16)
  tokens = rng.integers(3, cfg.vocab_size, (2 * G, 6)).astype(np.int32)
  mask = np.ones(tokens.shape, bool)
  mask[1, -2:] = False
  seen = {}
  project_chunks = logprobs._project_chunks  # noqa: SLF001

  def spy(config, params_, hidden, *args):
    seen["hidden"] = hidden  # the predicting states, [B, T, D]; returned by the jitted call
    return project_chunks(config, params_, hidden, *args)

  monkeypatch.setattr(logprobs, "_project_chunks", spy)

  @jax.jit
  def run(p_, l_):
    out = logprobs.continuation_logprobs(
      cfg,
      p_,
      jnp.asarray(p_tokens),
      jnp.asarray(p_mask),
      jnp.asarray(tokens),
      jnp.asarray(mask),
      lora=l_,
      temperature=TEMPERATURE,
      chunk_size=4,
    )
    return out.logprobs, seen["hidden"]

  got, hidden = map(np.asarray, run(params, lora))
  assert got.dtype == np.float32 and hidden.dtype == jnp.bfloat16
  # The float32 logits, exactly: bfloat16 products are exact in float64, sums of D = 64 of them too
  # (to 2^-52); float32 accumulation is within D ulps of that.
  w = np.asarray(decoder.head_weight(cfg, params).astype(jnp.bfloat16), np.float64)
  z = (hidden.astype(np.float64) @ w) / TEMPERATURE
  z = z - z.max(-1, keepdims=True)
  lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want = np.where(mask, np.take_along_axis(lp, tokens[..., None], -1)[..., 0], 0.0)
  # 16 float32 ulps of |lp| ~ 6 (~1e-5): a log-softmax over V = 512 in float32.
  np.testing.assert_allclose(got, want, rtol=helpers.ulps(16), atol=0)
