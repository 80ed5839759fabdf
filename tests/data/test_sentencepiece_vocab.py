"""The answer span, training and cross-model reading with real SentencePiece vocabularies.

Mistral-7B v0.2's and v0.3's own vocabularies (tests/sentencepiece_vocab.py) beside two byte-level
BPE ones (Llama 3's, SmolLM2's). In a Metaspace vocabulary ":" alone is "▁:", never the colon of
"Answer:" inside a text, so a span found by the ids of ":" tokenized on its own fails there. The
span is checked against the reference's hard-coded in-text ids (Mistral: "▁Answer" 26307 then
":" 28747; Llama 3: 16533 / 22559 then 25) and by decoding, in every prompt format. A tiny
random Mistral carrying v0.2's vocabulary trains 2 demo steps through the CLI in its family's
format, and one carrying v0.3's reads that run's CoTs through `analyze cross_model`.
"""

import json
import os

import numpy as np
import pytest

from markovian_jax.data import prompts
from tests import sentencepiece_vocab

VOCABS = ("mistral_v1", "mistral_v3", "llama3", "smollm2")
# The reference's hard-coded (answer ids, colon ids) per vocabulary, where it has them.
REFERENCE_IDS = {"mistral_v1": ({26307}, {28747, 28705, 29871}), "llama3": ({16533, 22559}, {25})}
WIKI_TARGET = " , which was performed in 2001 at the Royal Court Theatre ."
ANSWERS = (("gsm8k", "18"), ("gsm8k", "-1234"), ("mmlu", "B"), ("wiki_continuation", WIKI_TARGET))
# A CoT that says "Answer:" itself: the span follows the last marker, the prompt's own.
COT = " 9 + 9. I guess Answer: 7. No wait, Answer:18 since 9 + 9 = 18."


@pytest.fixture(scope="module", params=VOCABS)
def vocab(request, smollm2_path):
  """(name, fast tokenizer) of one vocabulary."""
  name = request.param
  if name.startswith("mistral_"):
    return name, sentencepiece_vocab.mistral_tokenizer(name.split("_")[1])
  if name == "llama3":
    from tests.llama3_tokenizer import llama3_tokenizer

    return name, llama3_tokenizer()
  from markovian_jax.models import load_tokenizer

  return name, load_tokenizer(smollm2_path)


def _reference_start(ids, answer_ids, colon_ids) -> int:
  """The reference's finder: the index after the last (answer id, colon id) pair, or -1."""
  hits = [i for i in range(len(ids) - 1) if ids[i] in answer_ids and ids[i + 1] in colon_ids]
  return hits[-1] + 2 if hits else -1


def test_colon_alone_is_not_the_colon_in_the_text():
  """Why the span cannot be found by the ids of ":" tokenized on its own (the fixed defect)."""
  tok = sentencepiece_vocab.mistral_tokenizer("v1")
  assert tok.convert_ids_to_tokens(tok.encode(":", add_special_tokens=False)) == ["▁:"]
  ids = tok.encode("x Answer: 18", add_special_tokens=False)
  assert tok.convert_ids_to_tokens(ids) == ["▁x", "▁Answer", ":", "▁", "1", "8"]
  assert ids[1:3] == [26307, 28747]  # the reference's in-text ids for Mistral


@pytest.mark.parametrize("fmt", prompts.PROMPT_FORMATS)
def test_answer_span_in_every_format(vocab, fmt):
  name, tok = vocab
  for task, answer in ANSWERS:
    for markovian in (True, False):
      prefix = prompts.answer_prompt(
        task, "What is 9 + 9?", COT, 50, markovian=markovian, prompt_format=fmt, tokenizer=tok
      )
      got = prompts.answer_tokens(tok, prefix, answer, fmt)
      ids = got.ids.tolist()
      assert ids == prompts.encode(tok, prefix + answer, fmt)
      assert tok.decode(ids[got.start :]).strip() == answer.strip(), (name, fmt, task)
      assert tok.decode(ids[got.start - 2 : got.start]).strip() == "Answer:", (name, fmt, task)
      assert got.mask.tolist() == [i >= got.start for i in range(len(ids))]
      if name in REFERENCE_IDS:
        assert got.start == _reference_start(ids, *REFERENCE_IDS[name]), (name, fmt, task)


def test_span_errors_name_the_problem(vocab):
  _, tok = vocab
  with pytest.raises(ValueError, match="no 'Answer:' marker"):
    prompts.answer_tokens(tok, "Reasoning: blah. Result = ", "18")
  with pytest.raises(ValueError, match="empty answer span"):
    prompts.answer_tokens(tok, prompts.answer_prompt("gsm8k", "q", COT, 50), "7 Answer:")


@pytest.fixture(scope="module")
def mistral_run(tmp_path_factory):
  """(model dir, workdir, completed process) of a 2-step demo run of a tiny random Mistral with
  Mistral-7B v0.2's vocabulary, its prompt format left to the family."""
  from tests.helpers import demo_args, run_train

  model = sentencepiece_vocab.tiny_mistral_dir("v1", str(tmp_path_factory.mktemp("tiny_mistral")))
  workdir = str(tmp_path_factory.mktemp("mistral_run") / "run")
  return (
    model,
    workdir,
    run_train(*demo_args(model, workdir, "--config.train.text_every=1"), timeout=600),
  )


@pytest.mark.slow  # a training subprocess
def test_demo_run_trains_with_a_mistral_vocabulary(mistral_run):
  _, workdir, proc = mistral_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["prompt"]["format"] == "mistral"  # the family's, recorded
  rows = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["rewards"]).all() and len(r["cots"]) == 4 for r in rows)


@pytest.mark.slow  # an analyze subprocess on the run above
def test_cross_model_with_a_mistral_reader(mistral_run, tmp_path):
  from tests.helpers import run_module

  model, workdir, proc = mistral_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The reader carries v0.3's vocabulary: it re-tokenizes the text of the v0.2 policy's CoTs.
  reader = sentencepiece_vocab.tiny_mistral_dir("v3", str(tmp_path / "mistral_reader"))
  out = run_module(
    "markovian_jax.analyze",
    "cross_model",
    f"--workdir={workdir}",
    f"--reader={reader}",
    "--num_cots=2",
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "on 8 CoTs of run run" in out.stdout, out.stdout[-2000:]
  saved = json.load(open(os.path.join(workdir, "analysis", "cross_model.json")))
  assert np.all(np.isfinite(saved["reader_cot"])) and np.all(np.isfinite(saved["reader_base"]))
