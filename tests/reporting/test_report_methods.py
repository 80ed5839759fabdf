"""`report --workdir=PARENT` compares methods: one row per variant, its seeds pooled (accuracy at
the best checkpoint by selection with the interval of the seeds' mean, answer log-prob, CoT
length, steps), each method beside its `_markovian` twin. Run directories are written by hand
(TensorBoard events, eval rows, config.json) with numbers chosen so that every cell is a
hand-computed mean, range or standard deviation; nothing is trained."""

import json
import math
import os

import numpy as np
import pytest

from markovian_jax.reporting import markdown as report
from markovian_jax.reporting import methods_table as mt
from markovian_jax.reporting import results_table as rt
from markovian_jax.reporting import runs as report_runs

N = 200  # questions per evaluation


def _run(
  path,
  variant,
  seed,
  test_acc: dict,
  selection: dict,
  tail_logprob,
  *,
  steps=40,
  tail_cot_length=None,
  cot_k=None,
  row_extra=None,
  config=None,
):
  """A run directory: `steps` training steps whose answer/logprob is -9 but for its last
  len(tail_logprob) steps (those values), policy/cot_length likewise from tail_cot_length
  (else not logged); eval/step_N.jsonl of N questions, the first round(acc * N) correct, per
  `test_acc`; the selection accuracy per `selection`; row_extra: {step: {key: [value per
  question]}} added to that step's rows. config.json records task gsm8k, the variant, train.seed
  and sampling.cot_length `cot_k` (when given)."""
  from tensorboardX import SummaryWriter

  os.makedirs(os.path.join(path, "eval"), exist_ok=True)
  writer = SummaryWriter(str(path))
  for i, step in enumerate(range(1, steps + 1)):
    back = steps - step  # 0 for the last step
    lp = tail_logprob[len(tail_logprob) - 1 - back] if back < len(tail_logprob) else -9.0
    writer.add_scalar("answer/logprob", lp, step)
    writer.add_scalar("train/loss", 0.0, step)
    if tail_cot_length is not None:
      length = (
        tail_cot_length[len(tail_cot_length) - 1 - back] if back < len(tail_cot_length) else 99.0
      )
      writer.add_scalar("policy/cot_length", length, step)
  for step, acc in test_acc.items():
    k = round(acc * N)
    extra = (row_extra or {}).get(step, {})
    with open(os.path.join(path, "eval", f"step_{step}.jsonl"), "w") as f:
      for i in range(N):
        row = {
          "id": f"gsm8k/test/{i}",
          "question": f"q{i}",
          "gold": "1",
          "cot": "c",
          "sample": 0,
          "correct": {"anchor": i < k},
        }
        row.update({key: values[i] for key, values in extra.items()})
        f.write(json.dumps(row) + "\n")
    writer.add_scalar("eval/anchor/accuracy", k / N, step)
  for step, acc in selection.items():
    writer.add_scalar("selection/anchor/accuracy", acc, step)
  writer.close()
  cfg = {
    "task": "gsm8k",
    "variant": variant,
    "model": {"path": "llama"},
    "train": {"seed": seed, "num_steps": 40},
    "eval": {"num_examples": N},
  }
  if cot_k is not None:
    cfg["sampling"] = {"cot_length": cot_k}
  for key, value in (config or {}).items():
    section, _, leaf = key.rpartition(".")
    cfg.setdefault(section, {})[leaf] = value
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(path)


def _methods_parent(root):
  """Two methods, each with its Markovian twin, two seeds each, and two paper variants of one
  run; directory names interleave the methods so that only the sort puts twins side by side.
  Per run, (test accuracy at the best selection step, mean of its last tenth of answer/logprob,
  CoT length):
    verifree_markovian  0.50 (step 20 of 20/40), -0.75, 11 (logged) | 0.60 (step 40), -1.25, 8
    jepo                0.30 (tie 20/40: 20), -2.0, K=50 | 0.35 (step 20, 36 steps run), -3.0, 50
    verifree            0.70, -0.5, 16 | 0.80, -0.5, 16   (lr differs between its runs)
    jepo_markovian      0.10, -4.0, 50 | 0.20, -5.0, 50
    markovian 0.45, ei 0.40: one run each, no CoT length known."""
  sel = {0: 0.2, 20: 0.7, 40: 0.5}  # best at 20
  late = {0: 0.2, 20: 0.5, 40: 0.8}  # best at 40
  _run(
    root / "a_verifree_markovian_s0",
    "verifree_markovian",
    0,
    {0: 0.2, 20: 0.50, 40: 0.30},
    sel,
    [-1.0, -1.0, -0.5, -0.5],
    tail_cot_length=[12.0, 12.0, 10.0, 10.0],
  )
  _run(
    root / "a_verifree_markovian_s1",
    "verifree_markovian",
    1,
    {0: 0.2, 20: 0.40, 40: 0.60},
    late,
    [-1.5, -1.5, -1.0, -1.0],
    tail_cot_length=[8.0] * 4,
  )
  _run(
    root / "b_jepo_s0",
    "jepo",
    0,
    {0: 0.2, 20: 0.30, 40: 0.45},
    {20: 0.6, 40: 0.6},
    [-2.0] * 4,
    cot_k=50,
  )
  # 36 steps: its tenth is the last 3 (the -7 before them must not count).
  _run(
    root / "b_jepo_s1",
    "jepo",
    1,
    {0: 0.2, 20: 0.35, 30: 0.25},
    {20: 0.9, 30: 0.1},
    [-7.0, -2.0, -3.0, -4.0],
    steps=36,
    cot_k=50,
  )
  _run(
    root / "c_verifree_s0",
    "verifree",
    0,
    {0: 0.2, 20: 0.70, 40: 0.10},
    sel,
    [-0.5] * 4,
    tail_cot_length=[16.0] * 4,
    config={"optim.lr": 1e-4},
  )
  _run(
    root / "c_verifree_s1",
    "verifree",
    1,
    {0: 0.2, 20: 0.10, 40: 0.80},
    late,
    [-0.5] * 4,
    tail_cot_length=[16.0] * 4,
    config={"optim.lr": 2e-4},
  )
  _run(
    root / "d_jepo_markovian_s0",
    "jepo_markovian",
    0,
    {20: 0.10, 40: 0.9},
    sel,
    [-4.0] * 4,
    cot_k=50,
  )
  _run(
    root / "d_jepo_markovian_s1",
    "jepo_markovian",
    1,
    {20: 0.9, 40: 0.20},
    late,
    [-5.0] * 4,
    cot_k=50,
  )
  _run(root / "e_markovian", "markovian", 0, {0: 0.2, 20: 0.45}, {20: 0.5}, [-1.0] * 4)
  _run(root / "f_ei", "ei", 0, {0: 0.2, 20: 0.40}, {20: 0.5}, [-1.0] * 4)
  return [report_runs.load_run(p, os.path.basename(p)) for p in report_runs.find_runs(root)]


ORDER = ["ei", "markovian", "verifree", "verifree_markovian", "jepo", "jepo_markovian"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
  """(directory, runs) of `_methods_parent`, written once for this module; tests only read it
  (the report test writes report.md and methods_table.md beside the runs)."""
  root = tmp_path_factory.mktemp("methods")
  return root, _methods_parent(root)


def _half_of_mean(*ps):
  """The normal approximation's 95% half-width of the mean of independent proportions of N."""
  return 1.96 * math.sqrt(sum(p * (1 - p) / N for p in ps)) / len(ps)


def test_seeds_pooled_per_variant_twins_adjacent(parent):
  table = mt.method_table(parent[1])
  assert [g.variant for g in table] == ORDER
  groups = {g.variant: g for g in table}
  expect = {  # variant: (accuracies, answer log-probs, CoT lengths, steps)
    "verifree_markovian": ([0.50, 0.60], [-0.75, -1.25], [11.0, 8.0], [40, 40]),
    "jepo": ([0.30, 0.35], [-2.0, -3.0], [50.0, 50.0], [40, 36]),
    "verifree": ([0.70, 0.80], [-0.5, -0.5], [16.0, 16.0], [40, 40]),
    "jepo_markovian": ([0.10, 0.20], [-4.0, -5.0], [50.0, 50.0], [40, 40]),
    "markovian": ([0.45], [-1.0], [], [40]),
    "ei": ([0.40], [-1.0], [], [40]),
  }
  for variant, (acc, lp, length, steps) in expect.items():
    g = groups[variant]
    assert len(g.runs) == len(steps) and g.seeds == list(range(len(steps))), variant
    assert [c.value for c in g.accuracy] == acc, variant
    assert [r.value for r in g.logprob] == lp, variant
    assert [r.value for r in g.cot_length] == length, variant
    assert g.steps == steps, variant
  assert {r.source for r in groups["verifree"].cot_length} == {"train"}
  assert {r.source for r in groups["jepo"].cot_length} == {"fixed"}
  assert {r.source for g in groups.values() for r in g.logprob} == {"train"}
  # Pooled: the mean, the range and the sd of two values |a - b| / sqrt(2).
  mean, low, high, sd = mt.spread([0.50, 0.60])
  assert (mean, low, high) == (pytest.approx(0.55, abs=1e-15), 0.50, 0.60)
  assert sd == pytest.approx(0.1 / math.sqrt(2), rel=1e-12)
  assert math.isnan(mt.spread([0.45])[3])
  # The interval of a seed mean: each seed's questions resampled (normal approximation as the
  # independent reference); one seed: the results table's own interval for that run.
  for variant, ps in (
    ("verifree_markovian", (0.5, 0.6)),
    ("jepo", (0.30, 0.35)),
    ("jepo_markovian", (0.1, 0.2)),
  ):
    low, high = groups[variant].interval
    half = _half_of_mean(*ps)
    assert low == pytest.approx(np.mean(ps) - half, abs=0.006), variant
    assert high == pytest.approx(np.mean(ps) + half, abs=0.006), variant
  one = groups["markovian"].accuracy[0]
  assert groups["markovian"].interval == (one.low, one.high)
  assert one.low == pytest.approx(0.45 - _half_of_mean(0.45), abs=0.006)
  assert groups["verifree"].differ == ["optim.lr"]
  assert groups["jepo"].differ == []


def test_the_table_text(parent):
  runs = parent[1]
  text = mt.format_method_table(mt.method_table(runs), runs)
  lines = text.splitlines()
  assert lines[0] == (
    "| Task | Variant | Runs | Test accuracy (best by selection) | 95% interval "
    "of the mean | Answer log-prob (train, last steps) | CoT tokens | Steps |"
  )
  rows = [line.split(" | ") for line in lines[2:8]]
  assert [r[1] for r in rows] == [
    "EI",
    "Markovian",
    "verifree",
    "verifree_markovian",
    "jepo",
    "jepo_markovian",
  ]
  by = {r[1]: r for r in rows}
  assert by["verifree_markovian"][2:4] == ["2", "55.0 (sd 7.1; 50.0 to 60.0) (periodic)"]
  assert by["jepo"][3] == "32.5 (sd 3.5; 30.0 to 35.0) (periodic)"
  assert by["verifree_markovian"][5] == "-1.000 (-1.250 to -0.750)"
  assert by["jepo"][5] == "-2.500 (-3.000 to -2.000)"
  # Mixed sources in one column: each cell names its own, the header none.
  assert by["verifree_markovian"][6] == "9.5 (8.0 to 11.0) (train, last steps)"
  assert by["jepo"][6] == "50.0 (50.0 to 50.0) (K fixed)"
  assert by["Markovian"][6] == "n/a"
  assert by["jepo"][7] == "36 to 40 |" and by["verifree"][7] == "40 |"
  assert by["Markovian"][3] == "45.0 (periodic)" and "n=200" in by["Markovian"][4]
  assert by["verifree_markovian"][4].startswith("[50.") and by["verifree_markovian"][4].endswith(
    "] n=200"
  )
  assert "GSM8K verifree: its runs differ in `optim.lr` besides the seed" in text
  assert "jepo: its runs differ" not in text


def test_readings_at_the_best_steps_evaluation(tmp_path):
  """Where the evaluation that gave the accuracy holds the answer log-prob and the CoT length
  per row, they are read there (per question, its samples averaged), not from training."""
  lp20 = [-1.0 if i % 2 else -0.5 for i in range(N)]  # mean -0.75
  len20 = [float(10 + i % 4) for i in range(N)]  # mean 11.5
  extra = {
    20: {"answer_logprob": lp20, "cot_length": len20},
    40: {"answer_logprob": [-6.0] * N, "cot_length": [3.0] * N},
  }
  for seed in (0, 1):
    _run(
      tmp_path / f"m{seed}",
      "nover",
      seed,
      {20: 0.5, 40: 0.4},
      {20: 0.9, 40: 0.1},
      [-3.0] * 4,
      tail_cot_length=[40.0] * 4,
      row_extra=extra,
      cot_k=50,
    )
  _run(tmp_path / "twin", "nover_markovian", 0, {20: 0.5}, {20: 0.9}, [-3.0] * 4, cot_k=50)
  runs = [report_runs.load_run(p, os.path.basename(p)) for p in report_runs.find_runs(tmp_path)]
  groups = mt.method_table(runs)
  g = groups[0]
  assert [x.value for x in g.logprob] == [-0.75, -0.75]
  assert [x.value for x in g.cot_length] == [11.5, 11.5]
  assert {x.source for x in g.logprob + g.cot_length} == {"eval"}
  text = mt.format_method_table(groups, runs)
  assert "| -0.750 (-0.750 to -0.750) (eval at best) | 11.5 (11.5 to 11.5) (eval at best) |" in text
  assert "| -3.000 (train, last steps) | 50.0 (K fixed) |" in text


def test_interval_of_logged_values_without_rows():
  """Cells read from logged scalars (no per-question scores): the mean -+ the root sum of the
  half-widths squared over the number of seeds."""
  cells = [
    rt.Cell(0.5, 0.4, 0.6, 100, 10, "selection", "a"),
    rt.Cell(0.7, 0.67, 0.73, 100, 10, "selection", "b"),
  ]
  low, high = mt.seed_mean_interval(cells)
  half = math.sqrt(0.1**2 + 0.03**2) / 2
  assert (low, high) == (pytest.approx(0.6 - half, rel=1e-12), pytest.approx(0.6 + half, rel=1e-12))
  nan = rt.Cell(0.5, float("nan"), float("nan"), 1, 10, "selection", "c")
  assert all(math.isnan(x) for x in mt.seed_mean_interval(cells[:1] + [nan]))


def test_variant_order_keeps_the_papers_and_pairs_twins():
  """The paper's columns first, then named variants as configs.base.VARIANTS lists them
  (ppo_base after paper_reward_grad), then unnamed ones by first appearance, twins adjacent."""
  assert mt.variant_order(
    [
      "zz_markovian",
      "ppo_base",
      "non_markovian",
      "aa",
      "markovian",
      "zz",
      "ei",
      "aa_markovian",
      "lone_markovian",
      "paper_reward_grad",
    ]
  ) == [
    "ei",
    "markovian",
    "non_markovian",
    "paper_reward_grad",
    "ppo_base",
    "zz",
    "zz_markovian",
    "aa",
    "aa_markovian",
    "lone_markovian",
  ]


def test_report_of_a_parent_holds_the_methods_table(parent, monkeypatch):
  from markovian_jax.reporting import figures as rf

  monkeypatch.setattr(rf, "comparison_figures", lambda runs, out: [])
  monkeypatch.setattr(rf, "training_figure", lambda run, out: None)
  monkeypatch.setattr(rf, "eval_figure", lambda run, out: None)
  tmp_path = parent[0]
  report.write_report(str(tmp_path))
  table = (tmp_path / report.METHODS_TABLE).read_text()
  assert "| GSM8K | verifree_markovian | 2 | 55.0 (sd 7.1; 50.0 to 60.0) (periodic) |" in table
  text = (tmp_path / "report.md").read_text()
  assert "## Methods compared (variants, seeds pooled)" in text and table.strip() in text
  # One run alone: no comparison.
  single = report.write_report(str(tmp_path / "e_markovian"))
  assert "## Methods compared" not in open(single.path).read()
  assert not (tmp_path / "e_markovian" / report.METHODS_TABLE).exists()
