"""See a run: figures and a written analysis of one run or of many, live or finished.

  python -m markovian_jax.report --workdir=runs/gsm8k          # one run (config.workdir)
  python -m markovian_jax.report --workdir=runs                # every run directly under runs/

Writes into --workdir (local or gs://...): `report.md` and `report_figures/` (one run: training.png
and eval.png; several: <run>/training.png, <run>/eval.png, compare_reward.png, compare_eval.png).
report.md holds, automatically written: a summary comparing the runs, the paper's results table
((task, model) rows x variants at the best checkpoint by selection, at the full test size where
`evaluate` wrote it, with bootstrap intervals; also written alone as results_table.md,
`results_table`), for several runs the methods compared (one row per variant, its seeds pooled:
accuracy at the best checkpoint by selection with the interval of the seeds' mean, answer
log-prob, CoT length, steps; also written alone as methods_table.md, `methods_table`), the
hyperparameters (for several runs those that differ, beside the core ones), the results (final
accuracy, the best checkpoint by the selection split and its test accuracy, the base model, eval
set sizes with a warning under ~100), the dynamics at milestones scaled to the run length,
diagnoses with the step where each began (`report_analysis.diagnose`), and example CoTs. A run
still being written is reported as far as it goes. A directory without TensorBoard events exits 2
with one line.

`write_report(workdir)` is the same as a library call (benchmarks/learning.py uses it).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from typing import Sequence

from etils import epath
import numpy as np

from markovian_jax.reporting import diagnoses as ra
from markovian_jax.reporting import figures as rf
from markovian_jax.reporting import methods_table as mt
from markovian_jax.reporting import results_table as rt
from markovian_jax.reporting import runs as report_runs

FIGURES_DIR = "report_figures"
METHODS_TABLE = "methods_table.md"
# Always in the hyperparameter table (when present); for several runs, every differing key too.
CORE_KEYS = (
  "task",
  "model.path",
  "prompt.markovian",
  "objective.kind",
  "objective.normalize_reward",
  "objective.baseline",
  "objective.kl_penalty",
  "optim.lr",
  "lora.rank",
  "sampling.cot_length",
  "sampling.temperature",
  "train.group_size",
  "train.questions_per_step",
  "train.num_steps",
  "train.seed",
  "eval.num_examples",
)
# Never compared: where a run lives, not what it does.
_IGNORED_KEYS = ("workdir", "compilation_cache_dir", "host_allocator", "train.resume")


@dataclasses.dataclass
class Report:
  path: str  # report.md
  figures: list  # PNG paths
  runs: list  # report_runs.Run


def _num(v, digits: int = 3, sign: bool = False) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "–"
  return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _cell(v) -> str:
  text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
  return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _quote(text: str, limit: int = 300) -> str:
  text = " ".join(str(text).split())
  return "`" + (text[:limit] + " …" if len(text) > limit else text).replace("`", "'") + "`"


def _interval(v: tuple) -> str:
  value, low, high = v[-3:]
  bounds = f" [{_num(low, 2)}, {_num(high, 2)}]" if math.isfinite(low) else ""
  return _num(value) + bounds


def _first_last(run: report_runs.Run, tag: str) -> tuple:
  _, v = run.series(tag)
  if not v.size:
    return float("nan"), float("nan")
  w = max(1, min(v.size // 4, 50))
  return float(v[:w].mean()), float(v[-w:].mean())


# ------------------------------------------------------------------ sections


def _describe(run: report_runs.Run) -> str:
  c = run.config
  kind = {True: "Markovian", False: "non-Markovian"}.get(c.get("prompt.markovian"), "")
  parts = [p for p in (c.get("task"), kind, c.get("objective.kind")) if p]
  total = c.get("train.num_steps")
  steps = f"{run.last_step} of {total} steps" if total else f"{run.last_step} steps"
  return f"{', '.join(parts)}; {steps}" if parts else steps


def _summary(runs: Sequence[report_runs.Run], results: dict, diagnoses: dict) -> str:
  out = []
  for run in runs:
    res = results[run.name]
    s = f"- **{run.name}** ({_describe(run)})."
    if res.final and res.base:
      step, value, low, high = res.final
      base, b_low, b_high = res.base
      apart = high < b_low or low > b_high
      s += (
        f" {res.method}: {base:.3f} for the base model → {value:.3f} at step {step} "
        f"({value - base:+.3f}, {'intervals apart' if apart else 'within the intervals'})."
      )
    elif res.final:
      s += f" {res.method}: {res.final[1]:.3f} at step {res.final[0]} (no base evaluation)."
    else:
      s += " No held-out evaluation logged."
    first, last = _first_last(run, "answer/normalized_reward")
    if math.isfinite(first):
      s += f" Normalised reward R: {first:+.3f} early → {last:+.3f} late."
    if res.best:
      s += (
        f" Best checkpoint by the selection split: step {res.best[0]} "
        f"(selection {res.best[1]:.3f}, test {_num(res.best[2])})."
      )
    found = diagnoses[run.name]
    s += (
      " Diagnoses: " + "; ".join(f"{d.kind} (from step {d.began})" for d in found) + "."
      if found
      else " No problem diagnosed."
    )
    out.append(s)
  finals = [(r.name, results[r.name].final) for r in runs if results[r.name].final]
  if len(finals) > 1:
    name, top = max(finals, key=lambda x: x[1][1])
    others = []
    for other, f in finals:
      if other != name:
        apart = f[3] < top[2]
        verdict = "below, intervals apart" if apart else "intervals overlap"
        others.append(f"{other} {f[1]:.3f} ({verdict})")
    out.append(
      f"\nHighest final held-out metric: **{name}** ({top[1]:.3f}); " + ", ".join(others) + "."
    )
    differ = _differing_keys(runs)
    if differ:
      out.append(
        "The runs differ in "
        + ", ".join(f"`{k}`" for k in differ[:12])
        + (" …" if len(differ) > 12 else "")
        + "."
      )
  return "\n".join(out)


def _differing_keys(runs: Sequence[report_runs.Run]) -> list:
  keys = sorted({k for r in runs for k in r.config})
  return [
    k
    for k in keys
    if not k.startswith(_IGNORED_KEYS)
    and len({json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}) > 1
  ]


def _hyperparameters(runs: Sequence[report_runs.Run]) -> str:
  if not any(r.config for r in runs):
    return "No config.json in the run directories."
  keys = [k for k in CORE_KEYS if any(k in r.config for r in runs)]
  if len(runs) > 1:
    keys += [k for k in _differing_keys(runs) if k not in keys]
  return _table(
    ["key"] + [r.name for r in runs], [[k] + [r.config.get(k, "–") for r in runs] for k in keys]
  )


def _results(runs: Sequence[report_runs.Run], results: dict) -> str:
  rows, small = [], []
  for run in runs:
    res = results[run.name]
    best = (
      "no selection split logged"
      if res.best is None
      else f"step {res.best[0]}: {res.best[1]:.3f} → test {_num(res.best[2])}"
    )
    final = "–" if res.final is None else f"{_interval(res.final)} (step {res.final[0]})"
    sizes = []
    for label, n in (("test", res.test_size), ("selection", res.selection_size)):
      if n is not None:
        sizes.append(f"{label} {n}" + (" ⚠" if n < ra.SMALL_EVAL_SET else ""))
        if n < ra.SMALL_EVAL_SET:
          small.append(f"{run.name} ({label}: {n})")
    rows.append(
      [
        run.name,
        res.method or "–",
        "–" if res.base is None else _interval(res.base),
        final,
        best,
        ", ".join(sizes) or "–",
      ]
    )
  text = _table(
    ["run", "metric", "base model (step 0)", "final", "best by validation", "eval set size"], rows
  )
  if small:
    text += (
      f"\n\n⚠ Fewer than {ra.SMALL_EVAL_SET} questions: {', '.join(small)}. A 95% "
      "interval is then wider than ±0.1, so small differences are noise."
    )
  per_method = []
  for run in runs:
    res = results[run.name]
    _, contains = run.series("eval/cot_contains_answer")
    for m, v in res.per_method.items():
      per_method.append(
        [run.name, m, v[0], _interval(v), _num(contains[-1]) if contains.size else "–"]
      )
  if per_method:
    text += (
      "\n\nEvery extraction method at the last evaluation (reported split), and the "
      "fraction of held-out CoTs that state the answer themselves:\n\n"
      + _table(["run", "method", "step", "value [95% interval]", "CoT contains answer"], per_method)
    )
  return text


def _dynamics(runs: Sequence[report_runs.Run]) -> str:
  rows = []
  for run in runs:
    for step, values in ra.dynamics(run):
      rows.append([run.name, step] + [_num(v) for v in values.values()])
  if not rows:
    return "No training steps logged."
  columns = list(ra.dynamics(runs[0])[0][1])
  note = (
    "Means over the smoothing window ending at each milestone (0, 1k, 4k and the last "
    "step; 0, 10%, 40% and the last step for runs shorter than 4k).\n\n"
  )
  return note + _table(["run", "step"] + columns, rows)


def _diagnoses(runs: Sequence[report_runs.Run], diagnoses: dict) -> str:
  out = []
  for run in runs:
    found = diagnoses[run.name]
    out.append(f"**{run.name}**: " + ("none found." if not found else ""))
    out += [f"- **{d.kind}**, began at step {d.began}: {d.detail}." for d in found]
    out.append("")
  return "\n".join(out).rstrip()


def _example_cots(run: report_runs.Run, per_step: int) -> str:
  out = []
  if run.samples:
    steps = sorted({r["step"] for r in run.samples})
    for step in sorted({steps[0], steps[-1]}):
      out.append(f"Training CoTs at step {step}:\n")
      for row in [r for r in run.samples if r["step"] == step][:per_step]:
        scores = row.get("normalized") or row.get("rewards") or []
        name = "R" if row.get("normalized") else "r"
        out.append(f"- question {_quote(row['question'], 200)}, answer {_quote(row['answer'])}")
        if scores:
          order = np.argsort(scores)
          for label, i in (("best", order[-1]), ("worst", order[0])):
            out.append(f"  - {label} CoT ({name} = {scores[i]:+.3f}): {_quote(row['cots'][i])}")
        if row.get("base_cot") is not None:
          out.append(
            f"  - base model's CoT' (b = {_num(row.get('base_score'))}): {_quote(row['base_cot'])}"
          )
      out.append("")
  if run.eval_files:
    step, path = list(run.eval_files.items())[-1]
    out.append(f"Held-out CoTs at step {step} ({os.path.relpath(path, run.path)}):\n")
    for row in report_runs.read_jsonl(path)[:per_step]:
      right = ", ".join(m for m, ok in (row.get("correct") or {}).items() if ok) or "none"
      out.append(
        f"- question {_quote(row['question'], 200)}, gold {_quote(row['gold'])}\n"
        f"  - CoT: {_quote(row['cot'])}\n  - reader wrote "
        f"{_quote(row.get('answer_text', ''), 80)}; correct by: {right}"
      )
  return "\n".join(out).rstrip() or "No CoTs logged (samples.jsonl, eval/step_N.jsonl)."


# ------------------------------------------------------------------ the report


def markdown(
  workdir: str, runs: Sequence[report_runs.Run], figures: dict, examples: int = 2
) -> str:
  """report.md's text. figures: run name -> its PNG paths ('' -> the comparison figures)."""
  results = {r.name: ra.results(r) for r in runs}
  diagnoses = {r.name: ra.diagnose(r) for r in runs}
  now = datetime.datetime.now().isoformat(timespec="seconds")
  parts = [
    f"# Training report: {os.path.basename(os.path.abspath(workdir))}",
    f"Generated {now} from {len(runs)} run(s) under `{os.path.abspath(workdir)}`.",
    "## Summary",
    _summary(runs, results, diagnoses),
    "## Results table (the paper's layout)",
    rt.format_results_table(rt.results_table(runs)),
  ]
  if len(runs) > 1:
    parts += [
      "## Methods compared (variants, seeds pooled)",
      mt.format_method_table(mt.method_table(runs), runs),
    ]
  parts += [
    "## Hyperparameters",
    _hyperparameters(runs),
    "## Results",
    _results(runs, results),
    "## Dynamics at milestones",
    _dynamics(runs),
    "## Diagnoses",
    _diagnoses(runs, diagnoses),
    "## Figures",
  ]
  for name in [""] + [r.name for r in runs]:
    for path in figures.get(name, []):
      rel = os.path.relpath(path, workdir)
      title = os.path.splitext(os.path.basename(path))[0].replace("_", " ")
      parts.append(f"![{(name + ': ') if name else ''}{title}]({rel})")
  parts.append("## Example CoTs")
  for run in runs:
    parts += [f"### {run.name}", _example_cots(run, examples)]
  return "\n\n".join(parts) + "\n"


def write_report(workdir: str, examples: int = 2) -> Report:
  """Reads every run under `workdir` (`report_analysis.find_runs`) and writes report.md and the
  figures into it. Raises ReportError (a UserError) when there is no run."""
  paths = report_runs.find_runs(workdir)
  single = paths == [os.fspath(workdir)]
  runs = [report_runs.load_run(p, None if single else os.path.relpath(p, workdir)) for p in paths]
  fig_dir = os.path.join(workdir, FIGURES_DIR)
  figures = {"": rf.comparison_figures(runs, fig_dir)}
  for run in runs:
    sub = fig_dir if single else os.path.join(fig_dir, run.name)
    made = [
      rf.training_figure(run, os.path.join(sub, "training.png")),
      rf.eval_figure(run, os.path.join(sub, "eval.png")),
    ]
    figures[run.name] = [p for p in made if p]
  path = os.path.join(workdir, "report.md")
  epath.Path(path).write_text(markdown(workdir, runs, figures, examples))
  # The paper's results table alone, to paste or diff between sweeps.
  epath.Path(os.path.join(workdir, "results_table.md")).write_text(
    rt.format_results_table(rt.results_table(runs)) + "\n"
  )
  if not single:
    epath.Path(os.path.join(workdir, METHODS_TABLE)).write_text(
      mt.format_method_table(mt.method_table(runs), runs) + "\n"
    )
  return Report(path, [p for v in figures.values() for p in v], runs)
