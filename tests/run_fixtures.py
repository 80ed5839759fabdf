"""Run directories for the report, export and analysis tests (fixtures registered in
tests/conftest.py's `pytest_plugins`, so test modules request them by name and import nothing).

`demo_runs`: two short runs of the real training loop on the tiny model, one Markovian and one
with prompt.markovian=False, side by side under one parent (what `report --workdir=PARENT` and
`analyze fragility --compare` read). Session-scoped: trained once per process (conftest.py puts
every module that reads them on one pytest-xdist worker). Tests may add files beside them
(report.md, analysis/) but change nothing the runs wrote.

`synthetic_run`: a run directory written directly (tensorboardX events, config.json,
samples.jsonl, eval rows) whose curves show a chosen failure, or none. `table_run`: one with eval
rows and selection scores only, for the results table.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest


@pytest.fixture(scope="session")
def demo_runs(tiny_model_dir, tmp_path_factory):
  """{"parent": dir, "markovian": dir, "non_markovian": dir}: 4 steps each, evaluated at 0, 2
  and 4, checkpoints 2 and 4, CoTs logged every step."""
  from markovian_jax.trainer import Trainer
  from tests.helpers import make_config

  parent = tmp_path_factory.mktemp("demo_runs")
  out = {"parent": str(parent)}
  for name, markovian in (("markovian", True), ("non_markovian", False)):
    workdir = parent / name
    Trainer(make_config(tiny_model_dir, workdir, **{"prompt.markovian": markovian})).run()
    out[name] = str(workdir)
  return out


HEALTHY_COTS = (
  "First add the tens, then the ones, and the sum of {a} and {b} is {c}.",
  "We combine {a} with {b}: counting up gives {c} in total, so that is it.",
  "Take {a}, add {b}; carrying the one yields {c} which answers the question.",
)


def synthetic_run(
  path,
  *,
  steps: int = 200,
  eval_every: int = 20,
  eval_size: int = 500,
  seed: int = 0,
  ppo_blowup_at=None,
  repeat_from=None,
  crash_at=None,
  accuracy=None,
  evaluate: bool = True,
  config: dict = None,
  token_ratio_max=None,
  sequence_ratio: bool = True,
) -> str:
  """Writes a run directory whose tags follow healthy PPO training (R rising from 0 to 0.8 with
  noise, ratios near 1, varied CoTs, accuracy 0.30 -> 0.45) unless told otherwise:
  ppo_blowup_at: the sequence-level ratio policy/ppo_seq_ratio_max (and the per-token
  policy/ppo_ratio_max) ~25 from that step; token_ratio_max: the per-token maximum alone at that
  value throughout (multi-epoch PPO), the sequences' ratios near 1; sequence_ratio=False: no
  policy/ppo_seq_ratio_max at all (a run logged before that tag existed); repeat_from: "4444..."
  CoTs and repetition rate 0.95 from that step; crash_at: R falls to -3 from that step; accuracy:
  {step: accuracy} replacing the eval curve; evaluate=False: only the step-0 evaluation."""
  from tensorboardX import SummaryWriter

  from markovian_jax.training.evaluation import accuracy_interval

  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(seed)
  writer = SummaryWriter(str(path))
  s = np.arange(1, steps + 1)
  reward = 0.8 * s / steps + rng.normal(0, 0.3, steps)
  if crash_at:
    reward[s >= crash_at] = -3.0 + rng.normal(0, 0.3, int((s >= crash_at).sum()))
  ratio_max = 1.3 + 0.2 * rng.random(steps)
  seq_ratio_max = 1.05 + 0.05 * rng.random(steps)
  if token_ratio_max:
    ratio_max[:] = token_ratio_max + rng.random(steps)
  if ppo_blowup_at:
    ratio_max[s >= ppo_blowup_at] = 25.0 + rng.random(int((s >= ppo_blowup_at).sum()))
    seq_ratio_max[s >= ppo_blowup_at] = 21.75 + rng.random(int((s >= ppo_blowup_at).sum()))
  repetition = 0.02 + 0.01 * rng.random(steps)
  if repeat_from:
    repetition[s >= repeat_from] = 0.95
  for i, step in enumerate(s.tolist()):
    tags = {
      "answer/normalized_reward": reward[i],
      "answer/logprob": -2.0 + reward[i],
      "answer/baseline_logprob": -2.0,
      "answer/cot_contains_answer": 0.1 + 0.3 * i / steps,
      "train/loss": rng.normal(0, 0.1),
      "train/pg_loss": rng.normal(0, 0.1),
      "train/grad_norm": 1.0 + 0.1 * rng.random(),
      "policy/kl": 0.01 * i / steps,
      "policy/ppo_ratio_mean": 1.0 + 0.01 * rng.random(),
      "policy/ppo_ratio_max": ratio_max[i],
      "policy/ppo_seq_ratio_max": seq_ratio_max[i],
      "policy/ppo_clip_fraction": 0.05 * rng.random(),
      "policy/repetition_rate": repetition[i],
      "guard/nonfinite_update": 0.0,
    }
    for tag, v in tags.items():
      if sequence_ratio or tag != "policy/ppo_seq_ratio_max":
        writer.add_scalar(tag, float(v), step)
  curve = accuracy or {e: 0.30 + 0.15 * e / steps for e in range(0, steps + 1, eval_every)}
  if not evaluate:
    curve = {0: curve[0]}
  for step, acc in curve.items():
    hits = np.zeros((eval_size, 1))
    hits[: round(acc * eval_size)] = 1
    low, high = accuracy_interval(hits)
    for m, a, lo, hi in (
      ("anchor", hits.mean(), low, high),
      ("simple", hits.mean() * 0.9, low * 0.9, high * 0.9),
    ):
      for k, v in (("accuracy", a), ("ci95_low", lo), ("ci95_high", hi)):
        writer.add_scalar(f"eval/{m}/{k}", float(v), step)
    writer.add_scalar("eval/cot_contains_answer", 0.2, step)
  writer.close()
  cfg = {
    "task": "gsm8k",
    "workdir": str(path),
    "prompt": {"markovian": True},
    "objective": {"kind": "ppo"},
    "optim": {"lr": 1e-4},
    "train": {
      "num_steps": steps,
      "eval_every": eval_every,
      "collapse_ppo_ratio": 10.0,
      "collapse_repetition": 0.8,
    },
    "eval": {"num_examples": eval_size},
  }
  for key, value in (config or {}).items():
    section, _, leaf = key.rpartition(".")
    (cfg.setdefault(section, {}) if section else cfg)[leaf] = value
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  with open(os.path.join(path, "samples.jsonl"), "w") as f:
    for step in range(1, steps + 1, 10):
      a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
      cots = [t.format(a=a, b=b, c=a + b) for t in HEALTHY_COTS]
      if repeat_from and step >= repeat_from:
        cots = ["4444 4444 4444 4444 4444 4444 4444 4444"] * 3
      rewards = [-2.0 + reward[step - 1]] * 3
      f.write(
        json.dumps(
          {
            "step": step,
            "task": "gsm8k",
            "id": f"gsm8k/train/{step}",
            "question": f"What is {a} + {b}?",
            "answer": str(a + b),
            "cots": cots,
            "rewards": rewards,
            "normalized": [reward[step - 1]] * 3,
            "base_cot": "Let me think.",
            "base_score": -2.0,
          }
        )
        + "\n"
      )
  os.makedirs(os.path.join(path, "eval"), exist_ok=True)
  with open(os.path.join(path, "eval", "step_0.jsonl"), "w") as f:
    for q in range(eval_size):
      f.write(
        json.dumps(
          {
            "id": f"gsm8k/test/{q}",
            "question": f"q{q}",
            "gold": "1",
            "sample": 0,
            "cot": "one",
            "answer_text": "1",
            "predictions": {"anchor": "1"},
            "correct": {"anchor": True},
          }
        )
        + "\n"
      )
  return str(path)


def table_run(
  path,
  task,
  variant,
  test_acc: dict,
  selection: dict,
  n: int = 200,
  model: str = "llama",
  full: int = 0,
):
  """A run directory with eval rows (eval/step_N.jsonl, n questions, the first round(acc * n)
  correct), their scalars and the selection split's accuracy per step; config.json records the
  model and the full test size `full` (0: the whole split)."""
  from tensorboardX import SummaryWriter

  os.makedirs(os.path.join(path, "eval"), exist_ok=True)
  writer = SummaryWriter(str(path))
  for step in range(1, 41):
    writer.add_scalar("train/loss", 0.0, step)
  for step, acc in test_acc.items():
    k = round(acc * n)
    with open(os.path.join(path, "eval", f"step_{step}.jsonl"), "w") as f:
      for i in range(n):
        f.write(
          json.dumps(
            {
              "id": f"{task}/test/{i}",
              "question": f"q{i}",
              "gold": "1",
              "cot": "c",
              "sample": 0,
              "correct": {"anchor": i < k, "simple": False},
            }
          )
          + "\n"
        )
    writer.add_scalar("eval/anchor/accuracy", k / n, step)
  for step, acc in selection.items():
    writer.add_scalar("selection/anchor/accuracy", acc, step)
  writer.close()
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(
      {
        "task": task,
        "variant": variant,
        "model": {"path": model},
        "eval": {"num_examples": n, "final_num_examples": full},
      },
      f,
    )
  return str(path)
