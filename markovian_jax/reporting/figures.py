"""The report's PNG figures (matplotlib, Agg): one training figure and one evaluation figure per
run, and comparison figures across runs.

Per-step series are drawn raw (faint) with their moving average on top; evaluations as points
with their 95% intervals and the base model (step 0) as a dashed line. A panel whose tags the
run did not log (e.g. the PPO ratio of a PG run) is left out rather than drawn empty, and a
figure with no panel is not written.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Optional, Sequence

from etils import epath
import numpy as np

from markovian_jax.reporting.diagnoses import moving_average, window_for
from markovian_jax.reporting.runs import Run


@dataclasses.dataclass(frozen=True)
class Line:
  """One tag on a panel; `points`: an evaluation series, drawn as markers, not smoothed."""

  tag: str
  label: str
  points: bool = False


@dataclasses.dataclass(frozen=True)
class Panel:
  title: str
  ylabel: str
  lines: tuple
  zero_line: bool = False


TRAINING_PANELS = (
  Panel(
    "Normalised reward R = r - b",
    "R (nats)",
    (Line("answer/normalized_reward", "R"),),
    zero_line=True,
  ),
  Panel(
    "Answer log-prob: actor vs base",
    "log P(answer | CoT)",
    (
      Line("answer/logprob", "actor r (policy's CoT)"),
      Line("answer/baseline_logprob", "base b (base model's greedy CoT')"),
    ),
  ),
  Panel(
    "CoT contains the answer",
    "fraction of CoTs",
    (
      Line("answer/cot_contains_answer", "training CoTs (substring)"),
      Line("eval/cot_contains_answer", "held-out CoTs (number / letter)", points=True),
      Line("selection/cot_contains_answer", "selection CoTs (number / letter)", points=True),
    ),
  ),
  Panel("Losses", "loss", (Line("train/loss", "total loss"), Line("train/pg_loss", "PG loss"))),
  Panel("KL to the reference model", "KL (nats)", (Line("policy/kl", "KL"),)),
  Panel("Gradient norm", "global norm (before clipping)", (Line("train/grad_norm", "norm"),)),
  Panel(
    "PPO ratio pi / pi_behaviour",
    "ratio",
    (
      Line("policy/ppo_ratio_mean", "mean"),
      Line("policy/ppo_ratio_max", "max"),
      Line("policy/ppo_seq_ratio_max", "max per sequence (geometric mean; collapse guard)"),
    ),
  ),
  Panel(
    "PPO clip fraction",
    "fraction of tokens clipped",
    (Line("policy/ppo_clip_fraction", "clip fraction"),),
  ),
  Panel(
    "CoT repetition rate",
    "1 - distinct 3-grams / 3-grams",
    (Line("policy/repetition_rate", "repetition"),),
  ),
)
COLORS = (
  "tab:blue",
  "tab:orange",
  "tab:green",
  "tab:red",
  "tab:purple",
  "tab:brown",
  "tab:pink",
  "tab:gray",
  "tab:olive",
  "tab:cyan",
)


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _grid(plt, n: int, title: str, width: float = 12.0, row_height: float = 3.4):
  cols = 1 if n == 1 else 2
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(
    rows,
    cols,
    figsize=(width if cols == 2 else width / 1.6, row_height * rows + 0.6),
    squeeze=False,
  )
  axes = axes.ravel()
  for ax in axes[n:]:
    fig.delaxes(ax)
  fig.suptitle(title)
  return fig, axes[:n]


def save_png(fig, plt, path: str) -> str:
  """Writes the PNG through epath (a gs:// workdir too); returns `path`."""
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(buffer.getvalue())
  return path


def plot_smoothed(ax, steps, values, label: str, color: str):
  """Raw per-step points, faint, and their trailing moving average."""
  w = window_for(values.size)
  ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
  ax.plot(
    steps,
    moving_average(values, w),
    color=color,
    lw=1.8,
    label=f"{label}" + (f" ({w}-step average)" if w > 1 else ""),
  )


def _finish(ax, panel_title: str, ylabel: str, xlabel: str = "training step"):
  from matplotlib.ticker import MaxNLocator

  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_title(panel_title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(loc="best", fontsize=7)


def training_figure(run: Run, path: str) -> Optional[str]:
  """The training dynamics of one run (TRAINING_PANELS that have data); the PNG path or None."""
  panels = [p for p in TRAINING_PANELS if any(run.has(line.tag) for line in p.lines)]
  if not panels:
    return None
  plt = _pyplot()
  fig, axes = _grid(plt, len(panels), f"{run.name}: training dynamics")
  for ax, panel in zip(axes, panels):
    for color, line in zip(COLORS, panel.lines):
      steps, v = run.series(line.tag)
      if not v.size:
        continue
      if line.points:
        ax.plot(steps, v, "o--", color=color, ms=4, lw=0.8, label=line.label)
      else:
        plot_smoothed(ax, steps, v, line.label, color)
    if panel.zero_line:
      ax.axhline(0.0, color="k", lw=0.6)
    _finish(ax, panel.title, panel.ylabel)
  return save_png(fig, plt, path)


def _eval_panel(ax, run: Run, prefix: str, methods: Sequence[str]):
  for color, m in zip(COLORS, methods):
    steps, v, lo, hi = run.interval(m, prefix)
    if not v.size:
      continue
    yerr = np.stack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)])
    ax.errorbar(
      steps, v, yerr=yerr, marker="o", ms=4, capsize=3, color=color, label=f"{m} (95% interval)"
    )
    if steps[0] == 0:
      ax.axhline(v[0], color=color, ls="--", lw=1.0, label=f"{m}: base model (step 0)")


def eval_figure(run: Run, path: str) -> Optional[str]:
  """Accuracy per extraction method vs step, reported split and (when logged) selection split,
  with intervals and the base-model line; the PNG path or None without evaluations."""
  splits = [
    (prefix, title, run.methods(prefix))
    for prefix, title in (
      ("eval", "reported (test) split"),
      ("selection", "selection (validation) split"),
    )
  ]
  splits = [s for s in splits if s[2]]
  if not splits:
    return None
  plt = _pyplot()
  fig, axes = _grid(plt, len(splits), f"{run.name}: held-out evaluation")
  for ax, (prefix, title, methods) in zip(axes, splits):
    _eval_panel(ax, run, prefix, methods)
    logprob = methods == ["answer_logprob"]
    if not logprob:
      ax.set_ylim(-0.02, 1.02)
    _finish(
      ax,
      f"{'answer log-prob' if logprob else 'accuracy'} on the {title}",
      "mean answer log-prob (nats/token)" if logprob else "accuracy",
    )
  return save_png(fig, plt, path)


def comparison_figures(runs: Sequence[Run], directory: str) -> list:
  """With two or more runs: their smoothed rewards, and their primary held-out metric, on shared
  axes. Returns the PNG paths written."""
  if len(runs) < 2:
    return []
  plt = _pyplot()
  out = []
  reward = [r for r in runs if r.has("answer/normalized_reward") or r.has("answer/logprob")]
  if reward:
    fig, (ax,) = _grid(plt, 1, "Reward across runs", width=14.0, row_height=4.5)
    for color, run in zip(COLORS, reward):
      tag = "answer/normalized_reward" if run.has("answer/normalized_reward") else "answer/logprob"
      steps, v = run.series(tag)
      plot_smoothed(ax, steps, v, f"{run.name}: {tag.split('/')[1]}", color)
    ax.axhline(0.0, color="k", lw=0.6)
    _finish(ax, "normalised reward R (answer log-prob r where not normalised)", "reward (nats)")
    out.append(save_png(fig, plt, os.path.join(directory, "compare_reward.png")))
  evaluated = [r for r in runs if r.methods()]
  if evaluated:
    fig, (ax,) = _grid(plt, 1, "Held-out metric across runs", width=14.0, row_height=4.5)
    ylabel = "accuracy"
    for color, run in zip(COLORS, evaluated):
      m = run.methods()[0]
      ylabel = "mean answer log-prob" if m == "answer_logprob" else ylabel
      steps, v, lo, hi = run.interval(m)
      ax.errorbar(
        steps,
        v,
        yerr=np.stack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)]),
        marker="o",
        ms=4,
        capsize=3,
        color=color,
        label=f"{run.name}: {m}",
      )
      if steps[0] == 0:
        ax.axhline(v[0], color=color, ls="--", lw=1.0, label=f"{run.name}: base model")
    _finish(ax, "primary extraction method on the reported split (95% intervals)", ylabel)
    out.append(save_png(fig, plt, os.path.join(directory, "compare_eval.png")))
  return out
