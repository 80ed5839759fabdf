"""The answer-likelihood methods (objectives/methods.py) against an independent float64 PyTorch
reference written from the papers' formulas (tests/torch_answer_likelihood.py).

Tiny arrays, no model: Q=2 questions x G=4 CoTs, answers of 3 and 4 tokens (padding holds NaN),
CoTs of 1..6 tokens (padding -inf); NOVER's inputs hold a tie. For each of the seven methods
(its `_markovian` twin is the same formula, its config differing in `context` alone, which only
the pipeline reads), our float32 step must match the reference on:

  rewards R             atol n ulps of the largest magnitude summed into R (`scale`)
  advantages A          atol of R / the smallest group std (GRPO, JEPO divide by it)
  answer weights v      atol n ulps of max|v| (with VeriFree's p_i: relative)
  loss                  the error of A times the largest per-row sum_t |cot|, plus n ulps of the
                        loss's largest term
  d loss / d answer lp  (VeriFree, JEPO, LaTRO at weight 1) the error of v / N
  d loss / d CoT lp     the error of A / N

n = 64 float32 ulps throughout (measured <= 8 here). One bfloat16-input case (LaTRO, whose
reward sums ~20 log-probs) holds ours within the bound that one bf16 rounding of each input
(relative 2^-9) puts on R and A.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from markovian_jax import objectives as obj
from markovian_jax.objectives import answer_likelihood as al
from markovian_jax.objectives import methods as M
from tests import helpers
from tests import torch_answer_likelihood as ref

Q, G, A, K = 2, 4, 4, 6
N = Q * G
N_ULPS = 64
ANSWER_LEN = (3, 4)
COT_LEN = (6, 3, 5, 2, 4, 6, 4, 1)


def make_inputs(method: str, seed: int = 0) -> dict:
  """float64 numpy inputs of one step (module docstring), with NaN / -inf in the padding."""
  rng = np.random.default_rng(seed)
  amask = np.zeros((N, A), bool)
  for i in range(N):
    amask[i, : ANSWER_LEN[i // G]] = True
  amask0 = np.stack([amask[q * G] for q in range(Q)])
  cmask = np.arange(K)[None, :] < np.asarray(COT_LEN)[:, None]
  lp = rng.uniform(-3.0, -0.05, (N, A))
  cot = rng.uniform(-4.0, -0.1, (N, K))
  ref_lp = cot + rng.normal(0.0, 0.3, (N, K))
  kl = rng.uniform(0.0, 0.5, (N, K))
  lp0 = np.stack([0.5 * (lp[q * G + 1] + lp[q * G + 2]) for q in range(Q)])
  if method == "vrcli":
    # Per-token shifts d of the answer's log-probs over the no-reasoning row: an improvement of
    # 100 (1 - e^-d) % = -2, 0.3, 1.5, 3, one per step level and away from its thresholds.
    d = -np.log(1.0 - np.array([-2.0, 0.3, 1.5, 3.0]) / 100.0)
    lp = np.concatenate([lp0[q][None] + d[:, None] for q in range(Q)])
  if method == "nover":
    lp[6] = lp[4]  # a tie (same answer log-probs, same CoT length): the earlier row ranks first
  lp = np.where(amask, lp, np.nan)
  cot = np.where(cmask, cot, -np.inf)
  return dict(lp=lp, amask=amask, cot=cot, cmask=cmask, ref=ref_lp, kl=kl, lp0=lp0, amask0=amask0)


def loss_inputs(d: dict, dtype=jnp.float32) -> obj.LossInputs:
  c = lambda x: jnp.asarray(x, dtype)  # noqa: E731
  return obj.LossInputs(
    cot_logprobs=c(d["cot"]),
    cot_mask=jnp.asarray(d["cmask"]),
    answer_logprobs=c(d["lp"]),
    answer_mask=jnp.asarray(d["amask"]),
    ref_logprobs=c(d["ref"]),
    kl=c(d["kl"]),
    no_reasoning_logprobs=c(d["lp0"]),
    no_reasoning_mask=jnp.asarray(d["amask0"]),
  )


def _step(inputs, cfg, state):
  _, reward, _ = M.method_rewards(inputs, cfg)
  targets, new_state, _ = M.method_targets(inputs, cfg, state)

  def f(answer, cot):
    x = inputs.replace(answer_logprobs=answer, cot_logprobs=cot)
    return M.method_loss_from_targets(x, targets, cfg)[0]

  loss, grads = jax.value_and_grad(f, argnums=(0, 1))(inputs.answer_logprobs, inputs.cot_logprobs)
  return reward, targets, new_state, loss, grads


_our_step = jax.jit(_step, static_argnums=1)


def ours(name: str, d: dict, state=None, dtype=jnp.float32, **overrides) -> dict:
  """Our step (one jit): rewards, targets, loss and its gradient w.r.t. the answer and CoT
  log-probs."""
  cfg = M.method_config(name, obj.ObjectiveConfig(group_size=G), **overrides)
  state = obj.BaselineState.init() if state is None else state
  reward, targets, new_state, loss, (g_answer, g_cot) = _our_step(loss_inputs(d, dtype), cfg, state)
  n = lambda x: np.asarray(x, np.float64)  # noqa: E731
  return dict(
    reward=n(reward),
    advantages=n(targets.advantages),
    active=np.asarray(targets.active),
    answer_weight=n(targets.answer_weight),
    loss=float(loss),
    grad_answer=n(g_answer),
    grad_cot=n(g_cot),
    state=new_state,
    cfg=cfg,
  )


def reference(method: str, d: dict, **kw) -> dict:
  return ref.step(
    method,
    lp=d["lp"],
    amask=d["amask"],
    cot=d["cot"],
    cmask=d["cmask"],
    g=G,
    ref=d["ref"],
    kl=d["kl"],
    lp0=d["lp0"],
    amask0=d["amask0"],
    **kw,
  )


def reward_scale(method: str, d: dict) -> float:
  """The largest magnitude that enters a row's R before any cancellation."""
  lp = np.where(d["amask"], np.abs(d["lp"]), 0.0)
  if method in ("verifree", "rlpr", "vrcli", "nover"):
    return 2.0 if method == "nover" else 1.0  # probabilities, ranks, step levels: O(1)
  if method == "latro":
    cot = np.where(d["cmask"], np.abs(d["cot"]) + np.abs(d["ref"]), 0.0)
    return float(np.max(lp.sum(1) + 0.05 * cot.sum(1)))
  return float(np.max(lp.sum(1)) + np.max(np.abs(d["lp0"])) * A + 1.0)


def min_group_std(x: np.ndarray) -> float:
  s = np.std(np.asarray(x).reshape(Q, G), axis=1, ddof=1)
  return float(np.min(np.where(s > 0, s, np.inf)))


def compare(
  method: str, got: dict, want: dict, d: dict, n_ulps: float = N_ULPS, extra_r: float = 0.0
):
  """Asserts ours == the reference within the tolerances of the module docstring."""
  eps = helpers.ulps(n_ulps)
  tol_r = eps * reward_scale(method, d) + extra_r
  if method == "verifree":  # p = exp(l): relative error |l| ulps of p
    np.testing.assert_allclose(got["reward"], want["reward"], rtol=eps * 8, atol=0)
    tol_r = eps * 8 * float(np.max(want["reward"]))
  else:
    np.testing.assert_allclose(got["reward"], want["reward"], rtol=0, atol=tol_r)
  if method in ("rlpr", "vrcli", "dro"):
    tol_a = 2 * tol_r / min_group_std(want["reward"]) + eps * 4
  elif method == "jepo":
    raw = want["advantages"]
    tol_a = 2 * tol_r / max(min_group_std(raw), 1e-3) + eps * 4
  else:
    tol_a = 2 * tol_r * G / (G - 1) + eps
  np.testing.assert_allclose(got["advantages"], want["advantages"], rtol=0, atol=tol_a)
  np.testing.assert_array_equal(got["active"], want["active"])
  tol_v = eps * max(float(np.max(np.abs(want["answer_weight"]))), 1e-30) * 8 + (
    tol_r if method == "verifree" else 0.0
  )
  np.testing.assert_allclose(got["answer_weight"], want["answer_weight"], rtol=0, atol=tol_v)
  cot_sum = float(np.max(np.where(d["cmask"], np.abs(d["cot"]), 0.0).sum(1)))
  lp_sum = float(np.max(np.where(d["amask"], np.abs(d["lp"]), 0.0).sum(1)))
  n_active = max(int(np.sum(want["active"])), 1)
  term = (
    np.max(np.abs(want["advantages"])) * cot_sum
    + np.max(np.abs(d["kl"])) * K
    + np.max(np.abs(want["answer_weight"])) * lp_sum
  )
  tol_loss = tol_a * cot_sum + tol_v * lp_sum + eps * term
  assert abs(got["loss"] - want["loss"]) <= tol_loss, (got["loss"], want["loss"], tol_loss)
  g_ans = np.where(d["amask"], got["grad_answer"], 0.0)
  np.testing.assert_allclose(g_ans, want["grad_answer"], rtol=0, atol=tol_v / n_active + 1e-30)
  assert np.all(got["grad_answer"][~d["amask"]] == 0), "padding got a gradient"
  g_cot = np.where(d["cmask"], got["grad_cot"], 0.0)
  np.testing.assert_allclose(g_cot, want["grad_cot"], rtol=0, atol=tol_a / n_active)


# ----------------------------------------------------------------------------- per method


@pytest.mark.parametrize("method", list(M.METHODS))
def test_method_matches_the_float64_reference(method):
  d = make_inputs(method)
  overrides = {"length_penalty": 0.1} if method == "dro" else {}
  got = ours(method, d, **overrides)
  want = reference(method, d, **overrides)
  compare(method, got, want, d)
  # Not vacuous: the rows differ, and each method's distinctive part is exercised.
  assert np.ptp(want["advantages"]) > 0.1
  if method in ("verifree", "jepo"):
    assert np.max(np.abs(want["grad_answer"])) > 1e-3
  if method == "rlpr":
    assert np.sum(want["reward"] == 0) >= 1 and np.sum(want["reward"] > 0) >= 2
  if method == "vrcli":
    assert len(set(np.round(want["reward"], 6))) == 4
  if method == "jepo":
    assert np.any(np.abs(want["advantages"]) == 1.0)


def test_latro_answer_term_at_the_papers_weight():
  d = make_inputs("latro", seed=1)
  got = ours("latro_markovian", d, answer_weight_value=1.0)
  want = reference("latro", d, answer_weight=1.0)
  compare("latro", got, want, d)
  assert got["cfg"].has_answer_term
  np.testing.assert_allclose(want["grad_answer"][d["amask"]], -1.0 / N)
  # The released code's weight 0: no term, and an exactly zero answer gradient.
  zero = ours("latro", d)
  assert not zero["cfg"].has_answer_term and np.all(zero["grad_answer"] == 0)
  compare("latro", zero, reference("latro", d), d)


def test_rlpr_std_filter_drops_a_flat_question_and_carries_its_ema():
  d = make_inputs("rlpr", seed=2)
  fresh = reference("rlpr", d)
  stds = np.std(fresh["reward"].reshape(Q, G), axis=1, ddof=1)
  assert stds[0] != stds[1]
  # A past EMA that puts 0.5 V between the two questions' stds keeps exactly one of them.
  value = float(np.mean(stds)) * 2.0
  state = obj.BaselineState.init()._replace(
    filter_std=obj.EmaState(jnp.float32(value), jnp.float32(3.0))
  )
  want = reference("rlpr", d, ema=(float(np.float32(value)), 3.0))
  got = ours("rlpr", d, state=state)
  assert np.sum(want["active"]) == G
  compare("rlpr", got, want, d)
  np.testing.assert_allclose(
    [float(got["state"].filter_std.value), float(got["state"].filter_std.weight)],
    want["ema"],
    rtol=helpers.ulps(N_ULPS),
  )
  # The state round-trips through the checkpoint's JSON; older checkpoints load a fresh EMA.
  back = obj.BaselineState.from_json(got["state"].to_json())
  assert float(back.filter_std.value) == float(got["state"].filter_std.value)
  old = {k: v for k, v in got["state"].to_json().items() if not k.startswith("filter_std")}
  assert float(obj.BaselineState.from_json(old).filter_std.weight) == 0.0


def test_answer_gradients_are_the_objectives_gradients():
  """VeriFree's term is d E[p] through the answer tokens, JEPO's d log mean_j p_j: checked with
  float64 autodiff of those objectives written directly (no weights)."""
  torch = ref.torch
  d = make_inputs("jepo", seed=3)
  valid = d["amask"]
  lp = torch.as_tensor(np.where(valid, d["lp"], 0.0), dtype=torch.float64).requires_grad_(True)
  lsum = (lp * torch.as_tensor(valid, dtype=torch.float64)).sum(1).reshape(Q, G)
  jepo = -(torch.logsumexp(lsum, 1) - math.log(G)).mean()
  verifree = -torch.exp(lsum).mean()
  (g_jepo,) = torch.autograd.grad(jepo, lp, retain_graph=True)
  (g_vf,) = torch.autograd.grad(verifree, lp)
  for name, want in (("jepo", g_jepo), ("verifree", g_vf)):
    got = ours(name, d)["grad_answer"]
    scale = float(np.max(np.abs(want.numpy())))
    np.testing.assert_allclose(
      np.where(valid, got, 0.0), want.numpy(), rtol=0, atol=helpers.ulps(N_ULPS, of=scale) * 8
    )


def test_bf16_inputs_within_one_bf16_rounding():
  """LaTRO on bfloat16 inputs vs the reference on the unrounded values: each input is off by at
  most 2^-9 of itself, so R by at most 2^-9 (sum|lp| + 0.05 sum(|cot| + |ref|)) per row."""
  d = make_inputs("latro", seed=4)
  got = ours("latro", d, dtype=jnp.bfloat16)
  want = reference("latro", d)
  bound = 2.0**-9 * reward_scale("latro", d)
  assert got["reward"].dtype == np.float64 and np.max(np.abs(got["reward"] - want["reward"])) > 0
  compare("latro", got, want, d, extra_r=bound)
  # The bound is tight enough to matter: well below the spread the advantages act on.
  assert bound < 0.05 * np.ptp(want["reward"])


# ----------------------------------------------------------------------------- the table


def test_every_method_has_a_markovian_twin_and_unknown_names_are_one_line():
  """The twin is the same formula (so the reference test above covers it): its config differs
  from the method's in `context` alone, which only the pipeline reads (whom the scorer shows the
  question)."""
  assert M.METHOD_NAMES == tuple(n for m in M.METHODS for n in (m, m + "_markovian"))
  assert len(M.METHODS) == 7
  for method in M.METHODS:
    visible = M.method_config(method, obj.ObjectiveConfig(group_size=G))
    twin = M.method_config(method + "_markovian", obj.ObjectiveConfig(group_size=G))
    assert (visible.context, twin.context) == ("visible", "hidden")
    assert (visible.name, twin.name) == (method, method + "_markovian")
    assert twin.markovian and not visible.markovian
    assert dataclasses.replace(twin, context="visible") == visible
  with pytest.raises(ValueError) as e:
    M.method_config("grpo_markovian")
  msg = str(e.value)
  assert "\n" not in msg and "'grpo_markovian'" in msg
  assert all(repr(n) in msg for n in M.METHOD_NAMES)


def test_no_method_is_a_copy_of_another():
  pieces = {
    m: tuple(sorted((k, repr(v)) for k, v in spec.items())) for m, spec in M.METHODS.items()
  }
  assert len(set(pieces.values())) == len(pieces)


@pytest.mark.parametrize(
  "field,value,needle",
  [
    ("score", "no_such_score", "answer score"),
    ("advantage", "no_such", "answer-likelihood advantage"),
    ("shaping", ("kl_to_reference", "nope"), "reward shaping"),
    ("filter_decay", 1.0, "filter_decay"),
    ("no_reasoning_scorer", None, "no_reasoning_scorer"),
  ],
)
def test_bad_pieces_are_refused_by_name(field, value, needle):
  with pytest.raises(ValueError, match=needle):
    M.method_config("rlpr", obj.ObjectiveConfig(group_size=G), **{field: value})


def test_group_size_one_is_refused():
  with pytest.raises(ValueError, match="group_size"):
    M.method_config("jepo", obj.ObjectiveConfig(group_size=1, baseline="none"))


def test_ranks_break_ties_by_row_as_a_stable_sort():
  assert al.group_ranks(jnp.array([3.0, 1.0, 3.0, 2.0]), 4, True).tolist() == [0, 3, 1, 2]
  assert al.group_ranks(jnp.array([3.0, 1.0, 3.0, 2.0]), 4, False).tolist() == [2, 0, 3, 1]
