"""The first GPU run, checked on the CPU: benchmarks/gpu/first_run.sh end to end in --tiny mode
(carried wheels installed from a folder, the benchmark, `train --config.model.path=random:tiny`
for three steps, a rerun that keeps the first run's directory, the stop line when JAX is not on
the GPU), the one-CUDA-stack check of pip's resolver report, the wheel folder's pins, and the
benchmark's priors that put the first ours/torch pair inside the default budget."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.accelerator import driver
from benchmarks.accelerator import workload as wl
from benchmarks.gpu import cuda_stack, wheels
from tests import helpers

SCRIPT = os.path.join(helpers.REPO, "benchmarks", "gpu", "first_run.sh")


def _report(*dists):
  return {"install": [{"metadata": {"name": n, "version": v}} for n, v in dists]}


# What pip resolved for requirements-gpu.txt + requirements-peers.txt (Python 3.12 x86-64,
# `make check-cuda-stack`, 2026-12-07): the CUDA libraries of the set.
ONE_STACK = [
  ("jax", "0.10.2"),
  ("jax-cuda13-plugin", "0.10.2"),
  ("jax-cuda13-pjrt", "0.10.2"),
  ("torch", "2.13.0"),
  ("nvidia-cudnn-cu13", "9.20.0.48"),
  ("nvidia-nccl-cu13", "2.29.7"),
  ("nvidia-cuda-runtime", "13.0.96"),
  ("nvidia-cusparselt-cu13", "0.8.1"),
  ("nvidia-nvshmem-cu13", "3.4.5"),
  ("nvidia-cublas", "13.1.1.3"),
]


def test_cuda_stack_check_reads_pips_report():
  found = cuda_stack.stacks(_report(*ONE_STACK))
  assert found == {
    "cudnn": ["nvidia-cudnn-cu13==9.20.0.48"],
    "nccl": ["nvidia-nccl-cu13==2.29.7"],
    "cuda runtime": ["nvidia-cuda-runtime==13.0.96"],
    "cuda majors": ["13"],
  }
  assert cuda_stack.problems(found) == []
  # The old pins: jax[cuda12] beside PyPI's CUDA 13 torch, two of each.
  mixed = ONE_STACK + [
    ("jax-cuda12-plugin", "0.10.2"),
    ("nvidia-cudnn-cu12", "9.10.2.21"),
    ("nvidia-nccl-cu12", "2.27.3"),
    ("nvidia-cuda-runtime-cu12", "12.9.79"),
  ]
  bad = cuda_stack.problems(cuda_stack.stacks(_report(*mixed)))
  assert bad == [
    "cudnn: 2 distributions ['nvidia-cudnn-cu12==9.10.2.21', 'nvidia-cudnn-cu13==9.20.0.48']",
    "nccl: 2 distributions ['nvidia-nccl-cu12==2.27.3', 'nvidia-nccl-cu13==2.29.7']",
    "CUDA majors ['12', '13']: expected one",
  ]


def test_requirements_name_one_cuda_major():
  """requirements-gpu.txt asks for jax[cuda13] and the peers' file pulls it in beside torch."""

  def lines(path):
    with open(os.path.join(helpers.REPO, path)) as f:
      return [ln.split("#")[0].strip() for ln in f if ln.split("#")[0].strip()]

  gpu = lines("requirements-gpu.txt")
  assert gpu == ["jax[cuda13]==0.10.2"]
  assert "-r ../requirements-gpu.txt" in lines("benchmarks/requirements-peers.txt")


def test_wheel_folder_pins_are_requirements_pins():
  with open(os.path.join(helpers.REPO, "requirements.txt")) as f:
    text = f.read()
  got = wheels.pins()
  assert [p.split("==")[0] for p in got] == list(wheels.MISSING)
  assert all(f"\n{p}\n" in f"\n{text}" for p in got), got
  assert wheels.LIMIT_BYTES == 64 * 2**20


def test_priors_put_the_first_pair_inside_the_default_budget():
  """Default budget, 8B priors: the preflight, ours' step at Q=8, the peer's start and its step
  at Q=8 fit with a margin (the row ahead of them is the pair's other half, not four of ours)."""
  w = wl.make_workload(False)
  assert w.order()[:4] == ["ours/step/8", "torch/step/8", "ours/step/1", "torch/step/1"]
  first_pair = sum(
    w.estimate(r) for r in ("preflight", "ours/step/8", "torch/load", "torch/step/8")
  )
  budget = driver.parse(["--out=x"]).budget_s
  assert first_pair <= 0.75 * budget, (first_pair, budget)


# Priors no 40 s budget holds: every benchmark row is skipped by the budget, whatever this
# machine's speed (the rows themselves are checked by test_accelerator_benchmark.py); the torch
# probe is left out with --skip_torch for the same reason.
BENCH_FLAGS = "--skip_torch --row_estimates=ours/step/1=1000,ours/decode/1=1000"


def _run(results, wheel_dir, *flags, total_s, bench_s=40):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(
    PYTHON=sys.executable,
    TOTAL_S=str(total_s),
    BENCH_S=str(bench_s),
    BENCH_FLAGS=BENCH_FLAGS,
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
  )
  return subprocess.run(
    ["bash", SCRIPT, "--results", str(results), "--wheels", str(wheel_dir), *flags],
    cwd=helpers.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=total_s + 120,
  )


@pytest.mark.slow
def test_first_run_tiny_end_to_end(tmp_path, smollm2_path):
  """One wheel (this package) and the tokenizer folder in the carried folder; a budget that
  leaves the benchmark its preflight (its rows are skipped by the budget and BENCH_FLAGS, and
  say so); then
  `train --config.model.path=random:tiny`, three steps, reading the carried tokenizer."""
  del smollm2_path  # the tokenizer is saved from the package (skips where it is absent)
  from markovian_jax.models import random_models
  from markovian_jax.runtime import summary

  carried = tmp_path / "wheels"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--quiet",
      "--no-deps",
      "--no-build-isolation",
      "--wheel-dir",
      str(carried),
      helpers.REPO,
    ],
    check=True,
    capture_output=True,
  )
  random_models.save_tokenizer(str(carried / wheels.TOKENIZER_DIR))
  results = tmp_path / "results"
  done = _run(results, carried, "--tiny", total_s=480)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  (run,) = results.iterdir()
  log = (run / "first_run.log").read_text()
  versions = (run / "versions.txt").read_text().splitlines()
  assert versions[0].startswith("python 3.") and any(v.startswith("jax 0.") for v in versions)
  assert "installing markovian_jax-0.1.0-py3-none-any.whl" in log
  assert (run / "site" / "markovian_jax" / "__init__.py").is_file()  # not the test's venv
  assert "JAX on cpu" in log
  bench = json.loads((run / "bench" / "accelerator.json").read_text())
  assert bench["order"] == ["ours/step/1", "torch/step/1", "ours/decode/1", "torch/decode/1"]
  assert bench["rows"] == {} and bench["failed"] == []  # --questions, --batches, BENCH_FLAGS
  skipped = {s["row"]: s["reason"] for s in bench["skipped"]}
  assert list(skipped) == bench["order"]
  assert skipped["ours/step/1"].startswith("budget: expected 1000 s"), skipped
  assert skipped["torch/step/1"] == "--skip_torch"
  assert "benchmark with a budget of 40 s" in log
  assert "attention: xla (auto: cuDNN attention is GPU only; JAX runs on cpu)" in log
  assert "model random:tiny: 2 layers, d=64, vocab 49152" in log
  losses = summary.read_scalars(str(run / "train"))["train/loss"]
  assert [s for s, _ in losses] == [1, 2, 3]
  # The same command once more, requiring the GPU: one line, exit 2, before the benchmark; the
  # first run's directory is still there, whole.
  before = sorted(p.relative_to(run) for p in run.rglob("*"))
  stop = _run(results, tmp_path / "absent", "--tiny", "--require-gpu", total_s=120)
  assert stop.returncode == 2, stop.stdout[-3000:]
  errors = [ln for ln in stop.stdout.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(
    "error: JAX is not on the GPU with JAX_PLATFORMS=cuda ("
  ), stop.stdout[-3000:]
  runs = sorted(results.iterdir())
  assert len(runs) == 2 and run in runs
  assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
  second = next(r for r in runs if r != run)
  assert not (second / "bench").exists() and "no wheels folder" in stop.stdout
