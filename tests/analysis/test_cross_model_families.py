"""Prompts per family and cross-model reading with a reader of another family.

The family formats are checked against the reference's literal strings; a Qwen3 reader (a tiny
random checkpoint written by transformers, SmolLM2's tokenizer) scores logged CoTs through
`cross_model_scores` in its own ChatML format, against transformers' log-probs of the literal
ChatML text (float32 vs float32 torch: 16 float32 ulps); the figure's per-step means are checked
(its curves: test_cross_model_figure.py); `analyze cross_model` runs end to end on a SmolLM2 run
with that reader.
"""

import json
import os

import numpy as np
import pytest

from markovian_jax.analysis import cross_model
from markovian_jax.data import prompts
from tests import family_cases, helpers

BASE = (
  "You will be given an arithmetic problem, which you have 10 tokens to work through "
  "step-by-step. Question:"
)


def test_family_formats_are_the_references_strings():
  q, cot = "12 + 30", " add them: 42"
  assert prompts.cot_prompt("arithmetic", q, 10, prompt_format="mistral") == (
    f"[INST] {BASE} {q} [/INST]\nReasoning:"
  )
  assert prompts.answer_prompt("arithmetic", q, cot, 10, prompt_format="mistral") == (
    f"[INST] {BASE} <Redacted> [/INST]\nReasoning:{cot} Answer: "
  )
  assert prompts.cot_prompt("arithmetic", q, 10, prompt_format="chatml") == (
    f"<|im_start|>user\n{BASE} {q}<|im_end|>\n<|im_start|>assistant\nReasoning:"
  )
  assert prompts.answer_prompt(
    "arithmetic", q, cot, 10, markovian=False, prompt_format="chatml"
  ) == (f"<|im_start|>user\n{BASE} {q}<|im_end|>\n<|im_start|>assistant\nReasoning:{cot} Answer: ")
  assert {
    t: prompts.family_format(t) for t in ("llama", "gpt2", "phi3", "mistral", "qwen2", "qwen3")
  } == {
    "llama": "plain",
    "gpt2": "plain",
    "phi3": "plain",
    "mistral": "mistral",
    "qwen2": "chatml",
    "qwen3": "chatml",
  }


@pytest.mark.parametrize("fmt", ["mistral", "chatml"])
def test_answer_span_by_token_ids_in_family_formats(smollm2_path, fmt):
  from markovian_jax.models import load_tokenizer

  tok = load_tokenizer(smollm2_path)
  prefix = prompts.answer_prompt("arithmetic", "1 + 2", " three", 10, prompt_format=fmt)
  got = prompts.answer_tokens(tok, prefix, "3", fmt)
  assert tok.decode(got.ids[got.start :]).strip() == "3"
  # The family formats keep the tokenizer's own special tokens (its BOS), as the plain one does.
  assert list(got.ids) == list(tok(prefix + "3")["input_ids"])


@pytest.fixture(scope="module")
def qwen3_reader(tmp_path_factory, smollm2_path):
  """(directory, torch model, tokenizer) of a tiny random Qwen3 with SmolLM2's tokenizer."""
  from markovian_jax.models import load_tokenizer

  tok = load_tokenizer(smollm2_path)
  path = str(tmp_path_factory.mktemp("qwen3_reader"))
  model = family_cases.torch_model(
    "qwen3", path, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
  )
  tok.save_pretrained(path)
  return path, model, tok


def _torch_answer_logprob(model, tok, text: str) -> float:
  """Mean log-prob of the tokens after the last ("Answer", ":") pair, found by decoding."""
  torch = helpers.require("torch")
  ids = tok(text)["input_ids"]
  pieces = [tok.decode([i]) for i in ids]
  start = (
    max(
      j for j in range(len(ids) - 1) if pieces[j] in ("Answer", " Answer") and pieces[j + 1] == ":"
    )
    + 2
  )
  with torch.no_grad():
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
  return float(np.mean([lp[t - 1, ids[t]].item() for t in range(start, len(ids))]))


def test_reader_scores_in_its_own_format(qwen3_reader):
  from markovian_jax.analysis import run_inputs
  from markovian_jax.configs import base

  path, model, tok = qwen3_reader
  fmt = cross_model.reader_prompt_format(path)
  assert fmt == "chatml"
  c = base.get_config("arithmetic")
  c.model.path, c.model.dtype, c.mesh.shape = path, "float32", (1, 1, 1)
  c.sampling.cot_length = 10
  c.prompt.format = fmt
  ctx = run_inputs.load_context(c)
  rows = [
    {
      "step": 3,
      "question": "12 + 30",
      "answer": "42",
      "cots": [" add: 42", " 12, 30"],
      "base_cot": " hmm, numbers",
      "normalized": [0.2, -0.1],
      "rewards": [-1.0, -2.0],
    }
  ]
  result = cross_model.cross_model_scores(ctx, rows, batch_size=4)
  assert result.normalized
  for i, cot in enumerate(rows[0]["cots"]):
    text = (
      f"<|im_start|>user\n{BASE} <Redacted><|im_end|>\n<|im_start|>assistant\n"
      f"Reasoning:{cot} Answer: 42"
    )
    np.testing.assert_allclose(
      result.reader_cot[i], _torch_answer_logprob(model, tok, text), rtol=helpers.ulps(16)
    )
  base_text = (
    f"<|im_start|>user\n{BASE} <Redacted><|im_end|>\n<|im_start|>assistant\n"
    f"Reasoning: hmm, numbers Answer: 42"
  )
  np.testing.assert_allclose(
    result.reader_base, _torch_answer_logprob(model, tok, base_text), rtol=helpers.ulps(16)
  )


def test_known_reader_scores_order_sign_and_unnormalised_runs(qwen3_reader):
  """Two questions with different CoT's: each CoT is normalised by its own question's CoT'
  (rows repeated per CoT in order), R' = r'(CoT) - r'(CoT') (sign), and a run that logged no
  CoT' (objective.normalize_reward=False) compares plain r' with the run's r. Every score is
  transformers' log-prob of the literal ChatML text."""
  from markovian_jax.analysis import run_inputs
  from markovian_jax.configs import base

  path, model, tok = qwen3_reader
  c = base.get_config("arithmetic")
  c.model.path, c.model.dtype, c.mesh.shape = path, "float32", (1, 1, 1)
  c.sampling.cot_length = 10
  c.prompt.format = cross_model.reader_prompt_format(path)
  ctx = run_inputs.load_context(c)

  def text(cot, answer):
    return (
      f"<|im_start|>user\n{BASE} <Redacted><|im_end|>\n<|im_start|>assistant\n"
      f"Reasoning:{cot} Answer: {answer}"
    )

  rows = [
    {
      "step": 1,
      "question": "12 + 30",
      "answer": "42",
      "cots": [" add: 42", " 12, 30"],
      "base_cot": " hmm, numbers",
      "normalized": [0.2, -0.1],
      "rewards": [-1.0, -2.0],
    },
    {
      "step": 2,
      "question": "5 + 6",
      "answer": "11",
      "cots": [" so 11"],
      "base_cot": " five six seven",
      "normalized": [0.4],
      "rewards": [-0.5],
    },
  ]
  result = cross_model.cross_model_scores(ctx, rows, batch_size=4)
  cot_lp = [
    _torch_answer_logprob(model, tok, text(cot, r["answer"])) for r in rows for cot in r["cots"]
  ]
  base_lp = [
    _torch_answer_logprob(model, tok, text(r["base_cot"], r["answer"]))
    for r in rows
    for _ in r["cots"]
  ]
  # The checks below can tell the sign and the per-question CoT' apart only if these differ.
  assert np.abs(np.subtract(cot_lp, base_lp)).min() > 1e-3 and abs(base_lp[0] - base_lp[2]) > 1e-3
  assert result.normalized and result.steps.tolist() == [1, 1, 2]
  np.testing.assert_allclose(result.reader_base, base_lp, rtol=helpers.ulps(16))
  # R' = cot - base: each within 16 ulps of |lp|, so 32 ulps of the log-probs (R' can be ~0).
  np.testing.assert_allclose(
    result.reader, np.subtract(cot_lp, base_lp), rtol=0, atol=helpers.ulps(32, of=base_lp)
  )
  assert result.run.tolist() == [0.2, -0.1, 0.4]

  plain = [{k: v for k, v in r.items() if k != "base_cot"} | {"normalized": None} for r in rows]
  unnormalised = cross_model.cross_model_scores(ctx, plain, batch_size=4)
  assert not unnormalised.normalized and np.isnan(unnormalised.reader_base).all()
  np.testing.assert_allclose(unnormalised.reader, cot_lp, rtol=helpers.ulps(16))
  assert unnormalised.run.tolist() == [-1.0, -2.0, -0.5]


def test_step_means_and_the_training_figure(tmp_path):
  # The figure's curves themselves: tests/reporting/test_cross_model_figure.py.
  steps = np.repeat(np.arange(60), 2)

  def result(shift):
    run = np.sin(steps / 9.0) + shift
    return cross_model.CrossModelResult(steps, run, run + 0.5, np.full(run.shape, 0.25), True)

  a, b = result(0.0), result(1.0)
  s, run_means, reader_means = cross_model.step_means(a)
  assert s.tolist() == list(range(60))
  np.testing.assert_allclose(reader_means - run_means, 0.25)
  png = cross_model.plot_over_training([("a", a), ("b", b)], str(tmp_path / "fig.png"), "t")
  assert os.path.getsize(png) > 10_000


def _figure_lines(monkeypatch, call) -> dict:
  """{path: [(label, x, y)] of every labelled line} of the figures `call()` saves (each still
  written)."""
  from markovian_jax.reporting import figures

  save, drawn = figures.save_png, {}

  def capture(fig, plt, path):
    drawn[os.path.basename(path)] = [
      (
        line.get_label(),
        np.asarray(line.get_xdata(), np.float64),
        np.asarray(line.get_ydata(), np.float64),
      )
      for ax in fig.axes
      for line in ax.get_lines()
      if not line.get_label().startswith("_")
    ]
    return save(fig, plt, path)

  monkeypatch.setattr(figures, "save_png", capture)
  call()
  return drawn


@pytest.mark.slow  # a SmolLM2-tokenizer training run read by a Qwen3 reader
def test_cross_model_cli_with_a_qwen3_reader(demo_runs, qwen3_reader, tmp_path, monkeypatch):
  """`analyze cross_model --compare` on copies of the two demo runs: the reader is loaded once
  and recorded; the training figure has a reader and a generator curve per run and the runs'
  mean, drawn from transformers' log-probs of each CoT and CoT' in the reader's ChatML prompt
  and from the runs' own logged R."""
  import shutil
  import types

  from markovian_jax import analyze
  from markovian_jax.analysis import run_inputs
  from markovian_jax.training import run_context

  path, model, tok = qwen3_reader
  runs = {}
  for name in ("markovian", "non_markovian"):
    runs[name] = str(
      shutil.copytree(demo_runs[name], tmp_path / name, ignore=shutil.ignore_patterns("analysis"))
    )
  loads = []
  load = run_context.load_checkpoint
  monkeypatch.setattr(
    run_context, "load_checkpoint", lambda *a, **kw: loads.append(a[0]) or load(*a, **kw)
  )
  f = types.SimpleNamespace(
    workdir=runs["markovian"],
    compare=runs["non_markovian"],
    reader=path,
    num_cots=2,
    batch_size=8,
    smooth_steps=40,
  )
  out = {}
  drawn = _figure_lines(monkeypatch, lambda: out.update(text=analyze.run_cross_model(f)))
  assert out["text"].count("| 8 (all) |") == 2  # each run's table
  assert "on 8 CoTs of run markovian" in out["text"]
  assert "on 8 CoTs of run non_markovian" in out["text"]
  assert loads == [path]  # one load of the reader serves both runs
  saved = json.load(open(os.path.join(runs["markovian"], "analysis", "cross_model.json")))
  assert saved["reader"] == path
  assert not os.path.exists(os.path.join(runs["non_markovian"], "analysis"))

  # The same figure drawn from independent scores: transformers reads the literal prompts.
  expected = []
  for name, workdir in runs.items():
    config = run_inputs.run_config(workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))][-2:]

    def lp(question, cot, answer):
      prefix = prompts.answer_prompt(
        config.task,
        question,
        cot,
        config.sampling.cot_length,
        markovian=config.prompt.markovian,
        prompt_format="chatml",
      )
      return _torch_answer_logprob(model, tok, prefix + answer)

    per_cot = [
      (
        r["step"],
        r["normalized"][i],
        lp(r["question"], cot, str(r["answer"])),
        lp(r["question"], r["base_cot"], str(r["answer"])),
      )
      for r in rows
      for i, cot in enumerate(r["cots"])
    ]
    steps, run, reader_cot, reader_base = map(np.asarray, zip(*per_cot))
    expected.append((name, cross_model.CrossModelResult(steps, run, reader_cot, reader_base, True)))
  want = _figure_lines(
    monkeypatch,
    lambda: cross_model.plot_over_training(expected, str(tmp_path / "expected.png"), "t"),
  )["expected.png"]
  got = drawn["cross_model_training.png"]
  assert [label for label, _, _ in got] == [
    "markovian: reader",
    "markovian: generator",
    "non_markovian: reader",
    "non_markovian: generator",
    "mean of runs: reader",
  ]
  assert [label for label, _, _ in want] == [label for label, _, _ in got]
  for (label, x, y), (_, want_x, want_y) in zip(got, want):
    np.testing.assert_array_equal(x, want_x, err_msg=label)
    # R' = a difference of two float32 programs' log-probs (each within 2e-5 nats), then means.
    np.testing.assert_allclose(y, want_y, atol=4e-5, rtol=0, err_msg=label)
