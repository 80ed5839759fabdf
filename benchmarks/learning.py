"""Does the demo learn? Trains configs/demo.py for a few hundred steps and reports the curves.

  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m benchmarks.learning \
      --steps=200 --eval_every=50 --eval_examples=32 --workdir=runs/learning \
      [--config=configs/demo.py] [--config.optim.lr=1e-4 ...]

Runs `markovian_jax.trainer.Trainer` (the real loop: sampling, scoring, LoRA updates, held-out
evaluation at step 0 and every `eval_every` steps), then reads the run's TensorBoard scalars back
and prints
  * the normalised reward (moving average) over the first and the last window of steps;
  * the held-out accuracy for every answer extractor, at step 0 (the base model) and at the end;
  * the fraction of sampled CoTs that contain the gold answer, first and last window;
  * the per-step time split (sample / score / update), the first step (compilation) apart;
  * the diagnoses of `markovian_jax.reporting.diagnoses` (collapse, accuracy below the base
    model, ...);
and writes the run's report into the workdir (`markovian_jax.report`: report.md with example CoTs,
report_figures/training.png and eval.png).

`--report_only` skips training and reports on an existing (possibly still running) workdir.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
import time

from absl import app, flags, logging
import numpy as np

from markovian_jax import train
from markovian_jax.runtime.errors import UserError

_DEMO = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"
)
# train.py owns the --config flag (config file + --config.x=y overrides); the demo is our default.
flags.FLAGS.set_default("config", _DEMO)
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps (config.train.num_steps).")
_WORKDIR = flags.DEFINE_string(
  "workdir",
  "runs/learning",
  "Run directory (TensorBoard events, checkpoints, eval JSONL, PNG); "
  "the default lies under the gitignored runs/.",
)
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Held-out evaluation every N steps.")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 32, "Held-out examples per evaluation.")
_WINDOW = flags.DEFINE_integer("window", 20, "Moving-average window, in steps.")
_SAMPLES = flags.DEFINE_integer("show_cots", 3, "Example questions per logged step in report.md.")
_REPORT_ONLY = flags.DEFINE_bool(
  "report_only", False, "Do not train: report on --workdir as it is."
)


# ------------------------------------------------------------------ report


def _first_last(values: np.ndarray, window: int) -> tuple[float, float]:
  """Mean of the first and of the last `window` points."""
  if values.size == 0:
    return float("nan"), float("nan")
  w = min(window, values.size)
  return float(values[:w].mean()), float(values[-w:].mean())


def report(workdir: str, window: int, show_cots: int, wall_s: float | None = None) -> str:
  """Prints the learning summary of `workdir` and writes the run's report (report.md and its
  figures, `markovian_jax.report`); returns the report's path."""
  from markovian_jax.reporting import diagnoses as ra
  from markovian_jax.reporting import markdown as report_lib
  from markovian_jax.reporting import runs as report_runs

  run = report_runs.load_run(report_runs.find_runs(workdir)[0])
  steps, _ = run.series("answer/normalized_reward")
  if steps.size == 0:
    raise report_runs.ReportError(
      f"{workdir!r} has no training steps logged yet (answer/normalized_reward)"
    )
  w = min(window, steps.size)
  print(f"\n=== learning report: {workdir} ({steps.size} steps, window {w}) ===")

  def first_last_line(name, tag, fmt="{:+.3f}"):
    _, v = run.series(tag)
    if v.size:
      a, b = _first_last(v, w)
      print(
        f"  {name:<28} first {w:>3}: {fmt.format(a):>8}   last {w:>3}: {fmt.format(b):>8}"
        f"   (delta {fmt.format(b - a)})"
      )

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

  print("held-out accuracy [95% interval: Wilson, or over question means with several samples]:")
  for m in run.methods():
    es, ev, low, high = run.interval(m)
    points = "  ".join(f"@{s}: {v:.3f} [{a:.2f}, {b:.2f}]" for s, v, a, b in zip(es, ev, low, high))
    print(f"  {m:<12} {points}")

  _, sample_s = run.series("perf/sample_s")
  _, score_s = run.series("perf/score_s")
  _, update_s = run.series("perf/update_s")
  _, step_s = run.series("perf/step_s")
  if step_s.size:
    print(
      "per-step time (s): first step (includes compilation) "
      f"{step_s[0]:.1f} = sample {sample_s[0]:.1f} + score {score_s[0]:.1f} + update "
      f"{update_s[0]:.1f}"
    )
    if step_s.size > 1:
      rest = slice(1, None)
      med = lambda x: float(np.median(x[rest]))  # noqa: E731
      print(
        f"  later steps, median: {med(step_s):.2f} = sample {med(sample_s):.2f} + score "
        f"{med(score_s):.2f} + update {med(update_s):.2f}   (mean {step_s[rest].mean():.2f}, "
        f"p90 {np.percentile(step_s[rest], 90):.2f})"
      )
    if wall_s is not None:
      other = wall_s - step_s.sum()
      print(
        f"  wall {wall_s / 60:.1f} min: steps {step_s.sum() / 60:.1f} min, evaluation + "
        f"checkpoints + model load {other / 60:.1f} min"
      )
  for diagnosis in ra.diagnose(run):
    print(f"diagnosis: {diagnosis.kind} (from step {diagnosis.began}): {diagnosis.detail}")
  written = report_lib.write_report(workdir, examples=show_cots)
  for path in written.figures:
    print(f"figure: {path}")
  print(f"report: {written.path}")
  return written.path


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
    except (FileNotFoundError, UserError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    return
  config = _configure(train._CONFIG.value)
  if os.path.isdir(workdir) and os.listdir(workdir) and not config.train.resume:
    raise app.UsageError(
      f"--workdir {workdir} is not empty: pick a new one, pass "
      "--config.train.resume=true to continue it, or --report_only"
    )
  absl_logger = pylogging.getLogger("absl")
  absl_logger.setLevel(pylogging.INFO)
  absl_logger.addFilter(lambda r: r.levelno >= pylogging.WARNING or "orbax" not in r.pathname)
  from markovian_jax.runtime import host_allocator

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
