"""Two-stage evaluation (docs/method.md#evaluation), a library function for training and the CLI.

Stage 1: the policy writes a K-token CoT per question (training temperature, or greedy), `n` samples
each. With sampling.cot_stops_at_eos EOS may end it sooner, as in training
(docs/method.md#free-length-cots): every row then carries its `cot_length` in tokens, EOS included,
and the summary their mean. Stage 2: the reader (policy or base) greedily writes <=
`answer_max_tokens` after the answer prompt (question `<Redacted>` when Markovian). Every
extraction method is scored side by side; with n > 1 the summary has the mean +- sd over samples
and the majority vote, and beside the methods `cot_contains_answer`: the fraction of CoTs that
state the gold answer themselves (`data.extraction.mentions_answer`). Wiki continuation is scored
by the mean log-prob (nats/token) of the target given the CoT.

The two stages are also callable on their own, for analyses that change the CoT (perturbations,
another reader): `read_answers` (stage 2 on given CoTs) and `score_answers` (log P(answer | CoT)).
"""

from __future__ import annotations

import collections
import math
from typing import Optional, Sequence

import jax
import numpy as np

from markovian_jax import data as data_lib
from markovian_jax import objectives as obj
from markovian_jax import sampling
from markovian_jax.data.extraction import mentions_answer
from markovian_jax.models import logprobs as lp_lib
from markovian_jax.runtime import progress as progress_lib
from markovian_jax.training import pipeline
from markovian_jax.training.run_context import RunContext, fetch, put

_Z95 = 1.96


def _ci95(values) -> float:
  """Half-width of the normal-approximation 95% interval of a mean (the reference's interval,
  kept so that figures compare with its tables)."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return float("nan")
  return float(_Z95 * v.std(ddof=1) / math.sqrt(v.size))


def accuracy_interval(hits) -> tuple[float, float]:
  """95% interval (low, high) of an accuracy from float/bool hits [Q, S] (questions x samples).

  S == 1: the Wilson score interval, which stays inside [0, 1] and is not degenerate at 0% or
  100% or for a few dozen questions, where the normal approximation is. S > 1: the samples of a
  question are not independent, so the interval is the normal one over the Q per-question means
  (clipped to [0, 1]); pooling the Q * S rows would understate it.
  """
  hits = np.asarray(hits, np.float64)
  if hits.ndim != 2 or hits.size == 0:
    raise ValueError(f"accuracy_interval expects hits [questions, samples], got {hits.shape}")
  q, s = hits.shape
  if s == 1:
    p, z2 = hits.mean(), _Z95**2
    centre = (p + z2 / (2 * q)) / (1 + z2 / q)
    half = _Z95 * math.sqrt(p * (1 - p) / q + z2 / (4 * q * q)) / (1 + z2 / q)
    return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))
  if q < 2:
    return float("nan"), float("nan")
  means = hits.mean(axis=1)
  half = _Z95 * means.std(ddof=1) / math.sqrt(q)
  return float(max(means.mean() - half, 0.0)), float(min(means.mean() + half, 1.0))


def first_line(text: str) -> str:
  """The first line of `text` that is not blank (`text` itself when it has no line break)."""
  for line in text.splitlines():
    if line.strip():
      return line
  return text


def _answer_logprob_fn(ctx: RunContext, reduction: str = "mean"):
  cache = ctx.__dict__.setdefault("_eval_score_fns", {})
  if reduction not in cache:

    def fn(params, lora, tokens, mask, span):
      out = lp_lib.token_logprobs(ctx.model, params, tokens, mask, lora=lora, temperature=1.0)
      return obj.reduce_tokens(out.logprobs, span, reduction)

    cache[reduction] = jax.jit(fn)
  return cache[reduction]


def _pad(items: list, size: int) -> list:
  """`items` padded to `size` by repeating the last one: one static batch shape, one compile."""
  return list(items) + [items[-1]] * (size - len(items))


def score_answers(
  ctx: RunContext,
  lora,
  examples: Sequence,
  cot_texts: Sequence[str],
  *,
  reduction: str = "mean",
  batch_size: int = 32,
  progress: progress_lib.Progress = True,
  desc: str = "score",
) -> np.ndarray:
  """log P(gold answer | answer prompt with `cot_texts[i]`) under base + `lora` (None = base),
  reduced over the answer tokens by `reduction` ('mean' or 'sum'). The prompt hides the question
  when the run is Markovian (ctx.answer_prefix). `progress`: a bar of the rows scored (True: its
  own, `desc`; False: none; a caller's bar to advance). Returns float64 [N]."""
  if len(examples) != len(cot_texts):
    raise ValueError(f"{len(examples)} examples but {len(cot_texts)} CoTs")
  fn = _answer_logprob_fn(ctx, reduction)
  out = []
  with progress_lib.advancing(progress, len(examples), desc) as bar:
    for start in range(0, len(examples), batch_size):
      exs = list(examples[start : start + batch_size])
      real = len(exs)
      exs = _pad(exs, batch_size)
      cots = _pad(list(cot_texts[start : start + batch_size]), batch_size)
      tokens, mask, span = ctx.answer_rows(exs, cots)
      scores = fn(ctx.params, lora, put(tokens, ctx.mesh), put(mask, ctx.mesh), put(span, ctx.mesh))
      out.append(fetch(scores)[:real].astype(np.float64))
      bar.update(real)
  return np.concatenate(out) if out else np.zeros(0)


def read_answers(
  ctx: RunContext,
  lora,
  examples: Sequence,
  cot_texts: Sequence[str],
  *,
  answer_max_tokens: int = 10,
  batch_size: Optional[int] = None,
  progress: progress_lib.Progress = True,
  desc: str = "read answers",
) -> list:
  """Stage 2: the reader (base + `lora`, None = base) greedily writes <= `answer_max_tokens`
  after each answer prompt built on `cot_texts[i]`, `batch_size` rows per call (padded to it;
  None = all rows in one call). `progress` as `score_answers`'. Returns N decoded strings."""
  batch_size = batch_size or len(examples)
  out = []
  with progress_lib.advancing(progress, len(examples), desc) as bar:
    for start in range(0, len(examples), batch_size):
      exs = list(examples[start : start + batch_size])
      real = len(exs)
      cots = _pad(list(cot_texts[start : start + batch_size]), batch_size)
      prefixes = [
        data_lib.encode(ctx.tokenizer, ctx.answer_prefix(ex, cot), ctx.spec.prompt.format)
        for ex, cot in zip(_pad(exs, batch_size), cots)
      ]
      ans = sampling.generate(
        ctx.model,
        ctx.params,
        prefixes,
        max_new_tokens=answer_max_tokens,
        temperature=0.0,
        lora=lora,
        eos_ids=ctx.eos_ids,
        mesh=ctx.mesh,
      )
      out += ctx.decode(fetch(ans.tokens))[:real]
      bar.update(real)
  return out


def evaluate(
  ctx: RunContext,
  lora,
  examples: Sequence,
  *,
  num_samples: int = 1,
  temperature: Optional[float] = None,
  reader: str = "actor",
  answer_max_tokens: int = 10,
  answer_first_line: bool = False,
  batch_size: int = 32,
  seed: int = 0,
  progress: bool = True,
  desc: str = "eval",
) -> tuple[dict, list]:
  """Evaluates `lora` (None = the base model) on `examples`.

  `answer_first_line`: extract from the reader's first non-empty line (`first_line`) instead of
  everything it wrote; the row keeps the full `answer_text` either way.

  Returns (summary dict, one row dict per (example, sample)).
  """
  if not examples:
    raise ValueError("evaluate() got no examples")
  empty = [ex.id for ex in examples if not str(ex.answer).strip()]
  if empty:
    raise data_lib.DataError(f"{len(empty)} example(s) have an empty gold answer: {empty[:5]}")
  batch_size = min(batch_size, len(examples))  # a short list is not padded to a full batch
  c = ctx.spec
  t = c.sampling.temperature if temperature is None or temperature < 0 else temperature
  kind = data_lib.task_kind(ctx.task)
  reader_lora = lora if reader == "actor" else None
  rng = jax.random.PRNGKey(seed)
  rows = []
  bar = progress_lib.bar(len(examples), desc, unit="question", leave=False, enabled=progress)
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start : start + batch_size])
    real = len(chunk)
    chunk = _pad(chunk, batch_size)
    rng, key = jax.random.split(rng)
    cot = sampling.generate(
      ctx.model,
      ctx.params,
      [ctx.cot_prompt_ids(ex) for ex in chunk],
      max_new_tokens=ctx.cot_length,
      min_new_tokens=pipeline.min_new_tokens(c),
      rng=key,
      temperature=t,
      top_k=c.sampling.top_k,
      top_p=c.sampling.top_p,
      lora=lora,
      eos_ids=ctx.eos_ids,
      num_samples=num_samples,
      mesh=ctx.mesh,
    )
    lengths = fetch(cot.lengths)
    cot_texts = pipeline.decode_cots(ctx, fetch(cot.tokens), lengths)
    per_row = [ex for ex in chunk for _ in range(num_samples)]
    if kind == "continuation":
      tokens, mask, span = ctx.answer_rows(per_row, cot_texts)
      scores = fetch(
        _answer_logprob_fn(ctx)(
          ctx.params, reader_lora, put(tokens, ctx.mesh), put(mask, ctx.mesh), put(span, ctx.mesh)
        )
      )
      answers = [None] * len(per_row)
    else:
      answers = read_answers(
        ctx, reader_lora, per_row, cot_texts, answer_max_tokens=answer_max_tokens, progress=False
      )
      scores = None
    for i in range(real * num_samples):
      ex = per_row[i]
      row = {
        "id": ex.id,
        "question": ex.question,
        "gold": ex.answer,
        "sample": i % num_samples,
        "cot": cot_texts[i],
      }
      if c.sampling.cot_stops_at_eos:  # otherwise every CoT is K tokens
        row["cot_length"] = int(lengths[i])
      if kind == "continuation":
        row["answer_logprob"] = float(scores[i])
      else:
        n_choices = len(ex.choices) if ex.choices else None
        read = first_line(answers[i]) if answer_first_line else answers[i]
        preds = data_lib.extract_all(ctx.task, read, n_choices)
        row.update(
          answer_text=answers[i],
          predictions=preds,
          correct={m: data_lib.is_correct(p, ex.answer, ctx.task) for m, p in preds.items()},
        )
      rows.append(row)
    bar.update(real)
  bar.close()
  return summarize(rows, ctx.task, num_samples), rows


def summarize(rows: list, task: str, num_samples: int) -> dict:
  """Per-method accuracy, per-sample mean +- sd, and majority vote.

  Intervals: `ci95` is the reference's normal-approximation half-width over all rows;
  `ci95_low`/`ci95_high` are `accuracy_interval` (Wilson, or clustered by question when n > 1).
  `cot_contains_answer`: the fraction of rows whose CoT states the gold answer. `cot_length`: the
  mean CoT length in tokens over the rows, when they carry one (sampling.cot_stops_at_eos).
  """
  questions = collections.OrderedDict()
  for r in rows:
    questions.setdefault(r["id"], []).append(r)
  summary = {"task": task, "num_questions": len(questions), "num_samples": num_samples}
  lengths = {}
  if "cot_length" in rows[0]:
    lengths["cot_length"] = float(np.mean([r["cot_length"] for r in rows]))
  if "answer_logprob" in rows[0]:
    lp = [r["answer_logprob"] for r in rows]
    summary["answer_logprob"] = float(np.mean(lp))
    summary["answer_logprob_ci95"] = _ci95(lp)
    return {**summary, **lengths}
  for method in rows[0]["correct"]:
    hits = np.array([r["correct"][method] for r in rows], np.float64)
    low, high = accuracy_interval([[r["correct"][method] for r in q] for q in questions.values()])
    m = {"accuracy": float(hits.mean()), "ci95": _ci95(hits), "ci95_low": low, "ci95_high": high}
    if num_samples > 1:
      by_sample = [
        np.mean([r["correct"][method] for r in rows if r["sample"] == s])
        for s in range(num_samples)
      ]
      m["sample_mean"], m["sample_sd"] = float(np.mean(by_sample)), float(np.std(by_sample, ddof=1))
      votes = []
      for qrows in questions.values():
        preds = [r["predictions"][method] for r in qrows if r["predictions"][method] is not None]
        top = collections.Counter(preds).most_common(1)
        votes.append(bool(top) and data_lib.is_correct(top[0][0], qrows[0]["gold"], task))
      m["majority_vote"] = float(np.mean(votes))
    summary[method] = m
  summary["cot_contains_answer"] = float(
    np.mean([mentions_answer(task, r["cot"], r["gold"]) for r in rows])
  )
  return {**summary, **lengths}


def scalars(summary: dict) -> dict:
  """Flat {name: value} for TensorBoard (`eval/` prefix added by the writer)."""
  out = {}
  for key, value in summary.items():
    if isinstance(value, dict):
      for k, v in value.items():
        if isinstance(v, float) and math.isfinite(v):
          out[f"{key}/{k}"] = v
    elif key.startswith("answer_logprob") or key in ("cot_contains_answer", "cot_length"):
      if math.isfinite(value):
        out[key] = value
  return out


def primary_score(summary: dict) -> float:
  """The number checkpoints are ranked by: the first method's accuracy, or the wiki log-prob."""
  if "answer_logprob" in summary:
    return summary["answer_logprob"]
  method = next(k for k, v in summary.items() if isinstance(v, dict))
  return summary[method]["accuracy"]


def format_table(results: Sequence[tuple[str, dict]]) -> str:
  """A text table: one line per evaluated model (base, step N...), one column per metric."""
  cols = []
  for _, s in results:
    for k in scalars(s):
      if k not in cols and not k.endswith(("ci95", "ci95_low", "ci95_high")):
        cols.append(k)
  width = max(12, *(len(c) for c in cols)) if cols else 12
  lines = ["model".ljust(14) + "".join(c.rjust(width + 2) for c in cols)]
  for name, s in results:
    flat = scalars(s)
    cells = []
    for col in cols:
      v = flat.get(col)
      ci = (
        flat.get(col[: -len("accuracy")] + "ci95")
        if col.endswith("accuracy")
        else flat.get(col + "_ci95")
        if col == "answer_logprob"
        else None
      )
      cell = "-" if v is None else (f"{v:.3f}" + (f"±{ci:.3f}" if ci is not None else ""))
      cells.append(cell.rjust(width + 2))
    lines.append(name.ljust(14) + "".join(cells))
  return "\n".join(lines)
