"""Objectives against independent numpy re-derivations (fixed seeds) and analytic gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from markovian_jax import objectives as ob
from markovian_jax.models import logprobs as lp_lib

EPS = 1e-8


def _rng(seed):
  return np.random.default_rng(seed)


def _mask(rng, n, t, p=0.7):
  m = rng.random((n, t)) < p
  m[:, 0] = True  # every row has a valid token
  return m


# ----------------------------------------------------------------------------- numpy references


def np_reduce(x, m, how):
  out = []
  for row, mrow in zip(x, m):
    vals = [v for v, keep in zip(row, mrow) if keep]
    out.append(sum(vals) / max(len(vals), 1) if how == "mean" else sum(vals))
  return np.array(out)


def np_aggregate(x, m, mode, how, active=None):
  active = np.ones(len(x), bool) if active is None else active
  if not active.any():
    return 0.0
  if mode == "sequence_mean" or how == "sum":
    return float(np.mean(np_reduce(x, m, how)[active]))
  sel = m & active[:, None]
  return float(np.sum(np.where(sel, x, 0.0)) / sel.sum())


def np_reward(lp, m, how, kind):
  """The three reward kinds, row by row over the valid answer tokens (0 for an empty span)."""
  if kind == "logprob":
    return np_reduce(lp, m, how)
  out = []
  for row, mrow in zip(lp, m):
    vals = np.array([v for v, keep in zip(row, mrow) if keep])
    if not vals.size:
      out.append(0.0)
    elif kind == "prob":
      out.append(np.exp(vals.mean()))
    else:
      out.append(np.exp(vals).mean())
  return np.array(out)


def np_rloo_adv(r, g):
  """A_i = R_i - mean of the other G-1 rewards of its group, written as a loop."""
  out = np.empty_like(r)
  for i in range(len(r)):
    q = i // g
    others = [r[j] for j in range(q * g, (q + 1) * g) if j != i]
    out[i] = r[i] - np.mean(others)
  return out


def np_group_adv(r, g):
  out = np.empty_like(r)
  for q in range(len(r) // g):
    grp = r[q * g : (q + 1) * g]
    out[q * g : (q + 1) * g] = (grp - grp.mean()) / (np.std(grp, ddof=1) + EPS)
  return out


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- reductions


def test_reduce_tokens_and_aggregate_match_numpy():
  rng = _rng(0)
  x = rng.normal(size=(6, 7)).astype(np.float32)
  m = _mask(rng, 6, 7)
  poisoned = np.where(m, x, np.nan)  # masked entries must be selected away, not multiplied by 0
  poisoned[~m & (rng.random(m.shape) < 0.5)] = -np.inf
  active = np.array([True, False, True, True, False, True])
  for how in ("mean", "sum"):
    np.testing.assert_allclose(ob.reduce_tokens(poisoned, m, how), np_reduce(x, m, how), rtol=1e-6)
    for mode in ("sequence_mean", "token_mean"):
      for act in (None, active):
        got = float(ob.aggregate(poisoned, m, mode, how, act))
        assert np.isfinite(got)
        np.testing.assert_allclose(got, np_aggregate(x, m, mode, how, act), rtol=1e-6)
  # Empty selection (expert iteration kept nothing) is a zero loss, not a NaN.
  assert float(ob.aggregate(x, m, "token_mean", "mean", np.zeros(6, bool))) == 0.0
  assert float(ob.aggregate(x, m, "sequence_mean", "mean", np.zeros(6, bool))) == 0.0
  with pytest.raises(ValueError, match="loss aggregation"):
    ob.aggregate(x, m, "batch_mean")
  with pytest.raises(ValueError, match="reduction"):
    ob.reduce_tokens(x, m, "max")


def test_answer_reward_and_normalization():
  rng = _rng(1)
  lp = -rng.random((6, 4)).astype(np.float32)
  am = _mask(rng, 6, 4)
  r = ob.answer_reward(lp, am, "mean")
  np.testing.assert_allclose(r, np_reduce(lp, am, "mean"), rtol=1e-6)
  b = np.array([-0.3, -0.9], np.float32)  # per question, G = 3
  np.testing.assert_allclose(
    ob.normalized_reward(r, b, True, 3), np.asarray(r) - np.repeat(b, 3), rtol=1e-6
  )
  np.testing.assert_allclose(
    ob.normalized_reward(r, np.repeat(b, 3), True, 3), np.asarray(r) - np.repeat(b, 3), rtol=1e-6
  )
  np.testing.assert_array_equal(ob.normalized_reward(r, None, False), r)
  with pytest.raises(ValueError, match="baseline_scores"):
    ob.normalized_reward(r, None, True, 3)
  with pytest.raises(ValueError, match="match neither"):
    ob.normalized_reward(r, np.zeros(4), True, 3)


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_unbiased_std():
  rng = _rng(2)
  q, g = 5, 6
  r = rng.normal(size=q * g).astype(np.float32) * 3 + 1
  r[g : 2 * g] = 0.25  # a group with no signal
  expected = np_group_adv(r.astype(np.float64), g)
  np.testing.assert_allclose(ob.group_advantages(r, g), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    ob.group_advantages(r.reshape(q, g)), expected.reshape(q, g), rtol=1e-5, atol=1e-6
  )
  assert np.all(np.asarray(ob.group_advantages(r, g))[g : 2 * g] == 0)
  # Each group is standardised with the unbiased std: sum A^2 = G - 1 (not G).
  a = np.asarray(ob.group_advantages(r, g)).reshape(q, g)
  np.testing.assert_allclose((a**2).sum(1)[[0, 2, 3, 4]], g - 1, rtol=1e-5)
  with pytest.raises(ValueError, match="at least 2"):
    ob.group_advantages(r, 1)
  with pytest.raises(ValueError, match="groups of 7"):
    ob.group_advantages(r, 7)
  with pytest.raises(ValueError, match="group size 4"):
    ob.group_advantages(r.reshape(q, g), 4)


def np_ema(history, decay=0.9):
  """The reference's exponential_weighted_average: sum_j w_j x_j / sum_j w_j, w_j = decay^(n-1-j)
  over the flattened per-example history x (float64)."""
  x = np.concatenate([np.ravel(h) for h in history]).astype(np.float64)
  w = decay ** np.arange(x.size - 1, -1, -1, dtype=np.float64)
  return float(np.dot(w, x) / w.sum())


def test_ema_baseline_weighs_every_example():
  """`ema`: V = the weighted average of the flattened per-example history (decay per example);
  no baseline on step 0; the state is jit-compiled once for its static shapes."""
  rng = _rng(3)
  decay = 0.9
  batches = [rng.normal(loc=0.2 * i, size=12).astype(np.float32) for i in range(7)]
  update = jax.jit(ob.ema_update, static_argnums=2)
  state = ob.EmaState.init()
  for i, rewards in enumerate(batches):
    expected_adv = rewards - (np_ema(batches[:i], decay) if i else 0.0)
    np.testing.assert_allclose(
      ob.ema_advantages(rewards, state), expected_adv, rtol=1e-5, atol=1e-6
    )
    state = update(state, rewards, decay)
    # float32 sums of terms as large as |R|: a few ulps of the weighted mean of |R|.
    ulp = np.finfo(np.float32).eps * np_ema(np.abs(batches[: i + 1]), decay)
    np.testing.assert_allclose(
      float(state.value), np_ema(batches[: i + 1], decay), rtol=0, atol=16 * ulp
    )
    if i == 3:  # a resume mid-run: the checkpoint's JSON carries the whole history
      state = ob.BaselineState.from_json(ob.BaselineState(state, ob.EiStats.init()).to_json()).ema
  assert update._cache_size() == 1
  n = sum(b.size for b in batches)
  np.testing.assert_allclose(float(state.weight), (1 - decay**n) / (1 - decay), rtol=1e-6)
  # [Q, G] rewards enter in row order, as the flat [Q*G] rows.
  grid = ob.ema_update(ob.EmaState.init(), batches[0].reshape(3, 4), decay)
  assert grid == ob.ema_update(ob.EmaState.init(), batches[0], decay)


def test_ema_baseline_follows_a_reward_jump_within_a_step():
  """Ten steps of 12 rewards at 0, then one at 5: the last step carries 1 - 0.9^12 = 72% of the
  weight, so V = 5 * 0.718 / (1 - 0.9^132) = 3.59 (hand-computed); the per-step `ema_batch` gives
  5 / sum_{k<=10} 0.9^k = 0.73."""
  zeros, fives = np.zeros(12, np.float32), np.full(12, 5.0, np.float32)
  state = batch_state = ob.EmaState.init()
  for rewards in [zeros] * 10 + [fives]:
    state = ob.ema_update(state, rewards)
    batch_state = ob.ema_batch_update(batch_state, rewards.mean())
  np.testing.assert_allclose(float(state.value), 5 * (1 - 0.9**12) / (1 - 0.9**132), rtol=1e-6)
  assert 3.58 < float(state.value) < 3.60
  np.testing.assert_allclose(
    float(batch_state.value), 5 / sum(0.9**k for k in range(11)), rtol=1e-6
  )
  cfg = ob.ObjectiveConfig(baseline="ema", group_size=1)
  _, carried, metrics = ob.BASELINE_REGISTRY.lookup("ema")(fives, state, cfg)
  np.testing.assert_allclose(float(metrics["ema_baseline"]), float(state.value))
  np.testing.assert_allclose(float(carried.value), np_ema([zeros] * 10 + [fives] * 2), rtol=1e-6)


def test_ema_batch_baseline_sequence():
  """`ema_batch`: V_n = sum_j r^(n-j) m_j / sum_j r^(n-j) over past batch means; no baseline on
  batch 0."""
  rng = _rng(3)
  decay = 0.9
  batches = [rng.normal(loc=0.2 * i, size=4).astype(np.float32) for i in range(7)]
  update = jax.jit(ob.ema_batch_update, static_argnums=2)
  state, means = ob.EmaState.init(), []
  for i, rewards in enumerate(batches):
    if i == 0:
      expected_adv = rewards
    else:
      w = decay ** np.arange(i, 0, -1)  # batch j of i past ones weighs decay^(i-j)
      expected_adv = rewards - np.dot(w, means) / w.sum()
    np.testing.assert_allclose(
      ob.ema_advantages(rewards, state), expected_adv, rtol=1e-5, atol=1e-6
    )
    means.append(float(np.mean(rewards)))
    state = update(state, jnp.mean(rewards), decay)
  w = decay ** np.arange(len(means) - 1, -1, -1)
  np.testing.assert_allclose(float(state.value), np.dot(w, means) / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(state.weight), w.sum(), rtol=1e-6)


def test_expert_iteration_mask_and_running_stats():
  rng = _rng(4)
  k, skip = 0.5, 3
  stats, history = ob.EiStats.init(), []
  update = jax.jit(ob.ei_update)
  kept_any = False
  for i in range(12):
    rewards = rng.normal(loc=0.1 * i, scale=1.0 + 0.1 * i, size=6).astype(np.float32)
    if i < skip:
      threshold = np.inf
    else:
      h = np.concatenate(history)
      threshold = h.mean() + k * h.std()  # population std, as the reference's np.std
      np.testing.assert_allclose(float(ob.ei_threshold(stats, k, skip)), threshold, rtol=1e-5)
    mask = np.asarray(ob.ei_mask(rewards, stats, k, skip))
    np.testing.assert_array_equal(mask, rewards > threshold)
    kept_any |= mask.any()
    history.append(rewards)
    stats = update(stats, rewards)
  assert kept_any
  h = np.concatenate(history)
  assert int(stats.count) == h.size and int(stats.batches) == 12
  np.testing.assert_allclose(float(stats.mean), h.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(stats.m2) / h.size, h.var(), rtol=1e-5)
  # No history at all: nothing is kept even without a warm-up.
  assert not np.asarray(ob.ei_mask(np.array([1e9], np.float32), ob.EiStats.init(), -5.0, 0)).any()


def test_baseline_state_json_roundtrip():
  state = ob.BaselineState(
    ob.ema_update(ob.EmaState.init(), np.array([0.5, 0.25]), 0.9),
    ob.ei_update(ob.EiStats.init(), np.array([1.0, 2.0, 4.0])),
  )
  d = state.to_json()
  back = ob.BaselineState.from_json(d)
  assert back.to_json() == d
  assert back.ei.count.dtype == jnp.int32 and back.ema.value.dtype == jnp.float32
  with pytest.raises(ValueError, match="ei_m2"):
    ob.BaselineState.from_json({k: v for k, v in d.items() if k != "ei_m2"})


# ----------------------------------------------------------------------------- policy terms


def test_pg_loss_value_and_gradient():
  rng = _rng(5)
  n, k = 6, 5
  lp = (rng.normal(size=(n, k)) - 2).astype(np.float32)
  m = _mask(rng, n, k)
  adv = rng.normal(size=n).astype(np.float32)
  counts = m.sum(1)
  for how, per_tok_weight in (("mean", 1.0 / counts), ("sum", np.ones(n))):
    f = lambda x, how=how: ob.aggregate(ob.pg_per_token(x, adv), m, "sequence_mean", how)  # noqa
    expected = -np.mean(np_reduce(lp, m, how) * adv)
    np.testing.assert_allclose(float(f(lp)), expected, rtol=1e-5)
    grad = np.asarray(jax.grad(f)(lp))
    np.testing.assert_allclose(
      grad, np.where(m, (-adv * per_tok_weight / n)[:, None], 0.0), rtol=1e-5, atol=1e-8
    )
  # The advantage is a constant of the loss.
  g_adv = jax.grad(lambda a: ob.aggregate(ob.pg_per_token(lp, a), m))(adv)
  assert np.all(np.asarray(g_adv) == 0)


def test_ppo_clipping_gradient_regions():
  rng = _rng(6)
  n, k, eps = 8, 12, 0.2
  adv = np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * (0.5 + rng.random(n))
  # Ratios spread over [0.5, 1.6], away from the clip boundaries.
  ratio = rng.choice([0.5, 0.7, 0.85, 0.95, 1.0, 1.05, 1.15, 1.3, 1.6], size=(n, k))
  old = (rng.normal(size=(n, k)) - 2).astype(np.float32)
  lp = (old + np.log(ratio)).astype(np.float32)
  adv = adv.astype(np.float32)
  mask = np.ones((n, k), bool)

  def loss(x):
    tok, _, _ = ob.ppo_per_token(x, old, adv, eps)
    return ob.aggregate(tok, mask, "token_mean", "mean")

  rho = np.exp(lp.astype(np.float64) - old)
  a = adv[:, None].astype(np.float64)
  expected = np.maximum(-rho * a, -np.clip(rho, 1 - eps, 1 + eps) * a)
  np.testing.assert_allclose(float(loss(lp)), expected.mean(), rtol=1e-5)

  grad = np.asarray(jax.grad(loss)(lp))
  cut = ((a > 0) & (rho > 1 + eps)) | ((a < 0) & (rho < 1 - eps))
  assert cut.any() and (~cut).any()
  assert np.all(grad[cut] == 0.0)
  assert np.all(grad[~cut] != 0.0)
  # Inside (or on the unclipped side) d/dlp of -rho*A is -rho*A, over N*K tokens.
  np.testing.assert_allclose(grad[~cut], (-rho * a / (n * k))[~cut], rtol=1e-5)
  # A > 0 with a small ratio (and A < 0 with a large one) keep their gradient: PPO only stops
  # pushing further in the advantage's direction.
  assert (((a > 0) & (rho < 1 - eps)) & ~cut).any()

  _, r, clipped = ob.ppo_per_token(lp, old, adv, eps)
  np.testing.assert_array_equal(np.asarray(clipped), cut)
  np.testing.assert_allclose(np.asarray(r), rho, rtol=1e-5)


def test_ppo_log_ratio_clamp_keeps_values_finite():
  lp = np.array([[0.0, -1.0]], np.float32)
  old = np.array([[-200.0, -1.0]], np.float32)
  tok, ratio, _ = ob.ppo_per_token(lp, old, np.array([-1.0], np.float32), 0.2, 20.0)
  np.testing.assert_allclose(np.asarray(ratio), [[np.exp(20.0), 1.0]], rtol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(ob.ppo_per_token(x, old, np.array([-1.0]), 0.2, 20.0)[0]))(lp)
  assert np.all(np.isfinite(np.asarray(tok))) and np.asarray(grad)[0, 0] == 0.0


# ----------------------------------------------------------------------------- KL estimators


def test_sampled_estimators_are_unbiased_for_full_kl():
  """k1 and k3 averaged over x ~ p approach the exact KL; k3 >= 0 on every sample."""
  rng = _rng(8)
  v, n = 7, 200_000
  lp = np_log_softmax(rng.normal(size=v) * 1.2)
  lq = np_log_softmax(rng.normal(size=v) * 1.2)
  exact = float(np.sum(np.exp(lp) * (lp - lq)))
  x = rng.choice(v, size=n, p=np.exp(lp))
  s_lp = lp[x].reshape(200, -1).astype(np.float32)
  s_lq = lq[x].reshape(200, -1).astype(np.float32)
  np.testing.assert_allclose(float(lp_lib.full_kl(lp[None], lq[None])[0]), exact, rtol=1e-5)
  for est in ("k1", "k3"):
    vals = np.asarray(ob.kl_estimate(s_lp, s_lq, est, clamp=None), np.float64)
    se = vals.std() / np.sqrt(n)
    assert abs(vals.mean() - exact) < 4 * se, (est, vals.mean(), exact, se)
  k3 = np.asarray(ob.kl_estimate(s_lp, s_lq, "k3"))
  assert np.all(k3 >= 0)
  assert np.all(np.asarray(ob.kl_estimate(s_lp, s_lq, "k2")) >= 0)
  # k3 has less variance than k1 here (the reason it exists).
  assert k3.std() < np.asarray(ob.kl_estimate(s_lp, s_lq, "k1")).std()


def test_estimator_gradients_in_expectation():
  """E_p[grad k1] = 0, E_p[grad k2] = grad KL(p||q), E_p[grad k3] = grad KL(q||p) (exact sums)."""
  rng = _rng(9)
  v = 6
  theta = rng.normal(size=v)
  lq = np_log_softmax(rng.normal(size=v))
  p = np.exp(np_log_softmax(theta))
  q = np.exp(lq)
  kl_pq = np.sum(p * (np.log(p) - lq))
  expected = {"k1": np.zeros(v), "k2": p * ((np.log(p) - lq) - kl_pq), "k3": p - q}
  for est, want in expected.items():

    def expected_estimate(t, est=est):
      logp = jax.nn.log_softmax(t)
      per_x = ob.kl_estimate(logp[None], jnp.asarray(lq, jnp.float32)[None], est, None)[0]
      return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp)) * per_x)

    got = jax.grad(expected_estimate)(theta.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, err_msg=est)


def test_kl_clamp_bounds_k3():
  lp = np.array([[-100.0, -1.0]], np.float32)
  lq = np.array([[-0.1, -1.0]], np.float32)
  clamped = np.asarray(ob.kl_estimate(lp, lq, "k3", clamp=20.0))
  np.testing.assert_allclose(clamped[0, 0], np.exp(20.0) - 21.0, rtol=1e-5)
  assert clamped[0, 1] == 0.0
  assert not np.isfinite(np.asarray(ob.kl_estimate(lp, lq, "k3", clamp=None))[0, 0])


# ----------------------------------------------------------------------------- the whole loss

Q, G, K, A = 2, 4, 6, 3
N = Q * G


def _inputs(seed, full_mask=False):
  rng = _rng(seed)
  cot_mask = np.ones((N, K), bool) if full_mask else _mask(rng, N, K, 0.8)
  behaviour = (rng.normal(size=(N, K)) - 2).astype(np.float32)
  return dict(
    cot_logprobs=(behaviour + rng.normal(scale=0.15, size=(N, K))).astype(np.float32),
    cot_mask=cot_mask,
    answer_logprobs=(-2 * rng.random((N, A))).astype(np.float32),
    answer_mask=_mask(rng, N, A, 0.8),
    behaviour_logprobs=behaviour,
    ref_logprobs=(behaviour + rng.normal(scale=0.3, size=(N, K))).astype(np.float32),
    kl=(0.2 * rng.random((N, K))).astype(np.float32),
    entropy=(1 + rng.random((N, K))).astype(np.float32),
    baseline_scores=(-rng.random(Q)).astype(np.float32),
  )


def np_markovian_loss(d, cfg, ema_v=None, ei_hist=None):
  """The objective written out directly in numpy (float64)."""
  d = {k: np.asarray(v, np.float64) if v.dtype != bool else v for k, v in d.items()}
  how, mode, m = cfg.logprob_reduction, cfg.loss_aggregation, d["cot_mask"]
  r = np_reward(d["answer_logprobs"], d["answer_mask"], how, cfg.reward_kind)
  big_r = r - np.repeat(d["baseline_scores"], G) if cfg.normalize_reward else r
  if cfg.baseline == "group":
    adv = np_group_adv(big_r, G)
  elif cfg.baseline == "rloo":
    adv = np_rloo_adv(big_r, G)
  elif cfg.baseline == "ema":
    adv = big_r - (ema_v if ema_v is not None else 0.0)
  else:
    adv = big_r
  if cfg.ei_std is None:
    active = np.ones(N, bool)
  else:
    h = np.concatenate(ei_hist)
    active = big_r > h.mean() + cfg.ei_std * h.std()
  lp = d["cot_logprobs"]
  if cfg.kind == "pg":
    tok = -lp * adv[:, None]
  else:
    rho = np.exp(lp - d["behaviour_logprobs"])
    tok = np.maximum(
      -rho * adv[:, None], -np.clip(rho, 1 - cfg.ppo_eps, 1 + cfg.ppo_eps) * adv[:, None]
    )
  if cfg.kl_estimator == "full":
    kl = d["kl"]
  else:
    dlt = lp - d["ref_logprobs"]
    kl = {"k1": dlt, "k2": 0.5 * dlt**2, "k3": np.exp(-dlt) + dlt - 1}[cfg.kl_estimator]
  loss = (
    np_aggregate(tok, m, mode, how, active)
    + cfg.kl_penalty * np_aggregate(kl, m, mode, how, active)
    - cfg.entropy_bonus * np_aggregate(d["entropy"], m, mode, how, active)
  )
  if cfg.reward_grad == "paper":
    groups = r.reshape(Q, G)
    mu = np.repeat(groups.mean(1), G)
    sigma = np.repeat(np.maximum(groups.std(1, ddof=1), cfg.reward_sigma_floor), G) + EPS
    loss -= cfg.actor_reward_weight * np.mean(((r - mu) / sigma)[active])
  return loss, dict(adv=adv, active=active, r=r, big_r=big_r, kl=kl)


CASES = {
  "reference_default": dict(group_size=G),
  "ppo_k3_sum_token_mean_entropy": dict(
    group_size=G,
    kind="ppo",
    kl_estimator="k3",
    logprob_reduction="sum",
    loss_aggregation="token_mean",
    entropy_bonus=0.05,
  ),
  "pg_k1_ema_paper": dict(
    group_size=G, kl_estimator="k1", baseline="ema", reward_grad="paper", actor_reward_weight=0.5
  ),
  "ppo_k2_none_unnormalized_ei": dict(
    group_size=G,
    kind="ppo",
    kl_estimator="k2",
    baseline="none",
    normalize_reward=False,
    ei_std=0.0,
    ei_skip_initial=1,
  ),
  "pg_rloo_prob_paper_ei": dict(
    group_size=G,
    baseline="rloo",
    reward_kind="prob",
    reward_grad="paper",
    ei_std=2.2,
    ei_skip_initial=1,
  ),
  "ppo_rloo_mean_token_prob_k3": dict(
    group_size=G, kind="ppo", baseline="rloo", reward_kind="mean_token_prob", kl_estimator="k3"
  ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_markovian_loss_matches_numpy(name):
  cfg = ob.ObjectiveConfig(**CASES[name])
  d = _inputs(10)
  rng = _rng(11)
  history = [rng.normal(loc=-0.5, size=N)]
  state = ob.BaselineState(
    ob.ema_update(ob.EmaState.init(), history[0], cfg.ema_decay),
    ob.ei_update(ob.EiStats.init(), history[0]),
  )
  loss, (metrics, new_state) = jax.jit(ob.markovian_loss, static_argnums=1)(
    ob.LossInputs(**d), cfg, state
  )
  want, parts = np_markovian_loss(d, cfg, ema_v=np_ema(history, cfg.ema_decay), ei_hist=history)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5, atol=1e-6)
  adv = parts["adv"]
  np.testing.assert_allclose(float(metrics["advantage_mean"]), adv.mean(), atol=1e-5)
  np.testing.assert_allclose(float(metrics["advantage_std"]), adv.std(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["advantage_min"]), adv.min(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["advantage_max"]), adv.max(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["reward_mean"]), parts["r"].mean(), rtol=1e-5)
  np.testing.assert_allclose(
    float(metrics["normalized_reward_mean"]), parts["big_r"].mean(), rtol=1e-5
  )
  if cfg.ei_std is None:
    assert "active_fraction" not in metrics and "ei_threshold" not in metrics
  else:
    np.testing.assert_allclose(float(metrics["active_fraction"]), parts["active"].mean())
  np.testing.assert_allclose(
    float(metrics["kl"]),
    np_aggregate(parts["kl"], d["cot_mask"], cfg.loss_aggregation, cfg.logprob_reduction),
    rtol=1e-5,
  )
  if cfg.kind == "ppo":
    rho = np.exp(d["cot_logprobs"].astype(np.float64) - d["behaviour_logprobs"])[d["cot_mask"]]
    np.testing.assert_allclose(float(metrics["ppo_ratio_mean"]), rho.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ppo_ratio_max"]), rho.max(), rtol=1e-5)
    # The collapse guard's quantity: each sequence's geometric-mean token ratio, its maximum.
    seq = np.exp(
      np_reduce(
        d["cot_logprobs"].astype(np.float64) - d["behaviour_logprobs"], d["cot_mask"], "mean"
      )
    )
    np.testing.assert_allclose(float(metrics["ppo_seq_ratio_max"]), seq.max(), rtol=1e-5)
    assert 0 <= float(metrics["ppo_clip_fraction"]) <= 1
  if cfg.baseline == "ema":
    np.testing.assert_allclose(
      float(new_state.ema.value), np_ema(history + [parts["big_r"]], cfg.ema_decay), rtol=1e-5
    )
  if cfg.ei_std is not None:
    assert 0 < parts["active"].sum() < N  # the case exercises a real selection
    assert int(new_state.ei.count) == 2 * N and int(new_state.ei.batches) == 2
  else:
    assert int(new_state.ei.count) == N  # untouched when expert iteration is off


def test_sum_reduction_is_k_times_mean_on_full_masks():
  d = _inputs(12, full_mask=True)
  d["answer_mask"] = np.ones((N, A), bool)
  targets = ob.Targets(
    np.linspace(-1, 1, N).astype(np.float32),
    np.ones(N, bool),
    np.zeros(N, np.float32),
    np.ones(N, np.float32),
  )
  base = dict(group_size=G, kl_estimator="k3", entropy_bonus=0.1)
  mean, _ = ob.loss_from_targets(ob.LossInputs(**d), targets, ob.ObjectiveConfig(**base))
  total, _ = ob.loss_from_targets(
    ob.LossInputs(**d), targets, ob.ObjectiveConfig(logprob_reduction="sum", **base)
  )
  np.testing.assert_allclose(float(total), K * float(mean), rtol=1e-5)


def test_ppo_base_variant_reproduces_reference():
  """Per-sequence geometric-mean ratio vs the base; every other term dropped (incl. KL)."""
  d = _inputs(13)
  d["kl"] = np.full((N, K), 50.0, np.float32)  # would dominate if the KL were kept
  cfg = ob.ObjectiveConfig(group_size=G, kind="ppo", ppo_ratio_reference="base")
  loss, (metrics, _) = ob.markovian_loss(ob.LossInputs(**d), cfg)
  m = d["cot_mask"]
  r = np_reduce(d["answer_logprobs"], d["answer_mask"], "mean") - np.repeat(d["baseline_scores"], G)
  adv = np_group_adv(r, G)
  rho = np.exp(np_reduce(d["cot_logprobs"], m, "mean") - np_reduce(d["ref_logprobs"], m, "mean"))
  want = np.mean(np.maximum(-rho * adv, -np.clip(rho, 0.8, 1.2) * adv))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ppo_ratio_max"]), rho.max(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ppo_seq_ratio_max"]), rho.max(), rtol=1e-5)


def _answer_grad(cfg, d, state=None):
  def f(answer_logprobs):
    return ob.markovian_loss(
      ob.LossInputs(**{**d, "answer_logprobs": answer_logprobs}), cfg, state
    )[0]

  return np.asarray(jax.grad(f)(d["answer_logprobs"]))


@pytest.mark.parametrize(
  "case", [dict(), dict(kind="ppo"), dict(baseline="ema", ei_std=0.0, ei_skip_initial=0)]
)
def test_reward_grad_none_gives_exactly_zero_answer_gradient(case):
  d = _inputs(14)
  cfg = ob.ObjectiveConfig(group_size=G, **case)
  state = ob.BaselineState(
    ob.ema_update(ob.EmaState.init(), np.full(3, -1.0)),
    ob.ei_update(ob.EiStats.init(), np.linspace(-3, 0, 9)),
  )
  assert np.all(_answer_grad(cfg, d, state) == 0.0)
  assert np.any(
    _answer_grad(ob.ObjectiveConfig(group_size=G, reward_grad="paper", **case), d, state) != 0.0
  )


def test_reward_grad_paper_matches_finite_difference():
  """d loss / d answer_logprobs = central finite difference (float64) of the same surrogate.

  The surrogate's stop-gradients (A, mu, sigma) are the step's Targets, computed once; the finite
  difference perturbs the answer log-probs with them held fixed, which is what stop_gradient means.
  (Differencing `markovian_loss` itself would move mu too, and sum_i (r_i - mu) is identically 0.)
  """
  with jax.enable_x64(True):
    d = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in _inputs(15).items()}
    w, floor = 0.7, 0.05
    cfg = ob.ObjectiveConfig(
      group_size=G,
      reward_grad="paper",
      actor_reward_weight=w,
      reward_sigma_floor=floor,
      kl_estimator="k3",
    )
    r = ob.answer_reward(d["answer_logprobs"], d["answer_mask"], "mean")
    targets, _, _ = ob.advantage_targets(r, d["baseline_scores"], cfg)
    assert targets.reward_scale.dtype == jnp.float64

    @jax.jit
    def f(a):
      return ob.loss_from_targets(ob.LossInputs(**{**d, "answer_logprobs": a}), targets, cfg)[0]

    a0 = d["answer_logprobs"]
    grad = np.asarray(jax.grad(f)(a0))
    h, fd = 1e-5, np.zeros_like(a0)
    for i in range(N):
      for j in range(A):
        e = np.zeros_like(a0)
        e[i, j] = h
        fd[i, j] = (float(f(a0 + e)) - float(f(a0 - e))) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)
    # And the closed form: -w / (N * max(sigma_g, floor)) per answer, spread over its tokens.
    groups = np_reduce(a0, d["answer_mask"], "mean").reshape(Q, G)
    scale = np.repeat(np.maximum(groups.std(1, ddof=1), floor), G) + EPS
    want = -w / (N * scale[:, None] * d["answer_mask"].sum(1, keepdims=True))
    np.testing.assert_allclose(grad, np.where(d["answer_mask"], want, 0.0), rtol=1e-10)


def test_reward_sigma_floor_bounds_the_reward_gradient():
  d = _inputs(16)
  d["answer_logprobs"] = np.full((N, A), -0.5, np.float32)
  d["answer_logprobs"][:, 0] += np.linspace(0, 1e-6, N, dtype=np.float32)  # sigma ~ 1e-7
  cfg = ob.ObjectiveConfig(group_size=G, reward_grad="paper", reward_sigma_floor=0.1)
  grad = _answer_grad(cfg, d)
  bound = 1.0 / (N * 0.1)
  assert np.all(np.abs(grad) <= bound * (1 + 1e-5)) and np.any(grad != 0)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(kind="sft"), "objective kind"),
    (dict(baseline="loo"), "baseline"),
    (dict(logprob_reduction="max"), "logprob_reduction"),
    (dict(loss_aggregation="batch"), "loss_aggregation"),
    (dict(reward_grad="full"), "reward_grad"),
    (dict(ppo_ratio_reference="old"), "ppo_ratio_reference"),
    (dict(ppo_eps=1.5), "ppo_eps"),
    (dict(kl_penalty=-0.1), "kl_penalty"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(baseline="rloo", group_size=1), "group_size"),
    (dict(baseline="ema", reward_grad="paper", group_size=1), "group_size"),
    (dict(reward_kind="likelihood"), "reward_kind"),
    (dict(group_size=1), "group_size"),
    (dict(kl_clamp=0.0), "kl_clamp"),
    (dict(entropy_bonus=float("nan")), "entropy_bonus"),
    (dict(ei_std=float("inf")), "ei_std"),
  ],
)
def test_config_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ob.ObjectiveConfig(**kwargs)


@pytest.mark.parametrize(
  "cfg_kwargs, drop, match",
  [
    (dict(), "kl", "LossInputs.kl"),
    (dict(kl_estimator="k3"), "ref_logprobs", "LossInputs.ref_logprobs"),
    (dict(kind="ppo"), "behaviour_logprobs", "LossInputs.behaviour_logprobs"),
    (dict(entropy_bonus=0.1), "entropy", "LossInputs.entropy"),
    (dict(), "baseline_scores", "baseline_scores"),
  ],
)
def test_missing_inputs_are_named(cfg_kwargs, drop, match):
  d = _inputs(17)
  d[drop] = None
  with pytest.raises(ValueError, match=match):
    ob.markovian_loss(ob.LossInputs(**d), ob.ObjectiveConfig(group_size=G, **cfg_kwargs))


def test_shape_errors_are_named():
  d = _inputs(18)
  with pytest.raises(ValueError, match="behaviour_logprobs has shape"):
    ob.markovian_loss(
      ob.LossInputs(**{**d, "behaviour_logprobs": d["behaviour_logprobs"][:, 1:]}),
      ob.ObjectiveConfig(group_size=G, kind="ppo"),
    )
  with pytest.raises(ValueError, match="groups of 3"):
    ob.markovian_loss(ob.LossInputs(**d), ob.ObjectiveConfig(group_size=3))


def test_from_run_config():
  """The run config's objective section (read by specs) gives these defaults."""
  from markovian_jax.configs import base
  from markovian_jax.training import config_validation

  c = base.get_config("gsm8k")
  cfg = config_validation.validate(c).objective.loss
  assert cfg == ob.ObjectiveConfig(group_size=c.train.group_size)  # the defaults agree
  c.objective.ei_std = 1.0
  c.objective.kind = "ppo"
  c.objective.baseline = "rloo"
  cfg = config_validation.validate(c).objective.loss
  assert (cfg.ei_std, cfg.kind, cfg.baseline) == (1.0, "ppo", "rloo")
  assert not hasattr(cfg, "accumulation_steps")


# ----------------------------------------------------------------------------- registries


@pytest.mark.parametrize(
  "choices, registry",
  [
    (ob.OBJECTIVES, ob.POLICY_LOSS_REGISTRY),
    (ob.PPO_RATIO_REFERENCES, ob.PPO_RATIO_REGISTRY),
    (ob.REWARD_GRADS, ob.REWARD_GRAD_REGISTRY),
    (ob.SAMPLED_KL_ESTIMATORS, ob.SAMPLED_KL_REGISTRY),
    (ob.REDUCTIONS, ob.REDUCTION_REGISTRY),
    (ob.AGGREGATIONS, ob.AGGREGATION_REGISTRY),
    (ob.BASELINES, ob.BASELINE_REGISTRY),
    (ob.REWARD_KINDS, ob.REWARD_KIND_REGISTRY),
  ],
)
def test_choice_tuples_are_the_registry_keys(choices, registry):
  assert isinstance(choices, tuple) and choices == tuple(registry)
  assert ob.KL_ESTIMATORS == ("full",) + ob.SAMPLED_KL_ESTIMATORS
  assert {"rloo", "group", "ema", "none"} <= set(ob.BASELINES)
  assert set(ob.REWARD_KINDS) == {"logprob", "prob", "mean_token_prob"}


def test_registry_rejects_duplicates_and_unknown_names():
  reg = ob.Registry("widget")
  reg.register("a", min_group_size=2)(lambda: 1)
  assert reg.lookup("a")() == 1 and reg.meta["a"] == {"min_group_size": 2}
  with pytest.raises(ValueError, match="registered twice"):
    reg.add("a", None)
  with pytest.raises(ValueError, match=r"unknown widget 'b'; choose one of \['a'\]"):
    reg.lookup("b")


# ----------------------------------------------------------------------------- new variants


def test_rloo_advantages_match_leave_one_out():
  rng = _rng(20)
  q, g = 4, 5
  r = rng.normal(size=q * g).astype(np.float32)
  r[g : 2 * g] = -0.75  # no spread: A = 0
  want = np_rloo_adv(r.astype(np.float64), g)
  np.testing.assert_allclose(ob.rloo_advantages(r, g), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    ob.rloo_advantages(r.reshape(q, g)), want.reshape(q, g), rtol=1e-5, atol=1e-6
  )
  # The closed form G/(G-1) (R - mean_g R), and the group's advantages sum to 0.
  groups = r.reshape(q, g).astype(np.float64)
  closed = g / (g - 1) * (groups - groups.mean(1, keepdims=True))
  np.testing.assert_allclose(want.reshape(q, g), closed, rtol=1e-10)
  np.testing.assert_allclose(want.reshape(q, g).sum(1), 0.0, atol=1e-12)
  assert np.all(np.asarray(ob.rloo_advantages(r, g))[g : 2 * g] == 0)
  # G = 2: each sample is compared with the other one.
  np.testing.assert_allclose(
    ob.rloo_advantages(np.array([1.0, 4.0, -2.0, 0.5]), 2), [-3.0, 3.0, -2.5, 2.5]
  )
  with pytest.raises(ValueError, match="at least 2"):
    ob.rloo_advantages(r, 1)
  with pytest.raises(ValueError, match="groups of 3"):
    ob.rloo_advantages(r, 3)


# Rows: two valid tokens (masked NaN); one valid token (masked -inf, +inf); an empty span; a valid
# -inf token (probability 0) next to a valid one.
KIND_LP = np.array(
  [
    [np.log(0.5), np.log(0.25), np.nan],
    [-np.inf, np.log(0.8), np.inf],
    [np.nan, -np.inf, 3.0],
    [-np.inf, np.log(0.5), np.nan],
  ],
  np.float32,
)
KIND_MASK = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], bool)
KIND_WANT = {
  ("logprob", "mean"): [np.log(0.125) / 2, np.log(0.8), 0.0, -np.inf],
  ("logprob", "sum"): [np.log(0.125), np.log(0.8), 0.0, -np.inf],
  ("prob", "mean"): [np.sqrt(0.125), 0.8, 0.0, 0.0],  # geometric mean of the token probs
  ("mean_token_prob", "mean"): [0.375, 0.8, 0.0, 0.25],
}


@pytest.mark.parametrize("kind, how", list(KIND_WANT))
def test_reward_kinds_hand_computed(kind, how):
  got = np.asarray(ob.answer_reward(KIND_LP, KIND_MASK, how, kind))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, KIND_WANT[kind, how], rtol=1e-6)
  if kind != "logprob":  # the probability kinds ignore logprob_reduction
    np.testing.assert_array_equal(ob.answer_reward(KIND_LP, KIND_MASK, "sum", kind), got)
  # d r_i / d lp_it: finite everywhere (masked NaN / inf and a valid -inf included), 0 off the span.
  grad = np.asarray(jax.grad(lambda x: jnp.sum(ob.answer_reward(x, KIND_MASK, how, kind)))(KIND_LP))
  count = np.maximum(KIND_MASK.sum(1, keepdims=True), 1)
  want = {
    "logprob": 1.0 / count if how == "mean" else np.ones_like(KIND_LP),
    "prob": np.asarray(KIND_WANT[kind, how])[:, None] / count,
    "mean_token_prob": np.exp(np.where(KIND_MASK, KIND_LP, 0.0)) / count,
  }[kind]
  np.testing.assert_allclose(grad, np.where(KIND_MASK, want, 0.0), rtol=1e-6)


def test_answer_reward_defaults_to_logprob():
  np.testing.assert_array_equal(
    ob.answer_reward(KIND_LP, KIND_MASK, "sum"),
    ob.answer_reward(KIND_LP, KIND_MASK, "sum", "logprob"),
  )
  np.testing.assert_array_equal(
    ob.answer_reward(KIND_LP, KIND_MASK), ob.answer_reward(KIND_LP, KIND_MASK, "mean", "logprob")
  )
  with pytest.raises(ValueError, match="reward_kind"):
    ob.answer_reward(KIND_LP, KIND_MASK, "mean", "likelihood")


@pytest.mark.parametrize("kind", ob.REWARD_KINDS)
def test_reward_grad_paper_differentiates_every_reward_kind(kind):
  """d loss / d lp_it = -w / (N * scale_i) * d r_i / d lp_it, with the kind's own d r / d lp."""
  with jax.enable_x64(True):
    d = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in _inputs(21).items()}
    w = 0.7
    cfg = ob.ObjectiveConfig(
      group_size=G, reward_grad="paper", actor_reward_weight=w, reward_kind=kind, kl_estimator="k3"
    )
    lp, m = d["answer_logprobs"], d["answer_mask"]
    r = ob.answer_reward(lp, m, "mean", kind)
    targets, _, _ = ob.advantage_targets(r, d["baseline_scores"], cfg)
    grad = np.asarray(
      jax.grad(
        lambda a: ob.loss_from_targets(ob.LossInputs(**{**d, "answer_logprobs": a}), targets, cfg)[
          0
        ]
      )(lp)
    )
    groups = np_reward(lp, m, "mean", kind).reshape(Q, G)
    scale = np.repeat(np.maximum(groups.std(1, ddof=1), cfg.reward_sigma_floor), G) + EPS
    count = m.sum(1, keepdims=True)
    dr = {
      "logprob": np.ones_like(lp) / count,
      "prob": np.exp(np_reward(lp, m, "mean", "logprob"))[:, None] / count,
      "mean_token_prob": np.exp(lp) / count,
    }[kind]
    want = np.where(m, -w / (N * scale[:, None]) * dr, 0.0)
    np.testing.assert_allclose(grad, want, rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- jit, metrics, EI


def _history_state(cfg, seed=22):
  history = _rng(seed).normal(loc=0.3, size=N)
  return ob.BaselineState(
    ob.ema_update(ob.EmaState.init(), history, cfg.ema_decay),
    ob.ei_update(ob.EiStats.init(), history),
  )


@pytest.mark.parametrize("baseline", ["group", "rloo", "ema", "ema_batch"])
@pytest.mark.parametrize("ei_std", [None, 0.0])
def test_advantage_targets_jit_matches_eager(baseline, ei_std):
  cfg = ob.ObjectiveConfig(
    group_size=G, baseline=baseline, ei_std=ei_std, ei_skip_initial=1, reward_grad="paper"
  )
  d = _inputs(23)
  r = ob.answer_reward(d["answer_logprobs"], d["answer_mask"])
  state = _history_state(cfg)
  eager = ob.advantage_targets(r, d["baseline_scores"], cfg, state)
  jitted = jax.jit(ob.advantage_targets, static_argnums=2)(r, d["baseline_scores"], cfg, state)
  (t_e, s_e, m_e), (t_j, s_j, m_j) = eager, jitted
  for a, b in zip(jax.tree.leaves((t_e, s_e)), jax.tree.leaves((t_j, s_j))):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert m_e.keys() == m_j.keys()
  for k in m_e:
    np.testing.assert_allclose(float(m_e[k]), float(m_j[k]), rtol=1e-6, atol=1e-7, err_msg=k)
  assert ("active_fraction" in m_j) == (ei_std is not None)
  if ei_std is not None:
    active = np.asarray(t_j.active)
    assert 0 < active.sum() < N and m_j["active_fraction"].dtype == jnp.float32
    np.testing.assert_allclose(float(m_j["active_fraction"]), active.mean())
  else:
    assert np.asarray(t_j.active).all()
  # Targets.active is usable in jit (e.g. to skip the optimizer update).
  assert bool(jax.jit(lambda t: t.any_active())(t_j)) and bool(jax.jit(jnp.any)(t_j.active))


@pytest.mark.parametrize(
  "cfg_kwargs, present, absent",
  [
    (
      dict(),
      {"frac_reward_zero_std", "kl", "entropy", "pg_loss", "loss"},
      {
        "ema_baseline",
        "ppo_ratio_mean",
        "ppo_ratio_max",
        "ppo_clip_fraction",
        "reward_grad_loss",
        "ei_threshold",
        "active_fraction",
      },
    ),
    (dict(baseline="rloo"), {"frac_reward_zero_std"}, {"ema_baseline", "active_fraction"}),
    (
      dict(baseline="ema", reward_grad="paper"),
      {"ema_baseline", "reward_grad_loss"},
      {"frac_reward_zero_std", "ppo_clip_fraction"},
    ),
    (
      dict(baseline="none", kind="ppo", ei_std=0.5, ei_skip_initial=0),
      {"ppo_ratio_mean", "ppo_ratio_max", "ppo_clip_fraction", "ei_threshold", "active_fraction"},
      {"frac_reward_zero_std", "ema_baseline", "reward_grad_loss"},
    ),
    (
      dict(kind="ppo", ppo_ratio_reference="base", reward_grad="paper"),
      {"ppo_ratio_mean", "ppo_clip_fraction"},
      {"reward_grad_loss", "active_fraction"},
    ),
  ],
)
def test_metrics_follow_the_config(cfg_kwargs, present, absent):
  cfg = ob.ObjectiveConfig(group_size=G, **cfg_kwargs)
  _, (metrics, _) = ob.markovian_loss(ob.LossInputs(**_inputs(24)), cfg, _history_state(cfg))
  always = {
    "reward_mean",
    "normalized_reward_mean",
    "advantage_mean",
    "advantage_std",
    "advantage_min",
    "advantage_max",
    "behaviour_logprob_diff_mean",
    "behaviour_logprob_diff_max",
    "pg_loss",
    "loss",
  }
  assert always | present <= metrics.keys(), (always | present) - metrics.keys()
  assert not absent & metrics.keys(), absent & metrics.keys()
  assert all(jnp.shape(v) == () for v in metrics.values())


def test_expert_iteration_keeping_nothing_reports_it():
  """During the warm-up nothing is kept: active_fraction 0, any_active False, a zero loss and
  gradient (the caller skips the optimizer step)."""
  cfg = ob.ObjectiveConfig(
    group_size=G, ei_std=0.0, ei_skip_initial=5, entropy_bonus=0.1, reward_grad="paper"
  )
  d = _inputs(25)
  r = ob.answer_reward(d["answer_logprobs"], d["answer_mask"])
  targets, state, metrics = jax.jit(ob.advantage_targets, static_argnums=2)(
    r, d["baseline_scores"], cfg, ob.BaselineState.init()
  )
  assert float(metrics["active_fraction"]) == 0.0 and np.isinf(float(metrics["ei_threshold"]))
  assert not bool(targets.any_active()) and int(state.ei.batches) == 1

  def loss(x):
    return ob.loss_from_targets(ob.LossInputs(**{**d, "cot_logprobs": x}), targets, cfg)[0]

  value, grad = jax.value_and_grad(loss)(d["cot_logprobs"])
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
