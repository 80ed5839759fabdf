"""Objectives against independent numpy re-derivations (fixed seeds) and analytic gradients."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from markovian_jax import objectives as ob

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


def np_group_adv(r, g):
  out = np.empty_like(r)
  for q in range(len(r) // g):
    grp = r[q * g:(q + 1) * g]
    out[q * g:(q + 1) * g] = (grp - grp.mean()) / (np.std(grp, ddof=1) + EPS)
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
  np.testing.assert_allclose(ob.normalized_reward(r, b, True, 3), np.asarray(r) - np.repeat(b, 3),
                             rtol=1e-6)
  np.testing.assert_allclose(ob.normalized_reward(r, np.repeat(b, 3), True, 3),
                             np.asarray(r) - np.repeat(b, 3), rtol=1e-6)
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
  r[g:2 * g] = 0.25  # a group with no signal
  expected = np_group_adv(r.astype(np.float64), g)
  np.testing.assert_allclose(ob.group_advantages(r, g), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ob.group_advantages(r.reshape(q, g)), expected.reshape(q, g),
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(ob.group_advantages(r, g))[g:2 * g] == 0)
  # Each group is standardised with the unbiased std: sum A^2 = G - 1 (not G).
  a = np.asarray(ob.group_advantages(r, g)).reshape(q, g)
  np.testing.assert_allclose((a ** 2).sum(1)[[0, 2, 3, 4]], g - 1, rtol=1e-5)
  with pytest.raises(ValueError, match="at least 2"):
    ob.group_advantages(r, 1)
  with pytest.raises(ValueError, match="groups of 7"):
    ob.group_advantages(r, 7)
  with pytest.raises(ValueError, match="group size 4"):
    ob.group_advantages(r.reshape(q, g), 4)


def test_ema_baseline_sequence():
  """V_n = sum_j r^(n-j) m_j / sum_j r^(n-j) over past batch means; no baseline on batch 0."""
  rng = _rng(3)
  decay = 0.9
  batches = [rng.normal(loc=0.2 * i, size=4).astype(np.float32) for i in range(7)]
  update = jax.jit(ob.ema_update, static_argnums=2)
  state, means = ob.EmaState.init(), []
  for i, rewards in enumerate(batches):
    if i == 0:
      expected_adv = rewards
    else:
      w = decay ** np.arange(i, 0, -1)  # batch j of i past ones weighs decay^(i-j)
      expected_adv = rewards - np.dot(w, means) / w.sum()
    np.testing.assert_allclose(ob.ema_advantages(rewards, state), expected_adv, rtol=1e-5,
                               atol=1e-6)
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
  state = ob.BaselineState(ob.ema_update(ob.EmaState.init(), 0.5, 0.9),
                           ob.ei_update(ob.EiStats.init(), np.array([1.0, 2.0, 4.0])))
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
    np.testing.assert_allclose(grad, np.where(m, (-adv * per_tok_weight / n)[:, None], 0.0),
                               rtol=1e-5, atol=1e-8)
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


# ----------------------------------------------------------------------------- KL and entropy

def test_full_kl_and_entropy_match_numpy_with_masked_vocab():
  rng = _rng(7)
  zp, zq = rng.normal(size=(3, 4, 9)), rng.normal(size=(3, 4, 9))
  zp[..., -2:] = -np.inf  # p = 0 there (e.g. a masked vocabulary): contributes 0, not NaN
  lp, lq = np_log_softmax(zp), np_log_softmax(zq)
  p = np.exp(lp)
  kl = np.sum(np.where(p > 0, p * (np.where(p > 0, lp, 0) - lq), 0), -1)
  h = -np.sum(np.where(p > 0, p * np.where(p > 0, lp, 0), 0), -1)
  np.testing.assert_allclose(ob.full_kl(lp.astype(np.float32), lq.astype(np.float32)), kl,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ob.entropy(lp.astype(np.float32)), h, rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda z: jnp.sum(ob.full_kl(jax.nn.log_softmax(z), lq)))(zp.astype(np.float32))
  assert np.all(np.isfinite(np.asarray(g)))


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
  np.testing.assert_allclose(float(ob.full_kl(lp[None], lq[None])[0]), exact, rtol=1e-5)
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
      baseline_scores=(-rng.random(Q)).astype(np.float32))


def np_markovian_loss(d, cfg, ema_v=None, ei_hist=None):
  """The objective written out directly in numpy (float64)."""
  d = {k: np.asarray(v, np.float64) if v.dtype != bool else v for k, v in d.items()}
  how, mode, m = cfg.logprob_reduction, cfg.loss_aggregation, d["cot_mask"]
  r = np_reduce(d["answer_logprobs"], d["answer_mask"], how)
  big_r = r - np.repeat(d["baseline_scores"], G) if cfg.normalize_reward else r
  if cfg.baseline == "group":
    adv = np_group_adv(big_r, G)
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
    tok = np.maximum(-rho * adv[:, None],
                     -np.clip(rho, 1 - cfg.ppo_eps, 1 + cfg.ppo_eps) * adv[:, None])
  if cfg.kl_estimator == "full":
    kl = d["kl"]
  else:
    dlt = lp - d["ref_logprobs"]
    kl = {"k1": dlt, "k2": 0.5 * dlt ** 2, "k3": np.exp(-dlt) + dlt - 1}[cfg.kl_estimator]
  loss = (np_aggregate(tok, m, mode, how, active)
          + cfg.kl_penalty * np_aggregate(kl, m, mode, how, active)
          - cfg.entropy_bonus * np_aggregate(d["entropy"], m, mode, how, active))
  if cfg.reward_grad == "paper":
    groups = r.reshape(Q, G)
    mu = np.repeat(groups.mean(1), G)
    sigma = np.repeat(np.maximum(groups.std(1, ddof=1), cfg.reward_sigma_floor), G) + EPS
    loss -= cfg.actor_reward_weight * np.mean(((r - mu) / sigma)[active])
  return loss / cfg.accumulation_steps, dict(adv=adv, active=active, r=r, big_r=big_r, kl=kl)


CASES = {
    "reference_default": dict(group_size=G),
    "ppo_k3_sum_token_mean_entropy": dict(group_size=G, kind="ppo", kl_estimator="k3",
                                          logprob_reduction="sum", loss_aggregation="token_mean",
                                          entropy_bonus=0.05, accumulation_steps=2),
    "pg_k1_ema_paper": dict(group_size=G, kl_estimator="k1", baseline="ema",
                            reward_grad="paper", actor_reward_weight=0.5),
    "ppo_k2_none_unnormalized_ei": dict(group_size=G, kind="ppo", kl_estimator="k2",
                                        baseline="none", normalize_reward=False, ei_std=0.0,
                                        ei_skip_initial=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_markovian_loss_matches_numpy(name):
  cfg = ob.ObjectiveConfig(**CASES[name])
  d = _inputs(10)
  rng = _rng(11)
  history = [rng.normal(loc=-0.5, size=N)]
  state = ob.BaselineState(ob.ema_update(ob.EmaState.init(), history[0].mean(), cfg.ema_decay),
                           ob.ei_update(ob.EiStats.init(), history[0]))
  loss, (metrics, new_state) = jax.jit(ob.markovian_loss, static_argnums=1)(
      ob.LossInputs(**d), cfg, state)
  want, parts = np_markovian_loss(d, cfg, ema_v=history[0].mean(), ei_hist=history)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["loss"]), want * cfg.accumulation_steps, rtol=2e-5,
                             atol=1e-6)
  adv = parts["adv"]
  np.testing.assert_allclose(float(metrics["advantage_mean"]), adv.mean(), atol=1e-5)
  np.testing.assert_allclose(float(metrics["advantage_std"]), adv.std(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["advantage_min"]), adv.min(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["advantage_max"]), adv.max(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["reward_mean"]), parts["r"].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["normalized_reward_mean"]), parts["big_r"].mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["active_fraction"]), parts["active"].mean())
  np.testing.assert_allclose(
      float(metrics["kl"]), np_aggregate(parts["kl"], d["cot_mask"], cfg.loss_aggregation,
                                         cfg.logprob_reduction), rtol=1e-5)
  if cfg.kind == "ppo":
    rho = np.exp(d["cot_logprobs"].astype(np.float64) - d["behaviour_logprobs"])[d["cot_mask"]]
    np.testing.assert_allclose(float(metrics["ppo_ratio_mean"]), rho.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ppo_ratio_max"]), rho.max(), rtol=1e-5)
    assert 0 <= float(metrics["ppo_clip_fraction"]) <= 1
  if cfg.baseline == "ema":
    np.testing.assert_allclose(float(new_state.ema.value),
                               (0.9 * history[0].mean() + parts["big_r"].mean()) / 1.9, rtol=1e-5)
  if cfg.ei_std is not None:
    assert 0 < parts["active"].sum() < N  # the case exercises a real selection
    assert int(new_state.ei.count) == 2 * N and int(new_state.ei.batches) == 2
  else:
    assert int(new_state.ei.count) == N  # untouched when expert iteration is off


def test_sum_reduction_is_k_times_mean_on_full_masks():
  d = _inputs(12, full_mask=True)
  d["answer_mask"] = np.ones((N, A), bool)
  targets = ob.Targets(np.linspace(-1, 1, N).astype(np.float32), np.ones(N, bool),
                       np.zeros(N, np.float32), np.ones(N, np.float32))
  base = dict(group_size=G, kl_estimator="k3", entropy_bonus=0.1)
  mean, _ = ob.loss_from_targets(ob.LossInputs(**d), targets, ob.ObjectiveConfig(**base))
  total, _ = ob.loss_from_targets(ob.LossInputs(**d), targets,
                                  ob.ObjectiveConfig(logprob_reduction="sum", **base))
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


def _answer_grad(cfg, d, state=None):
  def f(answer_logprobs):
    return ob.markovian_loss(ob.LossInputs(**{**d, "answer_logprobs": answer_logprobs}), cfg,
                             state)[0]
  return np.asarray(jax.grad(f)(d["answer_logprobs"]))


@pytest.mark.parametrize("case", [dict(), dict(kind="ppo"), dict(baseline="ema", ei_std=0.0,
                                                                  ei_skip_initial=0)])
def test_reward_grad_none_gives_exactly_zero_answer_gradient(case):
  d = _inputs(14)
  cfg = ob.ObjectiveConfig(group_size=G, **case)
  state = ob.BaselineState(ob.ema_update(ob.EmaState.init(), -1.0),
                           ob.ei_update(ob.EiStats.init(), np.linspace(-3, 0, 9)))
  assert np.all(_answer_grad(cfg, d, state) == 0.0)
  assert np.any(_answer_grad(ob.ObjectiveConfig(group_size=G, reward_grad="paper", **case), d,
                             state) != 0.0)


def test_reward_grad_paper_matches_finite_difference():
  """d loss / d answer_logprobs = central finite difference (float64) of the same surrogate.

  The surrogate's stop-gradients (A, mu, sigma) are the step's Targets, computed once; the finite
  difference perturbs the answer log-probs with them held fixed, which is what stop_gradient means.
  (Differencing `markovian_loss` itself would move mu too, and sum_i (r_i - mu) is identically 0.)
  """
  with jax.enable_x64(True):
    d = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in _inputs(15).items()}
    w, floor = 0.7, 0.05
    cfg = ob.ObjectiveConfig(group_size=G, reward_grad="paper", actor_reward_weight=w,
                             reward_sigma_floor=floor, kl_estimator="k3")
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

@pytest.mark.parametrize("kwargs, match", [
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(kind="sft"), "objective kind"),
    (dict(baseline="rloo"), "baseline"),
    (dict(logprob_reduction="max"), "logprob_reduction"),
    (dict(loss_aggregation="batch"), "loss_aggregation"),
    (dict(reward_grad="full"), "reward_grad"),
    (dict(ppo_ratio_reference="old"), "ppo_ratio_reference"),
    (dict(ppo_eps=1.5), "ppo_eps"),
    (dict(kl_penalty=-0.1), "kl_penalty"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(accumulation_steps=0), "accumulation_steps"),
    (dict(group_size=1), "group_size"),
    (dict(kl_clamp=0.0), "kl_clamp"),
    (dict(entropy_bonus=float("nan")), "entropy_bonus"),
    (dict(ei_std=float("inf")), "ei_std"),
])
def test_config_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ob.ObjectiveConfig(**kwargs)


@pytest.mark.parametrize("cfg_kwargs, drop, match", [
    (dict(), "kl", "LossInputs.kl"),
    (dict(kl_estimator="k3"), "ref_logprobs", "LossInputs.ref_logprobs"),
    (dict(kind="ppo"), "behaviour_logprobs", "LossInputs.behaviour_logprobs"),
    (dict(entropy_bonus=0.1), "entropy", "LossInputs.entropy"),
    (dict(), "baseline_scores", "baseline_scores"),
])
def test_missing_inputs_are_named(cfg_kwargs, drop, match):
  d = _inputs(17)
  d[drop] = None
  with pytest.raises(ValueError, match=match):
    ob.markovian_loss(ob.LossInputs(**d), ob.ObjectiveConfig(group_size=G, **cfg_kwargs))


def test_shape_errors_are_named():
  d = _inputs(18)
  with pytest.raises(ValueError, match="behaviour_logprobs has shape"):
    ob.markovian_loss(ob.LossInputs(**{**d, "behaviour_logprobs": d["behaviour_logprobs"][:, 1:]}),
                      ob.ObjectiveConfig(group_size=G, kind="ppo"))
  with pytest.raises(ValueError, match="groups of 3"):
    ob.markovian_loss(ob.LossInputs(**d), ob.ObjectiveConfig(group_size=3))


def test_from_run_config():
  from configs import base
  c = base.get_config("gsm8k")
  cfg = ob.ObjectiveConfig.from_config(c)
  assert cfg == ob.ObjectiveConfig(group_size=c.train.group_size)  # the defaults agree
  c.objective.ei_std = 1.0
  c.objective.kind = "ppo"
  cfg = ob.ObjectiveConfig.from_config(c, accumulation_steps=4)
  assert (cfg.ei_std, cfg.kind, cfg.accumulation_steps) == (1.0, "ppo", 4)
