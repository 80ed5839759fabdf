"""The paper's analyses of trained runs, on the CoTs they logged (samples.jsonl).

  python -m markovian_jax.analyze fragility --workdir=A [--compare=B] [--level=char|token|both]
      [--source=heldout|logged] [--num_examples=N] [--num_cots=32] [--scorer=actor|base]
      [--step=N] [--replacement=bernoulli|exact] [--accuracy] [--seed=0]
  python -m markovian_jax.analyze cross_model --workdir=A --reader=PATH [--compare=B]
      [--num_cots=N] [--smooth_steps=40]
  python -m markovian_jax.analyze table3 --workdir=PARENT [--level=char|token|both]

fragility, by default the paper's protocol: each run's own adapter (checkpoint --step, else the
best by its selection score) samples one CoT for each of --num_examples fresh held-out questions
(the run's eval split: wiki's held-out articles, QA's test split; default the paper's n,
eval.final_num_examples) and scores the answer with its own answer prompt (question hidden when
Markovian). --source=logged takes the last --num_cots logged training CoTs instead;
--scorer=base scores with the base model. Each CoT is perturbed five ways at 0-100% severity
(`perturbations`; character replacement Bernoulli(p) per character as the reference), at
character level (the reference's analysis), token level (the paper's text) or both. Prints each
run's table and, with --compare, Markovian minus non-Markovian (in either order of the flags; A
minus B when both or neither are Markovian) in the paper's layouts: Table 2 (log-prob drop,
severities x kinds, column means) and Table 3 (QA accuracy drop per kind, averaged over
severities). The protocol (scorer, checkpoint step, where the CoTs came from, split, n, seed) is
recorded in the JSON.

cross_model: the reader (any model path `load_checkpoint` accepts, any family, with its own
tokenizer and its family's prompt format) scores log P(answer | CoT) - log P(answer | CoT') for
every logged CoT (every logged step; --num_cots=N: the last N logged questions); prints its
agreement with the run's own normalised reward, plots one against the other, and draws the
paper's figure over training steps (scipy's Savitzky-Golay filter, a cubic over --smooth_steps
training steps, as the reference's savgol_filter(40, 3) over its every-step log), one curve per
run (A, and B with --compare) and their mean.

table3: the paper's Table 3 over tasks from the fragility analyses saved in the runs under PARENT
(per task one Markovian and one non-Markovian run, analysed by `fragility --compare`): per kind
the accuracy difference averaged over severities, and the Overall row weighted by each task's n
(the questions pooled, as the reference aggregates its QA tasks).

Results go to <workdir>/analysis/ (JSON, markdown, PNG). Bad input (no such run, no logged CoTs,
a reader whose tokenizer cannot be loaded) exits 2 with one line.
"""

from __future__ import annotations

import json
import os
import sys

from etils import epath

from markovian_jax.analysis.run_inputs import AnalysisError
from markovian_jax.runtime import files

COMMANDS = ("fragility", "cross_model", "table3")
# fragility --source=logged: the logged questions it perturbs unless --num_cots says otherwise.
LOGGED_COTS = 32


def _define_flags():
  """Defined only when run as a program, so that training hooks may import the libraries."""
  from absl import flags

  flags.DEFINE_string("workdir", None, "The run directory to analyse (config.workdir).")
  flags.DEFINE_string(
    "compare",
    None,
    "fragility: a second run directory (e.g. the "
    "prompt.markovian=False run) for the paper's difference table; "
    "cross_model: a second run the reader reads, drawn beside A.",
  )
  flags.DEFINE_enum(
    "level",
    "char",
    ["char", "token", "both"],
    "fragility: perturb characters (the reference), tokens (the paper's text) or both.",
  )
  flags.DEFINE_integer(
    "num_cots",
    None,
    "The last N logged questions: one CoT each for "
    f"fragility --source=logged (default {LOGGED_COTS}); all G CoTs for "
    "cross_model (default: every logged step, as the paper's figure).",
  )
  flags.DEFINE_integer(
    "smooth_steps",
    40,
    "cross_model: the figure's Savitzky-Golay window "
    "(a cubic), in training steps (the reference's 40).",
  )
  flags.DEFINE_enum(
    "source",
    "heldout",
    ["heldout", "logged"],
    "fragility: CoTs sampled by the "
    "run's adapter on held-out questions (the paper) or the logged training CoTs.",
  )
  flags.DEFINE_integer(
    "num_examples",
    None,
    "fragility --source=heldout: held-out questions "
    "(default the run's eval.final_num_examples, the paper's n).",
    lower_bound=1,
  )
  flags.DEFINE_enum(
    "scorer",
    "actor",
    ["actor", "base"],
    "fragility: score with the run's adapter (the paper) or with the base model.",
  )
  flags.DEFINE_integer(
    "step",
    None,
    "fragility: checkpoint step of the adapter (default: the "
    "best by the run's selection score, else the latest).",
  )
  flags.DEFINE_bool(
    "reuse",
    False,
    "fragility: take a run's saved analysis/fragility_<level>"
    ".json when it was made with this command's protocol (same scorer, "
    "checkpoint step, CoT source, split, n, seeds, replacement) instead of "
    "scoring again, e.g. to compare a run already analysed.",
  )
  flags.DEFINE_enum(
    "replacement",
    "bernoulli",
    ["bernoulli", "exact"],
    "fragility: character "
    "replacement, each character with probability p (the reference) or exactly "
    "p% of them.",
  )
  flags.DEFINE_bool("accuracy", True, "fragility: also read and check the answer (QA tasks).")
  flags.DEFINE_integer("seed", 0, "fragility: perturbation seed.", lower_bound=0)
  flags.DEFINE_string(
    "reader", None, "cross_model: the reading model (HF dir, .gguf, hub id, package://PKG/FILE)."
  )
  flags.DEFINE_integer("batch_size", 32, "Rows per scoring call.")


def _check_run(workdir: str, flag: str = "--workdir"):
  if not workdir:
    raise AnalysisError(f"{flag} is required (a run directory)")
  if not epath.Path(workdir).is_dir():
    raise AnalysisError(f"{flag} {workdir}: no such directory")


def _write(workdir: str, name: str, text: str) -> str:
  path = epath.Path(workdir) / "analysis" / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return os.fspath(path)


def _fragility_run(workdir: str, f, levels: list) -> tuple:
  """(run name, whether Markovian, {level: FragilityResult}, protocol dict) of one run."""
  from markovian_jax.analysis import fragility
  from markovian_jax.analysis import run_inputs as analysis

  config = analysis.run_config(workdir)
  if f.reuse:
    saved = _saved_results(workdir, f, levels, config)
    if saved is not None:
      return (os.path.basename(os.path.normpath(workdir)), bool(config.prompt.markovian), *saved)
  ctx = analysis.load_context(config)
  spec = ctx.spec
  protocol = {
    "task": spec.task,
    "scorer": f.scorer,
    "level": levels,
    "replacement": f.replacement,
    "perturbation_seed": f.seed,
    "markovian": bool(config.prompt.markovian),
  }
  lora = None
  if f.scorer == "actor" or f.source == "heldout":
    lora, step, why = analysis.checkpoint_adapter(workdir, ctx, f.step)
    protocol.update(checkpoint_step=step, checkpoint_choice=why)
  if f.source == "heldout":
    n = spec.eval.final_num_examples if f.num_examples is None else f.num_examples
    examples = fragility.heldout_examples(ctx, n)
    cots = fragility.generate_cots(
      ctx, lora, examples, seed=spec.eval.seed, batch_size=f.batch_size
    )
    keys = [ex.id for ex in examples]
    protocol.update(
      cots=f"sampled by the step-{protocol['checkpoint_step']} adapter at "
      f"T={spec.sampling.temperature:g}, one per question",
      split=spec.data.eval_split,
      n=len(examples),
      seed=spec.eval.seed,
    )
  else:
    rows = analysis.logged_rows(workdir, f.num_cots or LOGGED_COTS)
    examples = [analysis.example(r) for r in rows]
    keys = [(int(r["step"]), r.get("id")) for r in rows]
    cots = [r["cots"][0] for r in rows]
    protocol.update(
      cots="logged training CoTs (samples.jsonl: the first CoT of the last "
      f"{len(rows)} logged questions)",
      split=spec.data.train_split,
      n=len(rows),
      seed=spec.train.seed,
    )
  if f.scorer == "base":
    lora = None
  results = {}
  for level in levels:
    results[level] = fragility.fragility_scores(
      ctx,
      lora,
      examples,
      cots,
      level=level,
      seed=f.seed,
      accuracy=f.accuracy,
      keys=keys,
      batch_size=f.batch_size,
      replacement=f.replacement,
    )
    _write(
      workdir,
      f"fragility_{level}.json",
      json.dumps({"protocol": protocol, **results[level].to_json()}),
    )
  return (
    os.path.basename(os.path.normpath(workdir)),
    bool(config.prompt.markovian),
    results,
    protocol,
  )


_PROTOCOL_KEYS = (
  "task",
  "scorer",
  "replacement",
  "perturbation_seed",
  "split",
  "n",
  "seed",
  "checkpoint_step",
)


def _saved_results(workdir: str, f, levels: list, config):
  """({level: FragilityResult}, protocol) saved by an earlier run of this command with the same
  protocol (`--reuse`), or None when any level is missing or differs."""
  from markovian_jax.analysis import fragility, run_inputs

  want = {
    "task": config.task,
    "scorer": f.scorer,
    "replacement": f.replacement,
    "perturbation_seed": f.seed,
  }
  if f.source == "heldout":
    n = config.eval.final_num_examples if f.num_examples is None else f.num_examples
    want.update(split=config.data.eval_split, seed=config.eval.seed)
    want["checkpoint_step"] = run_inputs.checkpoint_step(workdir, f.step)[0]
  out, protocol = {}, None
  for level in levels:
    path = epath.Path(workdir) / "analysis" / f"fragility_{level}.json"
    if not path.exists():
      return None
    d = files.read_json(path)
    protocol = d.get("protocol") or {}
    same = all(protocol.get(k) == v for k, v in want.items())
    sampled = str(protocol.get("cots", "")).startswith("sampled")
    if (
      not same
      or sampled != (f.source == "heldout")
      or (f.source == "heldout" and n and protocol.get("n") != n)
      or (f.accuracy and "accuracy" not in d and config.task != "wiki_continuation")
    ):
      return None
    out[level] = fragility.FragilityResult.from_json(d)
  return out, {**protocol, "reused": True}


def _metrics(result) -> list:
  return ["logprob"] + (["accuracy"] if result.correct is not None else [])


def run_fragility(f) -> str:
  from markovian_jax.analysis import fragility

  _check_run(f.workdir)
  if f.compare:
    _check_run(f.compare, "--compare")
  levels = ["char", "token"] if f.level == "both" else [f.level]
  if f.num_examples is not None and f.num_examples < 0:
    raise AnalysisError("--num_examples must be >= 0 (0 = the whole eval split)")
  # Both runs' inputs are checked before any model loads.
  from markovian_jax.analysis import run_inputs as analysis

  for w in [f.workdir] + ([f.compare] if f.compare else []):
    if f.source == "logged":
      analysis.logged_rows(w, 1)
    elif not (epath.Path(w) / "checkpoints").is_dir():
      raise AnalysisError(
        f"{w}: no checkpoints/ (the paper's protocol samples CoTs with the "
        "run's adapter; --source=logged reads its logged CoTs instead)"
      )
    analysis.run_config(w)
  runs = [_fragility_run(f.workdir, f, levels)]
  if f.compare:
    runs.append(_fragility_run(f.compare, f, levels))
  out = []
  for name, markovian, results, protocol in runs:
    what = f"{name} ({'Markovian' if markovian else 'non-Markovian'})"
    out += [
      f"## {what}: protocol",
      "",
      ", ".join(f"{k}: {v}" for k, v in protocol.items() if k != "level"),
      "",
    ]
    for level, result in results.items():
      for metric in _metrics(result):
        out += [f"## {what}: {level} level, {metric}", "", fragility.format_run(result, metric), ""]
  if f.compare:
    out += comparison_tables(runs, levels)
  text = "\n".join(out)
  _write(f.workdir, "fragility.md", text)
  return text


def comparison_tables(runs: list, levels: list) -> list:
  """Markdown lines of the two runs' differences (Markovian minus non-Markovian, whichever order
  `runs` has): per level, the per-severity table with consistency, Table 2's layout for the
  log-prob and Table 3's for the accuracy. runs: two (name, markovian, {level: result}, ...)."""
  from markovian_jax.analysis import fragility

  (a, ma, ra, pa), (b, mb, rb, _) = fragility.markovian_first(runs)
  heading = (
    "Markovian minus non-Markovian"
    if ma and not mb
    else f"{a} minus {b} (both {'Markovian' if ma else 'non-Markovian'})"
  )
  out = []
  for level in levels:
    for metric in [m for m in _metrics(ra[level]) if m in _metrics(rb[level])]:
      rows = fragility.compare(ra[level], rb[level], metric)
      out += [
        f"## {heading}: {level} level, {metric} (effect = unperturbed - perturbed; "
        f"positive: the perturbation hurts {a} more)",
        "",
        fragility.format_comparison(rows, metric, (a, b)),
        "",
      ]
      if metric == "logprob":
        out += [
          f"### Table 2 layout ({level} level): {a} - {b}, log-prob drop",
          "",
          fragility.format_table2(rows, "nats"),
          "",
        ]
      else:
        task = pa.get("task", a)
        out += [
          f"### Table 3 layout ({level} level): {a} - {b}, accuracy drop averaged over severities",
          "",
          fragility.format_table3({task: fragility.table3_row(rows)}),
          "",
        ]
  return out


def run_table3(f) -> str:
  """Table 3 over tasks: every run directly under --workdir (a parent of runs) whose `fragility`
  analysis is saved with accuracy (analysis/fragility_<level>.json), paired per task Markovian
  with non-Markovian (config.json prompt.markovian); per kind the accuracy differences averaged
  over severities, and the Overall row weighted by each task's n. Written to
  <workdir>/analysis/table3.md."""
  from markovian_jax.analysis import fragility

  _check_run(f.workdir)
  levels = ["char", "token"] if f.level == "both" else [f.level]
  parent = epath.Path(f.workdir)
  out = []
  for level in levels:
    by_task: dict = {}  # task -> {markovian: [(name, result)]}
    for run in sorted(d for d in parent.iterdir() if d.is_dir()):
      saved, config = run / "analysis" / f"fragility_{level}.json", run / "config.json"
      if not (saved.is_file() and config.is_file()):
        continue
      d = files.read_json(saved)
      result = fragility.FragilityResult.from_json(d)
      if result.correct is None:
        continue  # scored without --accuracy: no Table 3 numbers
      recorded = files.read_json(config)
      markovian = bool(recorded.get("prompt", {}).get("markovian", True))
      task = (d.get("protocol") or {}).get("task") or recorded.get("task")
      by_task.setdefault(task, {}).setdefault(markovian, []).append((run.name, result))
    rows, pairs = {}, []
    for task, sides in by_task.items():
      if len(sides.get(True, [])) != 1 or len(sides.get(False, [])) != 1:
        found = {k: [n for n, _ in v] for k, v in sides.items()}
        raise AnalysisError(
          f"table3: task {task} needs one Markovian and one non-Markovian run "
          f"with a saved {level}-level fragility analysis under {f.workdir}; "
          f"found Markovian {found.get(True, [])}, non-Markovian "
          f"{found.get(False, [])}"
        )
      (a, ra), (b, rb) = sides[True][0], sides[False][0]
      rows[task] = fragility.table3_row(fragility.compare(ra, rb, "accuracy"))
      pairs.append(f"{task}: {a} - {b}")
    if not rows:
      raise AnalysisError(
        f"table3: no run under {f.workdir} has a saved {level}-level fragility "
        "analysis with accuracy (run `analyze fragility --workdir=RUN "
        "--compare=OTHER` first)"
      )
    out += [
      f"## Table 3 ({level} level): Markovian - non-Markovian accuracy drop, averaged over "
      "severities",
      "",
      fragility.format_table3(rows),
      "",
      "Runs: " + "; ".join(pairs),
      "",
    ]
  text = "\n".join(out)
  _write(f.workdir, "table3.md", text)
  return text


def run_cross_model(f) -> str:
  from markovian_jax.analysis import cross_model
  from markovian_jax.analysis import run_inputs as analysis

  _check_run(f.workdir)
  if not f.reader:
    raise AnalysisError("cross_model needs --reader (the model that re-reads the CoTs)")
  workdirs = [f.workdir] + ([f.compare] if f.compare else [])
  for w in workdirs[1:]:
    _check_run(w, "--compare")
  fmt = cross_model.reader_prompt_format(f.reader)
  reader = os.path.basename(os.path.normpath(f.reader))
  results, tables, ctx = [], [], None
  for w in workdirs:
    rows = analysis.logged_rows(w, f.num_cots)
    # The reader reads the run's prompts in its own family's format (the reference's practice).
    config = analysis.run_config(w).copy_and_resolve_references()
    config.prompt.format = fmt
    ctx = analysis.load_context(config, model_path=f.reader, reuse=ctx)  # one load of the reader
    results.append(
      (
        os.path.basename(os.path.normpath(w)),
        cross_model.cross_model_scores(ctx, rows, batch_size=f.batch_size),
      )
    )
    tables.append(cross_model.format_table(results[-1][1], results[-1][0], reader))
  name, result = results[0]
  text = "\n\n".join(tables)
  png = os.fspath(epath.Path(f.workdir) / "analysis" / "cross_model.png")
  cross_model.plot(result, png, f"{reader} re-reads the CoTs of {name}")
  cross_model.plot_over_training(
    results,
    os.fspath(epath.Path(f.workdir) / "analysis" / "cross_model_training.png"),
    f"{reader} ({fmt} prompts) reads the CoTs of {', '.join(n for n, _ in results)}",
    window_steps=f.smooth_steps,
  )
  _write(f.workdir, "cross_model.json", json.dumps({"reader": f.reader, **result.to_json()}))
  _write(f.workdir, "cross_model.md", text)
  return text + f"\n\nplot: {png}"


def main(command: str):
  from absl import flags

  if command not in COMMANDS:
    raise AnalysisError(
      f"give the analysis first: python -m markovian_jax.analyze "
      f"{{{'|'.join(COMMANDS)}}} --workdir=...; got {command!r}"
    )
  f = flags.FLAGS
  if (f.num_cots is not None and f.num_cots < 1) or f.batch_size < 1 or f.smooth_steps < 1:
    raise AnalysisError("--num_cots, --batch_size and --smooth_steps must be positive")
  from markovian_jax.runtime import cli

  if f.workdir:
    cli.writing_to(os.path.join(f.workdir, "analysis"))
  with cli.session():
    text = {"fragility": run_fragility, "cross_model": run_cross_model, "table3": run_table3}[
      command
    ](f)
  print(text, flush=True)


def cli_main():
  """The `markovian-analyze` console script; the same as `python -m markovian_jax.analyze`."""
  from markovian_jax.runtime import cli

  _define_flags()
  command = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
  cli.run(lambda: main(command))


if __name__ == "__main__":
  cli_main()
