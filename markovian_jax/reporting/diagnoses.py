"""Judging runs: smoothing, milestones, results and automatic diagnoses (`report_runs.Run`).

    dynamics(run)   loss, R, r and the PPO ratio at milestones scaled to the run's length
    results(run)    final / best-by-validation / base accuracy and the eval set sizes
    diagnose(run)   collapse (PPO ratio blow-up, repetitive CoTs, reward crash), no evaluation
                    during training, accuracy below the base model, reward up while held-out
                    accuracy falls, non-finite updates; each with the step where it began

Thresholds come from the run's config (train.collapse_ppo_ratio, train.collapse_repetition)
when it has them; noise levels from the series themselves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from markovian_jax.reporting.runs import Run

SMALL_EVAL_SET = 100  # below this many questions an accuracy's interval is wider than +-0.1
# Collapse thresholds when the run's config does not give them (configs/base.py's defaults).
DEFAULT_PPO_RATIO = 10.0
DEFAULT_REPETITION = 0.8
TEXT_REPETITION = 0.6  # char 4-gram repetition of one CoT above which it is degenerate


# ------------------------------------------------------------------ smoothing and milestones


def window_for(n: int) -> int:
  """Smoothing window for a series of n points: a tenth of it, between 1 and 50."""
  return max(1, min(50, n // 10))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over the last `window` points (fewer at the start); float64 [T]."""
  values = np.asarray(values, np.float64)
  c = np.cumsum(np.concatenate([[0.0], values]))
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def milestones(last_step: int) -> list:
  """The paper's 0, 1k, 4k and last step, scaled to runs shorter than 4k (0, 10%, 40%, last)."""
  if last_step <= 0:
    return [0]
  marks = (
    [0, 1000, 4000] if last_step > 4000 else [0, round(last_step * 0.1), round(last_step * 0.4)]
  )
  return sorted({m for m in marks if m < last_step} | {last_step})


def value_near(run: Run, tag: str, step: int, window: int) -> float:
  """Mean of `tag` over the `window` logged steps ending at `step` (the first logged steps for
  step 0); NaN when absent."""
  steps, v = run.series(tag)
  if not v.size:
    return float("nan")
  end = max(int(np.searchsorted(steps, step, side="right")), 1)
  return float(np.mean(v[max(0, end - window) : end]))


def dynamics(run: Run) -> list:
  """[(milestone, {column: value})] for loss, R, r and the PPO ratio at the run's milestones."""
  window = window_for(run.train_steps.size)
  tags = {
    "loss": "train/loss",
    "normalised reward R": "answer/normalized_reward",
    "answer log-prob r": "answer/logprob",
    "PPO ratio mean": "policy/ppo_ratio_mean",
    "PPO ratio max": "policy/ppo_ratio_max",
  }
  return [
    (m, {k: value_near(run, t, m, window) for k, t in tags.items()})
    for m in milestones(run.last_step)
  ]


# ------------------------------------------------------------------ results


@dataclasses.dataclass
class Results:
  """A run's accuracy summary (the primary method; log-prob for wiki continuation)."""

  method: Optional[str]
  base: Optional[tuple]  # (value, low, high) at step 0
  final: Optional[tuple]  # (step, value, low, high) at the last evaluation
  best: Optional[tuple]  # (step, selection value, test value or NaN) by the selection split
  test_size: Optional[int]
  selection_size: Optional[int]
  per_method: dict  # method -> (step, value, low, high) at the last evaluation


def results(run: Run) -> Results:
  methods = run.methods()
  method = methods[0] if methods else None
  per_method, base, final, best = {}, None, None, None
  for m in methods:
    steps, v, lo, hi = run.interval(m)
    if v.size:
      per_method[m] = (int(steps[-1]), v[-1], lo[-1], hi[-1])
  if method is not None:
    steps, v, lo, hi = run.interval(method)
    if v.size and steps[0] == 0:
      base = (v[0], lo[0], hi[0])
    final = per_method.get(method)
    sel_steps, sel = run.series(run.metric_tag(method, "selection"))
    if sel.size:
      i = int(np.argmax(sel))  # the earliest of equal maxima
      test = dict(zip(steps.tolist(), v.tolist())).get(int(sel_steps[i]), float("nan"))
      best = (int(sel_steps[i]), float(sel[i]), float(test))
  return Results(
    method, base, final, best, run.eval_size(), run.eval_size(selection=True), per_method
  )


# ------------------------------------------------------------------ diagnoses


@dataclasses.dataclass
class Diagnosis:
  """One problem found in a run: `kind`, the step where it `began`, and a sentence."""

  kind: str
  began: Optional[int]
  detail: str


def text_repetition(text: str, n: int = 4) -> float:
  """1 - distinct character n-grams / n-grams of one CoT: ~0 for prose, -> 1 for "4444..."."""
  grams = [text[i : i + n] for i in range(len(text) - n + 1)]
  return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _threshold(run: Run, key: str, default: float) -> float:
  value = run.config.get(key)
  return float(value) if isinstance(value, (int, float)) else default


def sequence_ratio_tag(
  logged: bool, reference: Optional[str], reduction: Optional[str]
) -> Optional[str]:
  """The tag that holds the largest per-sequence geometric-mean PPO ratio, the quantity
  train.collapse_ppo_ratio was set on: policy/ppo_seq_ratio_max when it was `logged`; for runs
  logged before it existed, policy/ppo_ratio_max only where that is the same quantity (the
  reference's ratio to the base, objective.ppo_ratio_reference='base', mean-reduced); else None.
  The per-token maximum is never compared with the threshold: multi-epoch PPO moves single
  tokens far."""
  if logged:
    return "policy/ppo_seq_ratio_max"
  if reference == "base" and (reduction or "mean") == "mean":
    return "policy/ppo_ratio_max"
  return None


def _ppo_blowup(run: Run) -> Optional[Diagnosis]:
  """`sequence_ratio_tag`'s series above train.collapse_ppo_ratio."""
  tag = sequence_ratio_tag(
    run.series("policy/ppo_seq_ratio_max")[1].size > 0,
    run.config.get("objective.ppo_ratio_reference"),
    run.config.get("objective.logprob_reduction"),
  )
  if tag is None:
    return None
  steps, v = run.series(tag)
  limit = _threshold(run, "train.collapse_ppo_ratio", DEFAULT_PPO_RATIO)
  above = np.flatnonzero(v > limit)
  if not above.size:
    return None
  return Diagnosis(
    "collapse: PPO ratio blow-up",
    int(steps[above[0]]),
    f"{tag} first exceeded {limit:g} at step {steps[above[0]]} "
    f"(peak {v.max():.3g} at step {steps[np.argmax(v)]}; {above.size} of "
    f"{v.size} steps above)",
  )


def _repetition(run: Run) -> Optional[Diagnosis]:
  """Repetitive CoTs: the smoothed policy/repetition_rate above the collapse threshold, or logged
  steps where most CoTs repeat themselves (samples.jsonl)."""
  limit = _threshold(run, "train.collapse_repetition", DEFAULT_REPETITION)
  began, evidence = None, []
  steps, v = run.series("policy/repetition_rate")
  if v.size:
    smooth = moving_average(v, window_for(v.size))
    above = np.flatnonzero(smooth > limit)
    if above.size:
      began = int(steps[above[0]])
      evidence.append(
        f"policy/repetition_rate (smoothed) above {limit:g} from step {began}, last {v[-1]:.2f}"
      )
  example = None
  for row in run.samples:
    cots = row.get("cots") or []
    degenerate = [c for c in cots if text_repetition(c) > TEXT_REPETITION]
    if cots and len(degenerate) * 2 >= len(cots):
      step = int(row["step"])
      if example is None:
        example = (step, degenerate[0])
      began = step if began is None else min(began, step)
  if example is not None:
    evidence.append(f"most logged CoTs degenerate from step {example[0]}, e.g. {example[1][:60]!r}")
  return Diagnosis("collapse: repetitive CoTs", began, "; ".join(evidence)) if evidence else None


def _noise(v: np.ndarray, smooth: np.ndarray) -> float:
  """Robust per-step noise of a series around its moving average (scaled MAD)."""
  resid = v - smooth
  return float(1.4826 * np.median(np.abs(resid - np.median(resid)))) if v.size else 0.0


def _reward_crash(run: Run) -> Optional[Diagnosis]:
  """The smoothed reward falls from its running peak by more than max(0.5, 6 noise-levels of
  the smoothed curve). It began at the first step from which 5 raw values in a row lie below
  that level (searched back over two windows: the trailing average lags)."""
  tag = "answer/normalized_reward" if run.has("answer/normalized_reward") else "answer/logprob"
  steps, v = run.series(tag)
  w = window_for(v.size)
  if v.size < 2 * w + 2:
    return None
  smooth = moving_average(v, w)
  drop = max(0.5, 6.0 * _noise(v, smooth) / math.sqrt(w))
  peak = np.maximum.accumulate(smooth)
  fallen = np.flatnonzero(smooth < peak - drop)
  if not fallen.size:
    return None
  t = fallen[0]
  p = int(np.argmax(smooth[: t + 1]))
  level = peak[t] - drop
  onset = next((i for i in range(max(p, t - 2 * w), t + 1) if (v[i : i + 5] < level).all()), t)
  return Diagnosis(
    "collapse: reward crash",
    int(steps[onset]),
    f"{tag} (smoothed over {w}) fell from its peak {smooth[p]:.3g} (step "
    f"{steps[p]}) below {level:.3g} by step {steps[t]}; raw values stay below from "
    f"step {steps[onset]} (last smoothed {smooth[-1]:.3g})",
  )


def _no_eval(run: Run) -> Optional[Diagnosis]:
  every = run.config.get("train.eval_every")
  due = run.last_step >= every if isinstance(every, int) else run.last_step > 0
  method = (run.methods() or [None])[0]
  steps = run.series(run.metric_tag(method))[0] if method else np.zeros(0, np.int64)
  if not due or (steps > 0).any():
    return None
  what = "no held-out evaluation at all" if not steps.size else "only the step-0 (base) evaluation"
  return Diagnosis(
    "no evaluation during training",
    0,
    f"{what} in {run.last_step} training steps (train.eval_every={every})",
  )


def _below_base(run: Run) -> Optional[Diagnosis]:
  method = (run.methods() or [None])[0]
  if method is None:
    return None
  steps, v, lo, hi = run.interval(method)
  if v.size < 2 or steps[0] != 0 or not v[-1] < v[0]:
    return None
  start = len(v) - 1
  while start > 1 and v[start - 1] < v[0]:
    start -= 1
  significant = (
    "significantly (its interval excludes the base)" if hi[-1] < v[0] else ("within the interval")
  )
  return Diagnosis(
    "accuracy below the base model",
    int(steps[start]),
    f"{method} {v[-1]:.3f} at step {steps[-1]} vs {v[0]:.3f} for the base model, "
    f"below it since step {steps[start]}; {significant}",
  )


def _reward_up_accuracy_down(run: Run) -> Optional[Diagnosis]:
  """Held-out accuracy falls from its peak by more than max(0.05, the peak's interval
  half-width) while the smoothed reward at the last evaluation is above its value at the peak."""
  method = (run.methods() or [None])[0]
  if method is None:
    return None
  steps, v, lo, hi = run.interval(method)
  if v.size < 3:
    return None
  p = int(np.argmax(v))
  half = (hi[p] - lo[p]) / 2 if np.isfinite(hi[p] - lo[p]) else 0.0
  if p == v.size - 1 or not v[-1] < v[p] - max(0.05, half):
    return None
  tag = "answer/normalized_reward" if run.has("answer/normalized_reward") else "answer/logprob"
  rs, r = run.series(tag)
  if r.size < 4:
    return None
  w = window_for(r.size)
  smooth = moving_average(r, w)
  at = lambda s: smooth[max(int(np.searchsorted(rs, s, side="right")) - 1, 0)]  # noqa: E731
  rise = at(steps[-1]) - at(steps[p])
  if rise <= max(2.0 * _noise(r, smooth) / math.sqrt(w), 1e-9):
    return None
  return Diagnosis(
    "reward rising while held-out accuracy falls",
    int(steps[p]),
    f"{method} fell from {v[p]:.3f} (step {steps[p]}) to {v[-1]:.3f} (step "
    f"{steps[-1]}) while {tag} rose by {rise:.3g}",
  )


def _nonfinite(run: Run) -> Optional[Diagnosis]:
  steps, v = run.series("guard/nonfinite_update")
  bad = np.flatnonzero(v > 0)
  if not bad.size:
    return None
  return Diagnosis(
    "non-finite updates",
    int(steps[bad[0]]),
    f"{bad.size} step(s) had a non-finite loss or gradient (update skipped), "
    f"first at step {steps[bad[0]]}",
  )


CHECKS = (
  _ppo_blowup,
  _repetition,
  _reward_crash,
  _no_eval,
  _below_base,
  _reward_up_accuracy_down,
  _nonfinite,
)


def diagnose(run: Run) -> list:
  """Every problem `CHECKS` find in the run, in that order; [] for a healthy run."""
  return [d for d in (check(run) for check in CHECKS) if d is not None]
