"""The sampler's log-probs against teacher-forced log-probs, in bfloat16.

PPO's ratio exp(lp - behaviour) and `policy/behaviour_logprob_diff_{mean,max}` compare the log-probs
the sampler returned (`SampleOutput.logprobs`, from its KV-cache decode) with the update's
teacher-forced log-probs of the same tokens (`logprobs.continuation_logprobs`: the prompt once, the
G CoTs after it). Both compute the same function; in bfloat16 they differ by rounding, because the
two programs round different intermediate values (a one-token decode step against a whole
sequence; the shared prompt's and the CoT's attention parts).

What keeps the gap at the size of the hidden states' rounding: logits come out of the head in
float32 (bfloat16 operands, float32 accumulation and result), and the softmax, log-softmax,
temperature scaling and the sampler's normaliser run in float32. Rounding the logits themselves
to bfloat16 would add up to u |z| per token (0.06 nats at |z| = 16) and turn any small difference
between the two programs' hidden states into a jump of a whole bfloat16 step of the logit.

Bound: each path's log-prob is within TOL_LP of the exact value (tests/training/test_bf16.py's
derivation: sigma_z = sqrt(K_F) u max|g| max_v ||W_v||, sigma_lp <= sqrt(2) sigma_z, TOL_LP = 4
sigma_lp), with float32 standing in for exact (its error is ~1e-6 here). The two paths round
independently, so their difference has standard deviation <= sqrt(2) sigma_lp = 2 sigma_z: every
token within 4 of those (8 sigma_z), and the mean |difference| (what behaviour_logprob_diff_mean
reports) within 2 sigma_z (the mean of |N(0, s)| is 0.8 s).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers

pytestmark = pytest.mark.slow  # two bfloat16 programs (the sampler, the teacher-forced pass)

U = 2.0**-8
LAMBDA = 4.0
G, K, TEMPERATURE = 4, 12, 0.7
PROMPTS = [[1, 17, 250, 3, 99, 41, 7], [1, 400, 12, 5]]


def _sigma_z(config, params) -> float:
  """sqrt(K_F) u max|g| max_v ||W_v||: the logits' rounding scale (tests/training/test_bf16.py)."""
  from markovian_jax.models import decoder

  head = np.asarray(decoder.head_weight(config, params), np.float32)  # [D, V]
  g = np.asarray(params["final_norm"]["scale"], np.float32)
  k_f = 22 * config.num_layers + 1
  return float(np.sqrt(k_f) * U * np.abs(g).max() * np.linalg.norm(head, axis=0).max())


def test_bf16_sampler_logprobs_match_teacher_forcing():
  from markovian_jax.models import decoder, logprobs
  from markovian_jax.sampling import batching, generate_with_reference

  cfg32 = helpers.tiny_config()
  params32, lora = helpers.random_model(cfg32)
  cfg = cfg32.replace(dtype="bfloat16", param_dtype="bfloat16")
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  exact = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # the same weights, in float32

  # The trainer's rollout: G samples per prompt at T with the LoRA, the base's CoT' alongside.
  out, _ = generate_with_reference(
    cfg,
    params,
    PROMPTS,
    lora=lora,
    max_new_tokens=K,
    min_new_tokens=K,
    rng=3,
    temperature=TEMPERATURE,
    num_samples=G,
    eos_ids=(2,),
  )
  assert out.logprobs.dtype == jnp.float32
  # The head's output is float32 in a bfloat16 model: bfloat16 operands, float32 accumulation and
  # result, no bfloat16 rounding (which on this model's logits, |z| < 1, would hide far below the
  # bounds further down). Against float64 on the same bfloat16 operands (exact products): a float32
  # dot product of D terms is within D ulps of sum |h_i W_iv| (Higham's gamma_D); one bfloat16
  # rounding of z is 2^-9 |z|, ~2^-12 of that sum here.
  h = jnp.asarray(np.random.default_rng(0).normal(size=(16, cfg.hidden_size)), jnp.bfloat16)
  z = decoder.project(cfg, params, h)
  assert z.dtype == jnp.float32
  h64 = np.asarray(h, np.float64)
  w64 = np.asarray(decoder.head_weight(cfg, params), np.float64)
  bound = helpers.ulps(cfg.hidden_size) * (np.abs(h64) @ np.abs(w64))
  np.testing.assert_array_less(np.abs(np.asarray(z, np.float64) - h64 @ w64), bound)
  sampled = np.asarray(out.logprobs)

  p_tokens, p_mask = batching.pad_left(PROMPTS, batching.bucket(max(map(len, PROMPTS)), 8))

  def teacher_forced(c, p):
    return np.asarray(
      jax.jit(
        lambda p_, l_: (
          logprobs.continuation_logprobs(
            c,
            p_,
            jnp.asarray(p_tokens),
            jnp.asarray(p_mask),
            out.tokens,
            jnp.ones(out.tokens.shape, bool),
            lora=l_,
            temperature=TEMPERATURE,
          ).logprobs
        )
      )(p, lora)
    )

  forced = teacher_forced(cfg, params)
  want = teacher_forced(cfg32, exact)
  sigma_z = _sigma_z(cfg32, exact)
  tol_lp = LAMBDA * np.sqrt(2) * sigma_z
  assert tol_lp < 0.05  # a bound this loose would check nothing

  np.testing.assert_allclose(forced, want, atol=tol_lp, rtol=0, err_msg="teacher-forced bf16")
  np.testing.assert_allclose(sampled, want, atol=tol_lp, rtol=0, err_msg="sampler bf16")
  gap = np.abs(sampled - forced)
  assert gap.max() <= LAMBDA * 2 * sigma_z, gap.max()
  assert gap.mean() <= 2 * sigma_z, gap.mean()
  # bfloat16 rounding is visible (a float32 model in disguise would agree to ~1e-6) ...
  assert np.abs(forced - want).max() > 1e-4
  # ... and far below what a temperature slip would cost (the T = 1 log-probs of the same tokens).
  at_one = np.asarray(
    logprobs.continuation_logprobs(
      cfg32,
      exact,
      jnp.asarray(p_tokens),
      jnp.asarray(p_mask),
      out.tokens,
      jnp.ones(out.tokens.shape, bool),
      lora=lora,
      temperature=1.0,
    ).logprobs
  )
  assert np.abs(at_one - want).mean() > 10 * gap.mean()
