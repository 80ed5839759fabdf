"""The methods compared: one row per (task, model, variant), the variant's seeds pooled.

    groups = method_table(runs)        # runs: reporting.runs.Run, e.g. every run under runs/
    print(format_method_table(groups))

A variant is a method (config.variant, e.g. `verifree` and its Markovian twin
`verifree_markovian`, or one of the paper's variants; the run directory's name when it is not a
named variant). Runs of one (task, model, variant) are its seeds and are pooled: each number is
read per run, then given as the mean over the runs with its range (min to max; for accuracy also
the standard deviation across seeds) and the number of runs. Per run:

  accuracy      the results table's cell (`results_table.run_cell`): the test accuracy of the
                primary extraction method at the run's best checkpoint by the selection split;
                the 95% interval of the seeds' mean resamples questions within each seed
                (`seed_mean_interval`).
  answer log-prob  log P(gold answer | CoT), question hidden when Markovian: the mean over the
                questions of the evaluation that gave the accuracy where its rows (or its
                eval/answer_logprob scalar) hold it, else the mean of the last logged training
                steps of answer/logprob (the training scorer's, reduced by
                objective.logprob_reduction; a tenth of the run, 1 to 50 steps).
  CoT length    tokens per CoT, by the same rule: the evaluation rows' `cot_length` (or the
                eval/cot_length scalar) at that step, else the last training steps of
                policy/cot_length, else sampling.cot_length K when the run records it: the
                trainer samples exactly K tokens (EOS is blocked before K), marked `K fixed`.
  steps         the last training step logged.

Variants are ordered as the results table's (the paper's first), then as configs.base.VARIANTS
names them, with each method followed by its `_markovian` twin, so that a method and its twin sit
on adjacent rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Sequence

import numpy as np

from markovian_jax.configs.base import TABLE_VARIANTS, VARIANTS
from markovian_jax.reporting import results_table as rt
from markovian_jax.reporting.diagnoses import window_for
from markovian_jax.reporting.runs import Run, read_jsonl

MARKOVIAN_SUFFIX = "_markovian"
ANSWER_LOGPROB_EVAL_TAG = "eval/answer_logprob"
ANSWER_LOGPROB_TRAIN_TAG = "answer/logprob"
COT_LENGTH_ROW_KEY = "cot_length"
COT_LENGTH_EVAL_TAG = "eval/cot_length"
# An answer-likelihood method's mean CoT length per step (its lengths from the CoT mask).
COT_LENGTH_TRAIN_TAGS = ("policy/cot_length",)
# Where a run lives or how it is resumed, not what it does: pooled runs may differ in these.
_NOT_COMPARED = ("workdir", "compilation_cache_dir", "host_allocator", "train.resume")
# How each reading's source is named in a header (all cells alike) or beside a cell (mixed).
SOURCES = {"eval": "eval at best", "train": "train, last steps", "fixed": "K fixed"}


@dataclasses.dataclass
class Reading:
  """One run's number and where it was read: `source` 'eval' (the evaluation at the run's best
  step by selection), 'train' (the mean of the last logged training steps) or 'fixed' (the
  configured CoT length the trainer forces); `unit`: '' or 'sum' (a log-prob summed over the
  answer tokens, objective.logprob_reduction='sum', rather than their mean)."""

  value: float
  source: str
  unit: str = ""


@dataclasses.dataclass
class Group:
  """The runs (seeds) of one (task, model, variant), read per run: `accuracy` holds the cells of
  the runs that have one, `logprob` and `cot_length` the readings of those that have one;
  `steps` one per run; `differ`: config keys the runs differ in besides seeds."""

  task: str
  model: str
  variant: str
  runs: list
  seeds: list
  steps: list
  accuracy: list
  logprob: list
  cot_length: list
  differ: list

  @property
  def interval(self) -> tuple:
    return seed_mean_interval(self.accuracy)


def spread(values: Sequence[float]) -> tuple:
  """(mean, min, max, sd) of float values; sd with ddof=1 (NaN for fewer than two)."""
  x = np.asarray(values, np.float64)
  if not x.size:
    nan = float("nan")
    return nan, nan, nan, nan
  sd = float(np.std(x, ddof=1)) if x.size > 1 else float("nan")
  return float(x.mean()), float(x.min()), float(x.max()), sd


def seed_mean_interval(
  cells: Sequence[rt.Cell], seed: int = 0, samples: int = rt.BOOTSTRAP_SAMPLES
) -> tuple:
  """The 95% interval of the mean of the cells' values (one per seed). One cell: its own
  interval. Several with per-question scores: a percentile bootstrap that resamples each seed's
  questions (with replacement, `samples` times, seeded) and averages the seeds' means. Otherwise
  (logged values, no rows): the mean -+ the root sum of squared half-widths over the number of
  cells. NaNs when a cell has no interval. The seeds themselves are not resampled: the seed
  spread is reported beside it."""
  if not cells:
    return float("nan"), float("nan")
  if len(cells) == 1:
    return cells[0].low, cells[0].high
  if all(c.scores is not None and c.scores.size >= 2 for c in cells):
    rng = np.random.default_rng(seed)
    means = np.zeros(samples)
    for c in cells:
      means += c.scores[rng.integers(0, c.scores.size, size=(samples, c.scores.size))].mean(1)
    means /= len(cells)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
  halves = [(c.high - c.low) / 2 for c in cells]
  if not all(math.isfinite(h) for h in halves):
    return float("nan"), float("nan")
  mean = float(np.mean([c.value for c in cells]))
  half = math.sqrt(sum(h * h for h in halves)) / len(cells)
  return mean - half, mean + half


def _stem(variant: str) -> str:
  if variant.endswith(MARKOVIAN_SUFFIX) and len(variant) > len(MARKOVIAN_SUFFIX):
    return variant[: -len(MARKOVIAN_SUFFIX)]
  return variant


def variant_order(variants: Sequence[str]) -> list:
  """The paper's variants in their table order, then the other named variants in the order
  configs.base.VARIANTS defines them, then the rest by first appearance; each `<m>` followed by
  its twin `<m>_markovian` (which is never placed apart from it)."""
  out = [v for v in TABLE_VARIANTS if v in variants]
  rest = [v for v in variants if v not in TABLE_VARIANTS]
  stems = list(dict.fromkeys(_stem(v) for v in rest))
  named = list(VARIANTS)

  def rank(stem: str) -> tuple:
    known = [named.index(v) for v in (stem, stem + MARKOVIAN_SUFFIX) if v in named]
    return (min(known), 0) if known else (len(named), stems.index(stem))

  for stem in sorted(stems, key=rank):
    out += [v for v in (stem, stem + MARKOVIAN_SUFFIX) if v in rest]
  return out


def _trailing_mean(run: Run, tag: str) -> float:
  """The mean of `tag` over its last logged steps (a tenth of them, 1 to 50); NaN if absent."""
  _, v = run.series(tag)
  return float(v[-window_for(v.size) :].mean()) if v.size else float("nan")


def _rows_at(run: Run, cell: Optional[rt.Cell]) -> list:
  """The evaluation rows the cell's value came from ([] when it is a logged value)."""
  if cell is None:
    return []
  path = (run.final_files if cell.source == "test" else run.eval_files).get(cell.step)
  return read_jsonl(path) if path else []


def _logged_at(run: Run, tag: str, cell: Optional[rt.Cell]) -> float:
  """`tag`'s value at the cell's step, when the cell is training's periodic evaluation (the
  evaluate CLI's events are elsewhere); NaN otherwise."""
  if cell is None or cell.source != "periodic":
    return float("nan")
  steps, v = run.series(tag)
  at = np.flatnonzero(steps == cell.step)
  return float(v[at[-1]]) if at.size else float("nan")


def _row_mean(rows: list, key: str) -> float:
  """The mean over questions (each its samples' mean) of the rows' numeric `key`; NaN if none."""
  by_id: dict = {}
  for r in rows:
    if isinstance(r.get(key), (int, float)):
      by_id.setdefault(r.get("id"), []).append(float(r[key]))
  return float(np.mean([np.mean(v) for v in by_id.values()])) if by_id else float("nan")


def answer_logprob(run: Run, cell: Optional[rt.Cell]) -> Optional[Reading]:
  """The run's mean answer log-prob (see the module docstring), or None when nothing logs it."""
  value = _row_mean(_rows_at(run, cell), "answer_logprob")
  if not math.isfinite(value):
    value = _logged_at(run, ANSWER_LOGPROB_EVAL_TAG, cell)
  if math.isfinite(value):
    return Reading(value, "eval")
  value = _trailing_mean(run, ANSWER_LOGPROB_TRAIN_TAG)
  if math.isfinite(value):
    unit = "sum" if run.config.get("objective.logprob_reduction") == "sum" else ""
    return Reading(value, "train", unit)
  return None


def cot_length(run: Run, cell: Optional[rt.Cell]) -> Optional[Reading]:
  """The run's mean CoT length in tokens (see the module docstring), or None when unknown."""
  value = _row_mean(_rows_at(run, cell), COT_LENGTH_ROW_KEY)
  if not math.isfinite(value):
    value = _logged_at(run, COT_LENGTH_EVAL_TAG, cell)
  if math.isfinite(value):
    return Reading(value, "eval")
  for tag in COT_LENGTH_TRAIN_TAGS:
    value = _trailing_mean(run, tag)
    if math.isfinite(value):
      return Reading(value, "train")
  k = run.config.get("sampling.cot_length")
  if isinstance(k, int) and not isinstance(k, bool) and k > 0:
    return Reading(float(k), "fixed")
  return None


def _differing(runs: Sequence[Run]) -> list:
  """Config keys the runs differ in, leaving out seeds and where the runs live."""
  keys = sorted({k for r in runs for k in r.config})
  return [
    k
    for k in keys
    if not k.startswith(_NOT_COMPARED)
    and k.rsplit(".", 1)[-1] != "seed"
    and len({json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}) > 1
  ]


def method_table(runs: Sequence[Run]) -> list:
  """[Group] in row order: tasks as the results table orders them, then models by first
  appearance, then `variant_order`."""
  by_key: dict = {}
  for run in runs:
    by_key.setdefault((run.task or "?", run.model, rt.variant_of(run)), []).append(run)
  seen = list(dict.fromkeys(k[0] for k in by_key))
  tasks = sorted(
    seen,
    key=lambda t: (
      list(rt.TASK_NAMES).index(t) if t in rt.TASK_NAMES else len(rt.TASK_NAMES),
      seen.index(t),
    ),
  )
  models = list(dict.fromkeys(k[1] for k in by_key))
  groups = []
  for task in tasks:
    for model in models:
      here = [k[2] for k in by_key if k[:2] == (task, model)]
      for variant in variant_order(here):
        members = by_key[(task, model, variant)]
        cells = [rt.run_cell(r) for r in members]
        lps = [answer_logprob(r, c) for r, c in zip(members, cells)]
        lengths = [cot_length(r, c) for r, c in zip(members, cells)]
        groups.append(
          Group(
            task,
            model,
            variant,
            [r.name for r in members],
            [r.config.get("train.seed") for r in members],
            [r.last_step for r in members],
            [c for c in cells if c is not None],
            [x for x in lps if x is not None],
            [x for x in lengths if x is not None],
            _differing(members),
          )
        )
  return groups


# ------------------------------------------------------------------ formatting


def _pooled(values: Sequence[float], digits: int, scale: float = 1.0, sd: bool = False) -> str:
  """'mean' for one value, 'mean (min to max)' for several ('mean (sd s; min to max)' with sd)."""
  mean, low, high, dev = spread([scale * v for v in values])
  text = f"{mean:.{digits}f}"
  if len(values) > 1:
    inner = f"{low:.{digits}f} to {high:.{digits}f}"
    text += f" (sd {dev:.{digits}f}; {inner})" if sd else f" ({inner})"
  return text


def _header_source(readings: Sequence[Reading]) -> Optional[str]:
  """The one source every reading of a column shares (None when they are mixed or absent)."""
  found = {r.source for r in readings}
  return next(iter(found)) if len(found) == 1 else None


def _reading_cell(
  readings: Sequence[Reading], runs: int, digits: int, shared: Optional[str]
) -> str:
  if not readings:
    return "n/a"
  groups: dict = {}
  for r in readings:
    groups.setdefault((r.source, r.unit), []).append(r.value)
  parts = []
  for (source, unit), values in groups.items():
    marks = [m for m in (None if source == shared else SOURCES[source], unit or None) if m]
    parts.append(_pooled(values, digits) + "".join(f" ({m})" for m in marks))
  text = "; ".join(parts)
  return text + (f" ({len(readings)} of {runs} runs)" if len(readings) < runs else "")


def _accuracy_cells(g: Group) -> tuple:
  """(accuracy cell, interval cell) in the results table's units (% or wiki's nats/token)."""
  if not g.accuracy:
    return "–", "–"
  scale, digits = (1.0, 3) if g.task == "wiki_continuation" else (100.0, 1)
  text = _pooled([c.value for c in g.accuracy], digits, scale, sd=True)
  if any(c.how == "final" for c in g.accuracy):
    text += " (final)"
  if any(c.source == "periodic" for c in g.accuracy):
    text += " (periodic)"
  if len(g.accuracy) < len(g.runs):
    text += f" ({len(g.accuracy)} of {len(g.runs)} runs)"
  low, high = g.interval
  ns = sorted({c.n for c in g.accuracy})
  n = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]} to {ns[-1]}"
  bounds = f"[{scale * low:.{digits}f}, {scale * high:.{digits}f}] " if math.isfinite(low) else ""
  return text, bounds + n


def _eval_temperatures(runs: Sequence[Run]) -> list:
  """The CoT temperatures the runs evaluated at (eval.temperature < 0: the training one)."""
  out = []
  for run in runs:
    t = run.config.get("eval.temperature")
    if isinstance(t, (int, float)) and t < 0:
      t = run.config.get("sampling.temperature")
    if isinstance(t, (int, float)):
      out.append(float(t))
  return sorted(set(out))


def format_method_table(groups: Sequence[Group], runs: Sequence[Run] = ()) -> str:
  """Markdown: one row per group (see the module docstring), a key to its columns and notes on
  pooled runs that differ in more than their seed. `runs`: the runs read (their evaluation
  temperature is stated)."""
  several_models = len({g.model for g in groups}) > 1
  lp_source = _header_source([r for g in groups for r in g.logprob])
  len_source = _header_source([r for g in groups for r in g.cot_length])
  header = [
    "Task",
    "Variant",
    "Runs",
    "Test accuracy (best by selection)",
    "95% interval of the mean",
    "Answer log-prob" + (f" ({SOURCES[lp_source]})" if lp_source else ""),
    "CoT tokens" + (f" ({SOURCES[len_source]})" if len_source else ""),
    "Steps",
  ]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  notes = []
  for g in groups:
    task = rt.TASK_NAMES.get(g.task, g.task) + (
      f" ({rt._model_name(g.model)})" if several_models else ""
    )
    accuracy, interval = _accuracy_cells(g)
    lo, hi = min(g.steps), max(g.steps)
    lines.append(
      "| "
      + " | ".join(
        [
          task,
          rt.VARIANT_NAMES.get(g.variant, g.variant),
          str(len(g.runs)),
          accuracy,
          interval,
          _reading_cell(g.logprob, len(g.runs), 3, lp_source),
          _reading_cell(g.cot_length, len(g.runs), 1, len_source),
          str(lo) if lo == hi else f"{lo} to {hi}",
        ]
      )
      + " |"
    )
    label = f"{task} {g.variant}"
    if g.differ:
      notes.append(
        f"{label}: its runs differ in "
        + ", ".join(f"`{k}`" for k in g.differ[:8])
        + (" …" if len(g.differ) > 8 else "")
        + " besides the seed: they are pooled "
        "as seeds all the same"
      )
    seeds = [s for s in g.seeds if s is not None]
    if len(set(seeds)) < len(seeds):
      notes.append(f"{label}: runs share a train.seed ({', '.join(map(str, g.seeds))})")
  text = "\n".join(lines)
  text += (
    "\n\nOne row per variant (a method, its `_markovian` twin on the next row); Runs: its "
    "runs, pooled as seeds: mean (for accuracy sd across seeds; min to max). Test "
    "accuracy: the results table's cell of each run (primary extraction method, %; wiki: "
    "mean answer log-prob, nats/token) at its best checkpoint by the selection split; "
    "(periodic): training's periodic evaluation, not the full test set; 95% interval of "
    "the mean: questions resampled within each run (one run: its own interval), n: "
    "questions per run. Answer log-prob: log P(gold answer | CoT) per answer token ((sum): "
    "summed, objective.logprob_reduction=sum), and CoT tokens, are read at that best "
    "step's evaluation where it holds them (eval at best), else as the mean of the last "
    "tenth (1 to 50) of the logged training steps (train, last steps: answer/logprob, the "
    "training scorer's; policy/cot_length); each run scores the "
    "answer in its own context (question visible, or hidden for a Markovian run), so the "
    "log-probs of a method and its twin are not the same quantity. K fixed: no length "
    "logged, the trainer samples exactly sampling.cot_length tokens (EOS blocked before "
    "K); n/a: not logged. Steps: the last training step logged."
  )
  temps = _eval_temperatures(runs)
  if temps:
    greedy = temps == [0.0]
    text += (
      "\nEvaluation CoTs drawn at temperature "
      + ", ".join(f"{t:g}" for t in temps)
      + (" (greedy)." if greedy else " (sampled; eval.temperature=0 gives greedy accuracy).")
    )
  if notes:
    text += "\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes)
  return text
