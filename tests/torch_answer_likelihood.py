"""A test-only float64 PyTorch reference of the answer-likelihood methods' step (no model).

Written from each paper's formulas (and, where released, its code: VeriFree's verifree.py and
run.sh, RLPR's prob reward manager and EMA std filter, NOVER's reward_functions.py and
calculate_perplexity), one question's group at a time in plain loops, not from markovian_jax.
`tests/objectives/test_answer_likelihood.py` compares our JAX step against it.

Inputs, N = Q * G rows question-major: lp [N, A] answer log-probs (valid where amask), cot
[N, K] CoT log-probs (valid where cmask), ref [N, K] reference log-probs of the CoT tokens, kl
[N, K] per-token KL, lp0 [Q, A] / amask0 the answer's log-probs with no reasoning.

  verifree  p_i = prod_t P(a_t) = exp(sum_t lp_it);  A_i = p_i - mean_{j != i} p_j;
            loss = mean_i [-A_i sum_t cot_it - p_i sum_t lp_it]                (no KL)
  rlpr      r_i = mean_t exp(lp_it), r0 the same with no reasoning;  R_i = max(r_i - r0, 0);
            A = (R - mean) / (std + 1e-8) (std divisor G-1);  keep question q iff
            std_q >= 0.5 V, V = sum_b 0.99^(n-b) m_b / sum_b 0.99^(n-b) over past batches' mean
            group std m_b (all kept with no past);  loss = mean_{kept} -A_i mean_t cot_it  (no KL)
  jepo      l_i = sum_t lp_it;  A_i = log(1/G sum_j e^l_j) - log(1/(G-1) sum_{j != i} e^l_j),
            then A_i / (std_g A + 1e-8) clipped to [-1, 1];
            loss = mean_i [-A_i sum_t cot_it + beta_kl sum_t kl_it
                           - G softmax(l)_i beta_sup sum_t lp_it]
  latro     R_i = l_i - 0.05 sum_t (cot_it - ref_it);  A_i = R_i - mean_{j != i} R_j;
            loss = mean_i [-A_i sum_t cot_it - w sum_t lp_it]                  (no KL)
  nover     ppl_i = exp(-mean_t lp_it / max(1, 1 + log10 K_i));  rank by ascending ppl (stable);
            R_i = (G - rank_i) / G + #{j != i: K_i < K_j and ppl_i < ppl_j} / (G - 1);
            A_i = R_i - mean_g R;  loss = mean_i [-A_i mean_t cot_it + beta_kl mean_t kl_it]
  vrcli     I_i = 100 (1 - ppl_i / ppl0), ppl = exp(-mean_t lp);  R_i = step(I_i) with
            (0.05 -> 0.5, 1 -> 0.9, 2 -> 1), 0 below 0.05;  GRPO;  loss as nover's
  dro       sigma_t = population std over the group of lp_.t;  w_t = sigma_t / sum_t sigma_t;
            R_i = sum_t w_t lp_it - sum_t w_t lp0_t - lambda K_i / K;  GRPO;  loss as nover's
"""

from __future__ import annotations

import math

import numpy as np

from tests import helpers

torch = helpers.require("torch")

T = torch.float64
VRCLI = ((0.05, 0.5), (1.0, 0.9), (2.0, 1.0))


def _t(x):
  return None if x is None else torch.as_tensor(np.asarray(x, np.float64), dtype=T)


def _rows(x, mask):
  """The valid entries of row x (1-D tensors)."""
  return x[torch.as_tensor(np.asarray(mask, bool))]


def _std(x, unbiased=True):
  return torch.std(x, unbiased=unbiased) if len(x) > 1 else torch.zeros((), dtype=T)


def step(
  method: str,
  *,
  lp,
  amask,
  cot,
  cmask,
  g: int,
  ref=None,
  kl=None,
  lp0=None,
  amask0=None,
  kl_penalty=0.1,
  answer_weight=None,
  length_penalty=0.0,
  ema=(0.0, 0.0),
) -> dict:
  """One step of `method` in float64; returns reward R [N], advantages A [N], active [N],
  answer_weight v [N], loss, grad_answer d loss / d lp [N, A], grad_cot d loss / d cot [N, K],
  ema (V, Z) after the step (rlpr)."""
  lp_leaf = _t(np.where(amask, lp, 0.0)).requires_grad_(True)
  cot_leaf = _t(np.where(cmask, cot, 0.0)).requires_grad_(True)
  amask, cmask = np.asarray(amask, bool), np.asarray(cmask, bool)
  n, k = cmask.shape
  q = n // g
  lpd = lp_leaf.detach()
  lens = [float(cmask[i].sum()) for i in range(n)]
  lsum = [_rows(lpd[i], amask[i]).sum() for i in range(n)]
  R = [None] * n
  A = [None] * n
  v = [torch.zeros((), dtype=T)] * n
  active = [True] * n
  cot_sum = True
  penalty = kl_penalty
  out_ema = ema

  if method == "verifree":
    penalty = 0.0
    for i in range(n):
      R[i] = torch.exp(lsum[i])
    for qq in range(q):
      idx = range(qq * g, (qq + 1) * g)
      for i in idx:
        A[i] = R[i] - sum(R[j] for j in idx if j != i) / (g - 1)
        v[i] = R[i]
  elif method == "rlpr":
    penalty, cot_sum = 0.0, False
    stds = []
    for qq in range(q):
      r0 = torch.exp(_rows(_t(lp0)[qq], amask0[qq])).mean()
      idx = list(range(qq * g, (qq + 1) * g))
      for i in idx:
        R[i] = torch.clamp(torch.exp(_rows(lpd[i], amask[i])).mean() - r0, min=0.0)
      grp = torch.stack([R[i] for i in idx])
      mu, sd = grp.mean(), _std(grp)
      stds.append(sd)
      for i in idx:
        A[i] = (R[i] - mu) / (sd + 1e-8)
    value, weight = ema
    for qq in range(q):
      keep = weight == 0 or float(stds[qq]) >= 0.5 * value
      for i in range(qq * g, (qq + 1) * g):
        active[i] = keep
    m = float(torch.stack(stds).mean())
    new_weight = 0.99 * weight + 1.0
    out_ema = ((0.99 * weight * value + m) / new_weight, new_weight)
  elif method == "jepo":
    beta = 1.0 if answer_weight is None else answer_weight
    for qq in range(q):
      idx = list(range(qq * g, (qq + 1) * g))
      ls = torch.stack([lsum[i] for i in idx])
      full = torch.logsumexp(ls, 0) - math.log(g)
      raw = []
      for a, i in enumerate(idx):
        others = torch.stack([ls[b] for b in range(g) if b != a])
        raw.append(full - (torch.logsumexp(others, 0) - math.log(g - 1)))
      raw = torch.stack(raw)
      sd = _std(raw)
      soft = torch.softmax(ls, 0)
      for a, i in enumerate(idx):
        R[i] = lsum[i]
        A[i] = torch.clamp(raw[a] / (sd + 1e-8), -1.0, 1.0)
        v[i] = g * soft[a] * beta
  elif method == "latro":
    penalty = 0.0
    w = 0.0 if answer_weight is None else answer_weight
    refd = _t(ref)
    for i in range(n):
      R[i] = (
        lsum[i] - 0.05 * (_rows(cot_leaf.detach()[i], cmask[i]) - _rows(refd[i], cmask[i])).sum()
      )
      v[i] = torch.tensor(w, dtype=T)
    for qq in range(q):
      idx = range(qq * g, (qq + 1) * g)
      for i in idx:
        A[i] = R[i] - sum(R[j] for j in idx if j != i) / (g - 1)
  elif method in ("nover", "vrcli", "dro"):
    cot_sum = False
    for qq in range(q):
      idx = list(range(qq * g, (qq + 1) * g))
      if method == "nover":
        ppl = [
          float(
            torch.exp(
              -_rows(lpd[i], amask[i]).mean() / max(1.0, 1.0 + math.log10(max(lens[i], 1.0)))
            )
          )
          for i in idx
        ]
        order = sorted(range(g), key=lambda a: ppl[a])  # Python's sort is stable
        for rank, a in enumerate(order):
          R[idx[a]] = (g - rank) / g
        for a, i in enumerate(idx):
          wins = sum(1 for b in range(g) if b != a and lens[i] < lens[idx[b]] and ppl[a] < ppl[b])
          R[i] = torch.tensor(R[i] + wins / (g - 1), dtype=T)
      elif method == "vrcli":
        ppl0 = torch.exp(-_rows(_t(lp0)[qq], amask0[qq]).mean())
        for i in idx:
          imp = 100.0 * (1.0 - torch.exp(-_rows(lpd[i], amask[i]).mean()) / ppl0)
          reward = 0.0
          for threshold, value in VRCLI:
            if float(imp) >= threshold:
              reward = value
          R[i] = torch.tensor(reward, dtype=T)
      else:
        cols = [t for t in range(amask.shape[1]) if amask[idx[0], t]]
        sig = torch.stack(
          [_std(torch.stack([lpd[i, t] for i in idx]), unbiased=False) for t in cols]
        )
        w = sig / sig.sum() if float(sig.sum()) > 0 else torch.full_like(sig, 1.0 / len(cols))
        base = sum(w[c] * _t(lp0)[qq, t] for c, t in enumerate(cols))
        for i in idx:
          R[i] = (
            sum(w[c] * lpd[i, t] for c, t in enumerate(cols)) - base - length_penalty * lens[i] / k
          )
      grp = torch.stack([torch.as_tensor(R[i], dtype=T) for i in idx])
      mu = grp.mean()
      sd = _std(grp)
      for i in idx:
        A[i] = R[i] - mu if method == "nover" else (R[i] - mu) / (sd + 1e-8)
  else:
    raise ValueError(method)

  kld = _t(kl)
  kept = [i for i in range(n) if active[i]]
  terms = []
  for i in kept:
    c = _rows(cot_leaf[i], cmask[i])
    red = c.sum() if cot_sum else c.mean()
    term = -A[i].detach() * red
    if penalty > 0:
      kk = _rows(kld[i], cmask[i])
      term = term + penalty * (kk.sum() if cot_sum else kk.mean())
    term = term - v[i].detach() * _rows(lp_leaf[i], amask[i]).sum()
    terms.append(term)
  loss = torch.stack(terms).mean() if terms else torch.zeros((), dtype=T)
  g_lp, g_cot = torch.autograd.grad(loss, [lp_leaf, cot_leaf], allow_unused=True)
  f = lambda x: np.asarray([float(y) for y in x])  # noqa: E731
  return dict(
    reward=f(R),
    advantages=f(A),
    active=np.asarray(active),
    answer_weight=f(v),
    loss=float(loss.detach()),
    grad_answer=np.zeros(lp_leaf.shape) if g_lp is None else g_lp.numpy(),
    grad_cot=np.zeros(cot_leaf.shape) if g_cot is None else g_cot.numpy(),
    ema=out_ema,
  )
