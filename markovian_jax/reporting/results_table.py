"""The paper's results table from a parent of runs: (task, model) rows x variants (columns).

    table = results_table(runs)        # runs: reporting.runs.Run, e.g. every run under runs/
    print(format_results_table(table))

A run's column is its named variant (config.variant, set by `--config=FILE:VARIANT`; the run
directory's name when it is not a named variant), in the paper's order (configs.base.
TABLE_VARIANTS) after the base model's column, other variants after them. Rows are keyed by task
and model (config model.path): a Qwen3 run never shares a cell with a Llama run. A cell is the
test score at the run's best checkpoint by the selection split (the earliest of equal scores): the
accuracy of the task's primary extraction method (the mean answer log-prob for wiki), with a 95%
bootstrap interval over the questions of that evaluation's rows and n, the number of questions.

The paper's cells are at the task's full test size (eval.final_num_examples): the evaluate CLI's
rows (runs.FINAL_EVAL_DIR, `evaluate --best`), read under the run's own protocol; the step is then
the best by selection of the checkpoints it evaluated (a selection step whose checkpoint is gone
has none). Without them a
cell comes from training's periodic evaluation (eval/step_N.jsonl, eval.num_examples questions)
and says so (`(periodic)`); a cell of fewer questions than the full size says that too. A run
without a selection score gives its last evaluation, marked `(final)`. The Base column is a base
evaluation of that same model (`evaluate --base_model`, written into one of the row's runs),
else the step-0 evaluation of the row's first run that has one. Several runs of one cell (seeds)
are listed side by side. Where a cell's interval overlaps its left neighbour's, a note says so:
the difference is within the noise of n.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from markovian_jax.configs.base import TABLE_VARIANTS
from markovian_jax.reporting.runs import Run, read_jsonl

BOOTSTRAP_SAMPLES = 2000
TASK_NAMES = {
  "gsm8k": "GSM8K",
  "arc": "ARC-Challenge",
  "mmlu": "MMLU",
  "svamp": "SVAMP",
  "arithmetic": "Arithmetic",
  "wiki_continuation": "Wiki (nats/token)",
  "aqua": "AQuA",
  "mathqa": "MathQA",
}
VARIANT_NAMES = {
  "ei": "EI",
  "no_reward_grad": "No Reward Grad",
  "unnormalised": "Unnormalised",
  "ema": "EMA",
  "markovian": "Markovian",
  "non_markovian": "Non-Markovian",
  "paper_reward_grad": "Paper reward grad",
  "ppo_base": "PPO (ratio to base)",
}
BASE = "base"


@dataclasses.dataclass
class Cell:
  """One run's number: value with its bootstrap interval [low, high] over n questions, at
  `step`, chosen by `how` ('selection', 'final' or 'base'); `run`: the run's name; `source`:
  'test' (the evaluate CLI's rows) or 'periodic' (training's periodic evaluation); `full`: the
  task's full test size the run was configured with (None when unknown); `scores`: float64 [n],
  the per-question scores the value averages (None when it is a logged value: no rows kept), for
  intervals over several runs (methods_table)."""

  value: float
  low: float
  high: float
  n: int
  step: int
  how: str
  run: str
  source: str = "periodic"
  full: Optional[int] = None
  scores: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)


def bootstrap_interval(
  scores: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float]:
  """The 95% percentile bootstrap interval of the mean of `scores` (float [n], one per question):
  questions resampled with replacement `samples` times (seeded). NaNs for n < 2."""
  x = np.asarray(scores, np.float64)
  if x.size < 2:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
  return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def per_question(rows: list, method: str) -> np.ndarray:
  """The score of each question (its samples averaged) in an eval file's rows."""
  by_id: dict = {}
  for r in rows:
    if method == "answer_logprob":
      v = r.get("answer_logprob")
    else:
      v = (r.get("correct") or {}).get(method)
    if v is not None:
      by_id.setdefault(r.get("id"), []).append(float(v))
  return np.asarray([np.mean(v) for v in by_id.values()], np.float64)


def _cell_from(
  path: str, run: Run, method: str, step: int, how: str, source: str
) -> Optional[Cell]:
  scores = per_question(read_jsonl(path), method)
  if not scores.size:
    return None
  low, high = bootstrap_interval(scores, seed=step)
  return Cell(
    float(scores.mean()),
    low,
    high,
    int(scores.size),
    step,
    how,
    run.name,
    source,
    run.full_test_size,
    scores,
  )


def _cell_at(run: Run, method: str, step: int, how: str) -> Optional[Cell]:
  """The cell at `step`: the evaluate CLI's rows at the full test size when the run has them
  there, else training's periodic evaluation (its rows, else its logged value)."""
  final = run.final_base if how == "base" else run.final_files.get(step)
  if final:
    cell = _cell_from(final, run, method, step, how, "test")
    if cell is not None:
      return cell
  path = run.eval_files.get(step)
  cell = _cell_from(path, run, method, step, how, "periodic") if path else None
  if cell is not None:
    return cell
  # No rows kept: the logged value and interval.
  steps, v, lo, hi = run.interval(method)
  at = {int(s): i for i, s in enumerate(steps)}
  if step not in at:
    return None
  i = at[step]
  return Cell(
    float(v[i]),
    float(lo[i]),
    float(hi[i]),
    run.eval_size() or 0,
    step,
    how,
    run.name,
    "periodic",
    run.full_test_size,
  )


def run_cell(run: Run) -> Optional[Cell]:
  """The run's test score at its best checkpoint by the selection split (else its last
  evaluation), or None when it has no evaluation after step 0."""
  methods = run.methods()
  if not methods:
    return None
  method = methods[0]
  sel_steps, sel = run.series(run.metric_tag(method, "selection"))
  trained = [(s, v) for s, v in zip(sel_steps.tolist(), sel.tolist()) if s > 0]
  # Where the evaluate CLI scored checkpoints (`--best`: the best *saved* one; older ones may be
  # gone), the best of those: a selection step without a checkpoint has no full-size evaluation.
  evaluated = [(s, v) for s, v in trained if s in run.final_files]
  trained = evaluated or trained
  if trained:
    best = max(trained, key=lambda sv: (sv[1], -sv[0]))[0]  # the earliest of equal maxima
    return _cell_at(run, method, int(best), "selection")
  steps, _ = run.series(run.metric_tag(method))
  later = [int(s) for s in steps.tolist() if s > 0]
  return _cell_at(run, method, later[-1], "final") if later else None


def base_cell(run: Run) -> Optional[Cell]:
  """The base model's score: the run's base evaluation at the full test size, else its step-0
  evaluation."""
  methods = run.methods()
  return _cell_at(run, methods[0], 0, "base") if methods else None


def variant_of(run: Run) -> str:
  return run.config.get("variant") or run.name


@dataclasses.dataclass
class ResultsTable:
  rows: list  # row order: (task, model)
  columns: list  # "base" first, then variants
  cells: dict  # (task, model, column) -> [Cell]

  @property
  def tasks(self) -> list:
    return list(dict.fromkeys(task for task, _ in self.rows))

  @property
  def models(self) -> list:
    return list(dict.fromkeys(model for _, model in self.rows))


def results_table(runs: Sequence[Run]) -> ResultsTable:
  cells: dict = {}
  rows, variants = [], []
  for run in runs:
    row = (run.task or "?", run.model)
    cell = run_cell(run)
    if cell is None:
      continue
    variant = variant_of(run)
    rows += [row] if row not in rows else []
    variants += [variant] if variant not in variants else []
    cells.setdefault(row + (variant,), []).append(cell)
  for row in rows:  # the Base column: a full-size base evaluation of the row's model first
    same = [r for r in runs if (r.task or "?", r.model) == row]
    for run in sorted(same, key=lambda r: r.final_base is None):
      base = base_cell(run)
      if base is not None:
        cells[row + (BASE,)] = [base]
        break
  order = [v for v in TABLE_VARIANTS if v in variants] + [
    v for v in variants if v not in TABLE_VARIANTS
  ]
  known = sorted(
    rows,
    key=lambda r: (
      list(TASK_NAMES).index(r[0]) if r[0] in TASK_NAMES else len(TASK_NAMES),
      rows.index(r),
    ),
  )
  return ResultsTable(known, [BASE] + order, cells)


def _fmt(cell: Cell, task: str) -> str:
  scale, digits = (1.0, 3) if task == "wiki_continuation" else (100.0, 1)
  bounds = (
    ""
    if not math.isfinite(cell.low)
    else f" [{scale * cell.low:.{digits}f}, {scale * cell.high:.{digits}f}]"
  )
  mark = " (final)" if cell.how == "final" else ""
  if cell.source == "periodic":
    mark += " (periodic)"
  elif cell.full is not None and cell.n < cell.full:
    mark += f" (of {cell.full})"
  return f"{scale * cell.value:.{digits}f}{bounds} n={cell.n}{mark}"


def _overlap(a: Cell, b: Cell) -> bool:
  return math.isfinite(a.low) and math.isfinite(b.low) and a.low <= b.high and b.low <= a.high


def _model_name(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1] or path


def format_results_table(table: ResultsTable) -> str:
  """Markdown: the table (accuracy in %, wiki in nats/token, each cell value [95% bootstrap
  interval] n=questions) and the notes on overlapping neighbours. Rows name their model when the
  table holds more than one."""
  names = ["Base" if c == BASE else VARIANT_NAMES.get(c, c) for c in table.columns]
  lines = ["| Task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  notes = []
  several = len(table.models) > 1
  periodic = False
  for task, model in table.rows:
    label = TASK_NAMES.get(task, task) + (f" ({_model_name(model)})" if several else "")
    row, previous = [], None
    for col, name in zip(table.columns, names):
      cells = table.cells.get((task, model, col), [])
      periodic |= any(c.source == "periodic" for c in cells)
      row.append(" / ".join(_fmt(c, task) for c in cells) or "–")
      if len(cells) == 1 and previous is not None and _overlap(previous[1], cells[0]):
        notes.append(
          f"{label}: {previous[0]} and {name} overlap (95% "
          "intervals): their difference is within the noise of n"
        )
      previous = (name, cells[0]) if len(cells) == 1 else None
    lines.append(f"| {label} | " + " | ".join(row) + " |")
  text = "\n".join(lines)
  if table.models and not several:
    text += f"\n\nModel: {table.models[0]}."
  text += (
    "\n\nCells: test accuracy (%) of the primary extraction method (wiki: mean answer "
    "log-prob, nats/token) at each run's best checkpoint by the selection split, 95% "
    "bootstrap interval over the n questions, at the task's full test size "
    "(eval.final_num_examples, `evaluate --best`); Base: the base model's evaluation "
    "(`evaluate --base_model`); (final): no selection score, the last evaluation; "
    "(of N): fewer questions than the full test size N."
  )
  if periodic:
    text += (
      "\n(periodic): training's periodic evaluation (eval.num_examples questions, step 0 "
      "for Base), not the full test set: run `evaluate --best` (and `--base_model`) on "
      "the run for the paper's cell."
    )
  if notes:
    text += "\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes)
  return text
