"""The answer-likelihood methods side by side on the demo task: every method and its Markovian
twin (objectives.METHOD_NAMES), with the paper's Markovian objective as the anchor, on the same
seeds, steps and evaluation; then `markovian_jax.report` over them (methods_table.md).

  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m benchmarks.methods \
      --root=runs/methods --seeds=0,1 --steps=40 --parallel=2

Each (variant, seed) is one `python -m markovian_jax.train` run in <root>/<variant>-s<seed>, with
free-length CoTs (sampling.cot_stops_at_eos: a method's length terms and the CoT lengths read
real lengths) and greedy evaluation (eval.temperature=0) every steps/2 steps, so the report's
accuracy is greedy accuracy at the best checkpoint by the selection split. A run that finished
(its final checkpoint exists) is kept; one that stopped after a checkpoint is resumed from it
(train.resume, exact); nothing is deleted. `--parallel` runs go at once (two on two CPU cores).
`--report_only` only writes the report of what <root> holds.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time

from absl import app, flags

from markovian_jax import objectives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHOR = "markovian"  # the paper's objective, configs.base.VARIANTS
VARIANTS = (ANCHOR, *objectives.METHOD_NAMES)

_ROOT = flags.DEFINE_string("root", "runs/methods", "Parent of the runs; the report goes here.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "config.train.seed of each run of a variant.")
_STEPS = flags.DEFINE_integer("steps", 40, "config.train.num_steps of every run.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Which variants (default: all).")
_CONFIG = flags.DEFINE_string("config", "configs/demo.py", "The task config, run as <config>:<v>.")
_PARALLEL = flags.DEFINE_integer("parallel", 2, "Runs at once.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Do not train: report on --root.")


def run_dir(root: str, variant: str, seed: int) -> str:
  return os.path.join(root, f"{variant}-s{seed}")


def train_args(config: str, variant: str, seed: int, steps: int, workdir: str) -> list:
  """The train CLI's arguments of one run: the protocol every run shares."""
  return [
    f"--config={config}:{variant}",
    f"--config.train.seed={seed}",
    f"--config.train.num_steps={steps}",
    f"--config.train.eval_every={max(1, steps // 2)}",
    f"--config.train.checkpoint_every={max(1, steps // 2)}",
    "--config.sampling.cot_stops_at_eos=True",
    "--config.eval.temperature=0",
    f"--config.workdir={workdir}",
  ]


def saved_steps(workdir: str) -> list:
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def finished(workdir: str, steps: int) -> bool:
  return steps in saved_steps(workdir)


def run_args(config: str, variant: str, seed: int, steps: int, workdir: str) -> list:
  """train_args, resuming a run that stopped after a checkpoint."""
  resume = ["--config.train.resume=True"] if saved_steps(workdir) else []
  return train_args(config, variant, seed, steps, workdir) + resume


def _one(config: str, variant: str, seed: int, steps: int, root: str) -> tuple:
  workdir = run_dir(root, variant, seed)
  if finished(workdir, steps):
    return variant, seed, 0, 0.0, "kept"
  os.makedirs(root, exist_ok=True)
  start = time.monotonic()
  with open(workdir + ".log", "w") as log:
    rc = subprocess.call(
      [
        sys.executable,
        "-m",
        "markovian_jax.train",
        *run_args(config, variant, seed, steps, workdir),
      ],
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
    )
  return variant, seed, rc, time.monotonic() - start, workdir + ".log"


def main(argv) -> int:
  del argv
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    print(f"error: --variants: unknown {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
    return 2
  root = os.path.abspath(_ROOT.value)
  if not _REPORT_ONLY.value:
    seeds = [int(s) for s in _SEEDS.value]
    jobs = [(v, s) for s in seeds for v in _VARIANTS.value]  # every variant's first seed first
    failed = []
    with concurrent.futures.ThreadPoolExecutor(max(1, _PARALLEL.value)) as pool:
      for variant, seed, rc, took, note in pool.map(
        lambda job: _one(_CONFIG.value, *job, _STEPS.value, root), jobs
      ):
        print(f"{variant} seed {seed}: exit {rc}, {took:.0f} s ({note})", flush=True)
        if rc:
          failed.append(f"{variant}-s{seed}")
    if failed:
      print(f"error: runs failed: {failed} (their logs: {root}/<run>.log)", file=sys.stderr)
      return 1
  return subprocess.call(
    [sys.executable, "-m", "markovian_jax.report", f"--workdir={root}"], cwd=REPO
  )


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
