"""Does the demo learn? Trains configs/demo.py for a few hundred steps and reports the curves.

  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m benchmarks.learning \
      --steps=200 --eval_every=50 --eval_examples=32 --workdir=runs/learning \
      [--config=configs/demo.py] [--config.optim.lr=1e-4 ...]

Runs `markovian_jax.train.Trainer` (the real loop: sampling, scoring, LoRA updates, held-out
evaluation at step 0 and every `eval_every` steps), then reads the run's TensorBoard scalars back
and prints
  * the normalised reward (moving average) over the first and the last window of steps;
  * the held-out accuracy for every answer extractor, at step 0 (the base model) and at the end;
  * the fraction of sampled CoTs that contain the gold answer, first and last window;
  * the per-step time split (sample / score / update), the first step (compilation) apart;
  * a few held-out CoTs at the first and the last evaluation;
and writes `learning.png` (normalised reward raw + moving average, held-out accuracy, contains-answer,
KL, repetition rate against the step) into the workdir.

`--report_only` skips training and reports on an existing (possibly still running) workdir.
"""

from __future__ import annotations

import glob
import json
import logging as pylogging
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from markovian_jax import train

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                     "demo.py")
# train.py owns the --config flag (config file + --config.x=y overrides); the demo is our default.
flags.FLAGS.set_default("config", _DEMO)
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps (config.train.num_steps).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/learning",
                               "Run directory (TensorBoard events, checkpoints, eval JSONL, PNG); "
                               "the default lies under the gitignored runs/.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Held-out evaluation every N steps.")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 32, "Held-out examples per evaluation.")
_WINDOW = flags.DEFINE_integer("window", 20, "Moving-average window, in steps.")
_SAMPLES = flags.DEFINE_integer("show_cots", 3, "Held-out CoTs to print from the first and last "
                                "evaluation.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Do not train: report on --workdir as it is.")


# ------------------------------------------------------------------ series helpers

def _interval(scalars: dict, method: str, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) of each evaluation's 95% interval; runs logged before `ci95_low` existed fall
  back to accuracy -+ the normal half-width `ci95`, and to NaN without either."""
  _, low = _series(scalars, f"eval/{method}/ci95_low")
  _, high = _series(scalars, f"eval/{method}/ci95_high")
  if low.size == acc.size and high.size == acc.size:
    return low, high
  _, half = _series(scalars, f"eval/{method}/ci95")
  if half.size != acc.size:
    half = np.full(acc.shape, np.nan)
  return acc - half, acc + half


def _series(scalars: dict, tag: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps int [T], values float64 [T]) of a scalar tag, sorted by step; empty if absent."""
  pts = sorted(dict(scalars.get(tag, [])).items())  # a resumed run may log a step twice
  if not pts:
    return np.zeros(0, np.int64), np.zeros(0)
  steps, values = zip(*pts)
  return np.asarray(steps), np.asarray(values, np.float64)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over the last `window` points (fewer at the start); float64 [T]."""
  c = np.cumsum(np.concatenate([[0.0], values]))
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def _first_last(values: np.ndarray, window: int) -> tuple[float, float]:
  """Mean of the first and of the last `window` points."""
  if values.size == 0:
    return float("nan"), float("nan")
  w = min(window, values.size)
  return float(values[:w].mean()), float(values[-w:].mean())


def _eval_methods(scalars: dict) -> list:
  return sorted(t[len("eval/"):-len("/accuracy")] for t in scalars
                if t.startswith("eval/") and t.endswith("/accuracy"))


# ------------------------------------------------------------------ report

def report(workdir: str, window: int, show_cots: int, wall_s: float | None = None) -> str:
  """Prints the learning summary of `workdir` and writes its PNG; returns the PNG path."""
  from markovian_jax import summary
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist")
  scalars = summary.read_scalars(workdir)
  if not scalars:
    raise FileNotFoundError(f"no TensorBoard scalars under {workdir!r}")
  steps, norm = _series(scalars, "answer/normalized_reward")
  if steps.size == 0:
    raise FileNotFoundError(f"{workdir!r} has no training steps logged yet (answer/normalized_reward)")
  w = min(window, steps.size)
  print(f"\n=== learning report: {workdir} ({steps.size} steps, window {w}) ===")

  def first_last_line(name, tag, fmt="{:+.3f}"):
    _, v = _series(scalars, tag)
    if v.size:
      a, b = _first_last(v, w)
      print(f"  {name:<28} first {w:>3}: {fmt.format(a):>8}   last {w:>3}: {fmt.format(b):>8}"
            f"   (delta {fmt.format(b - a)})")

  print("training (means over the first / last window of steps):")
  first_last_line("normalised reward", "answer/normalized_reward")
  first_last_line("raw reward (actor log-prob)", "answer/logprob")
  first_last_line("base reward (greedy CoT')", "answer/baseline_logprob")
  first_last_line("contains_answer", "answer/cot_contains_answer", "{:.3f}")
  first_last_line("KL to base", "policy/kl", "{:.4f}")
  first_last_line("entropy", "policy/entropy", "{:.3f}")
  first_last_line("repetition rate", "policy/repetition_rate", "{:.3f}")
  first_last_line("grad norm", "train/grad_norm", "{:.3f}")
  first_last_line("advantage std", "train/advantage_std", "{:.3f}")

  methods = _eval_methods(scalars)
  print("held-out accuracy [95% interval: Wilson, or over question means with several samples]:")
  for m in methods:
    es, ev = _series(scalars, f"eval/{m}/accuracy")
    low, high = _interval(scalars, m, ev)
    points = "  ".join(f"@{s}: {v:.3f} [{a:.2f}, {b:.2f}]" for s, v, a, b in zip(es, ev, low, high))
    print(f"  {m:<8} {points}")

  _, sample_s = _series(scalars, "perf/sample_s")
  _, score_s = _series(scalars, "perf/score_s")
  _, update_s = _series(scalars, "perf/update_s")
  _, step_s = _series(scalars, "perf/step_s")
  if step_s.size:
    print("per-step time (s): first step (includes compilation) "
          f"{step_s[0]:.1f} = sample {sample_s[0]:.1f} + score {score_s[0]:.1f} + update "
          f"{update_s[0]:.1f}")
    if step_s.size > 1:
      rest = slice(1, None)
      med = lambda x: float(np.median(x[rest]))  # noqa: E731
      print(f"  later steps, median: {med(step_s):.2f} = sample {med(sample_s):.2f} + score "
            f"{med(score_s):.2f} + update {med(update_s):.2f}   (mean {step_s[rest].mean():.2f}, "
            f"p90 {np.percentile(step_s[rest], 90):.2f})")
    if wall_s is not None:
      other = wall_s - step_s.sum()
      print(f"  wall {wall_s / 60:.1f} min: steps {step_s.sum() / 60:.1f} min, evaluation + "
            f"checkpoints + model load {other / 60:.1f} min")

  _print_cots(workdir, show_cots)
  path = plot(scalars, workdir, window)
  print(f"plot: {path}")
  return path


def _print_cots(workdir: str, n: int):
  files = glob.glob(os.path.join(workdir, "eval", "step_*.jsonl"))
  files.sort(key=lambda p: int(os.path.basename(p)[len("step_"):-len(".jsonl")]))
  if not files or n <= 0:
    return
  for path in sorted({files[0], files[-1]}, key=files.index):
    with open(path) as f:
      rows = [json.loads(line) for line in f][:n]
    print(f"held-out CoTs from {os.path.basename(path)}:")
    for r in rows:
      ok = ",".join(m for m, v in r.get("correct", {}).items() if v) or "-"
      print(f"  Q: {r['question']!r} gold {r['gold']!r}\n    CoT: {r['cot']!r}\n"
            f"    answer: {r.get('answer_text')!r} correct: {ok}")


def plot(scalars: dict, workdir: str, window: int) -> str:
  """Five panels against the training step; returns the PNG path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(5, 1, figsize=(9, 15), sharex=True)

  def raw_and_ma(ax, tag, label):
    s, v = _series(scalars, tag)
    if v.size:
      ax.plot(s, v, color="tab:blue", alpha=0.3, lw=0.8, label=f"{label} (per step)")
      ax.plot(s, moving_average(v, window), color="tab:blue", lw=2,
              label=f"{label} ({window}-step moving average)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)

  raw_and_ma(axes[0], "answer/normalized_reward", "normalised reward")
  axes[0].axhline(0.0, color="k", lw=0.6)
  for m in _eval_methods(scalars):
    s, v = _series(scalars, f"eval/{m}/accuracy")
    low, high = _interval(scalars, m, v)
    axes[1].errorbar(s, v, yerr=np.stack([v - low, high - v]), marker="o", capsize=3, label=m)
  axes[1].set_ylabel("held-out accuracy")
  axes[1].set_ylim(-0.02, 1.02)
  axes[1].grid(alpha=0.3)
  axes[1].legend(loc="best", fontsize=8)
  raw_and_ma(axes[2], "answer/cot_contains_answer", "CoT contains answer")
  raw_and_ma(axes[3], "policy/kl", "KL to base")
  raw_and_ma(axes[4], "policy/repetition_rate", "repetition rate")
  axes[4].set_xlabel("training step")
  fig.suptitle(f"Markovian training: {os.path.basename(os.path.normpath(workdir))}")
  fig.tight_layout()
  path = os.path.join(workdir, "learning.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ------------------------------------------------------------------ run

def _configure(config):
  """Applies the flags to the (already command-line overridden) config."""
  config.workdir = os.path.abspath(_WORKDIR.value)
  config.train.num_steps = _STEPS.value
  config.train.eval_every = _EVAL_EVERY.value
  config.eval.num_examples = _EVAL_EXAMPLES.value
  config.eval.batch_size = min(config.eval.batch_size, _EVAL_EXAMPLES.value)
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = os.path.abspath(_WORKDIR.value)
  if _REPORT_ONLY.value:
    try:
      report(workdir, _WINDOW.value, _SAMPLES.value)
    except FileNotFoundError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    return
  config = _configure(train._CONFIG.value)
  if (os.path.isdir(workdir) and os.listdir(workdir) and not config.train.resume):
    raise app.UsageError(f"--workdir {workdir} is not empty: pick a new one, pass "
                         "--config.train.resume=true to continue it, or --report_only")
  absl_logger = pylogging.getLogger("absl")
  absl_logger.setLevel(pylogging.INFO)
  absl_logger.addFilter(lambda r: r.levelno >= pylogging.WARNING or "orbax" not in r.pathname)
  from markovian_jax import host_allocator
  host_allocator.ensure(config.host_allocator)  # as train's main does; may restart this command
  t0 = time.perf_counter()
  trainer = train.Trainer(config)
  logging.info("training %d steps into %s", config.train.num_steps, workdir)
  trainer.run()
  wall = time.perf_counter() - t0
  sys.stdout.flush()
  report(workdir, _WINDOW.value, _SAMPLES.value, wall_s=wall)


if __name__ == "__main__":
  app.run(main)
