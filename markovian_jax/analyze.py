"""The paper's analyses of trained runs, on the CoTs they logged (samples.jsonl).

  python -m markovian_jax.analyze fragility --workdir=A [--compare=B] [--level=char|token|both]
      [--num_cots=32] [--scorer=base|actor] [--step=N] [--accuracy] [--seed=0]
  python -m markovian_jax.analyze cross_model --workdir=A --reader=PATH [--num_cots=32]

fragility: the last --num_cots logged questions' first CoT, perturbed five ways at 0-100%
severity (`perturbations`), at character level (the reference's analysis), token level (the
paper's text) or both, and re-scored (`fragility`). The scorer is the base model (the reference's
choice) or the run's adapter (--scorer=actor, checkpoint --step or the latest), each run with its
own answer prompt (question hidden when Markovian). Prints each run's table and, with --compare,
the Markovian-minus-non-Markovian table in the paper's layout (A minus B when both or neither are
Markovian), for the answer log-prob and, for QA tasks, the accuracy.

cross_model: the reader (any model path `load_checkpoint` accepts, with its own tokenizer) scores
log P(answer | CoT) - log P(answer | CoT') for every logged CoT; prints its agreement with the
run's own normalised reward and plots one against the other.

Results go to <workdir>/analysis/ (JSON, markdown, PNG). Bad input (no such run, no logged CoTs,
a reader whose tokenizer cannot be loaded) exits 2 with one line.
"""

from __future__ import annotations

import json
import os
import sys

from etils import epath

from markovian_jax.analysis.run_inputs import AnalysisError

COMMANDS = ("fragility", "cross_model")


def _define_flags():
  """Defined only when run as a program, so that training hooks may import the libraries."""
  from absl import flags
  flags.DEFINE_string("workdir", None, "The run directory to analyse (config.workdir).")
  flags.DEFINE_string("compare", None, "fragility: a second run directory (e.g. the "
                      "prompt.markovian=False run) for the paper's difference table.")
  flags.DEFINE_enum("level", "char", ["char", "token", "both"], "fragility: perturb characters "
                    "(the reference), tokens (the paper's text) or both.")
  flags.DEFINE_integer("num_cots", 32, "The last N logged questions (one CoT each for "
                       "fragility; all G CoTs for cross_model).")
  flags.DEFINE_enum("scorer", "base", ["base", "actor"], "fragility: score with the base model "
                    "or with the run's adapter.")
  flags.DEFINE_integer("step", None, "fragility --scorer=actor: checkpoint step (default latest).")
  flags.DEFINE_bool("accuracy", True, "fragility: also read and check the answer (QA tasks).")
  flags.DEFINE_integer("seed", 0, "fragility: perturbation seed.")
  flags.DEFINE_string("reader", None, "cross_model: the reading model (HF dir, .gguf, hub id, "
                      "package://PKG/FILE).")
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
  """(run name, whether Markovian, {level: FragilityResult}) of one run."""
  from markovian_jax.analysis import run_inputs as analysis
  from markovian_jax.analysis import fragility
  rows = analysis.logged_rows(workdir, f.num_cots)
  config = analysis.run_config(workdir)
  ctx = analysis.load_context(config)
  lora = analysis.run_adapter(workdir, ctx, f.step) if f.scorer == "actor" else None
  examples = [analysis.example(r) for r in rows]
  keys = [(int(r["step"]), r.get("id")) for r in rows]
  cots = [r["cots"][0] for r in rows]
  results = {}
  for level in levels:
    results[level] = fragility.fragility_scores(
        ctx, lora, examples, cots, level=level, seed=f.seed, accuracy=f.accuracy, keys=keys,
        batch_size=f.batch_size)
    _write(workdir, f"fragility_{level}.json", json.dumps(results[level].to_json()))
  return os.path.basename(os.path.normpath(workdir)), bool(config.prompt.markovian), results


def _metrics(result) -> list:
  return ["logprob"] + (["accuracy"] if result.correct is not None else [])


def run_fragility(f) -> str:
  from markovian_jax.analysis import fragility
  _check_run(f.workdir)
  if f.compare:
    _check_run(f.compare, "--compare")
  levels = ["char", "token"] if f.level == "both" else [f.level]
  # Both runs' logged CoTs are checked before any model loads.
  from markovian_jax.analysis import run_inputs as analysis
  for w in [f.workdir] + ([f.compare] if f.compare else []):
    analysis.logged_rows(w, 1)
    analysis.run_config(w)
  runs = [_fragility_run(f.workdir, f, levels)]
  if f.compare:
    runs.append(_fragility_run(f.compare, f, levels))
  out = []
  for name, markovian, results in runs:
    for level, result in results.items():
      for metric in _metrics(result):
        out += [f"## {name} ({'Markovian' if markovian else 'non-Markovian'}): {level} level, "
                f"{metric}", "", fragility.format_run(result, metric), ""]
  if f.compare:
    (a, ma, ra), (b, mb, rb) = runs
    if mb and not ma:  # the table is always Markovian minus non-Markovian
      (a, ma, ra), (b, mb, rb) = runs[1], runs[0]
    heading = ("Markovian minus non-Markovian" if ma and not mb
               else f"{a} minus {b} (both {'Markovian' if ma else 'non-Markovian'})")
    for level in levels:
      for metric in [m for m in _metrics(ra[level]) if m in _metrics(rb[level])]:
        rows = fragility.compare(ra[level], rb[level], metric)
        out += [f"## {heading}: {level} level, {metric} (effect = unperturbed - perturbed; "
                f"positive: the perturbation hurts {a} more)", "",
                fragility.format_comparison(rows, metric, (a, b)), ""]
  text = "\n".join(out)
  _write(f.workdir, "fragility.md", text)
  return text


def run_cross_model(f) -> str:
  from markovian_jax.analysis import run_inputs as analysis
  from markovian_jax.analysis import cross_model
  _check_run(f.workdir)
  if not f.reader:
    raise AnalysisError("cross_model needs --reader (the model that re-reads the CoTs)")
  rows = analysis.logged_rows(f.workdir, f.num_cots)
  ctx = analysis.load_context(analysis.run_config(f.workdir), model_path=f.reader)
  result = cross_model.cross_model_scores(ctx, rows, batch_size=f.batch_size)
  name = os.path.basename(os.path.normpath(f.workdir))
  reader = os.path.basename(os.path.normpath(f.reader))
  text = cross_model.format_table(result, name, reader)
  png = os.fspath(epath.Path(f.workdir) / "analysis" / "cross_model.png")
  cross_model.plot(result, png, f"{reader} re-reads the CoTs of {name}")
  _write(f.workdir, "cross_model.json", json.dumps({"reader": f.reader, **result.to_json()}))
  _write(f.workdir, "cross_model.md", text)
  return text + f"\n\nplot: {png}"


def main(command: str):
  from absl import flags
  if command not in COMMANDS:
    raise AnalysisError(f"give the analysis first: python -m markovian_jax.analyze "
                        f"{{{'|'.join(COMMANDS)}}} --workdir=...; got {command!r}")
  f = flags.FLAGS
  if f.num_cots < 1 or f.batch_size < 1:
    raise AnalysisError("--num_cots and --batch_size must be positive")
  from markovian_jax.runtime import cli
  with cli.session():
    text = run_fragility(f) if command == "fragility" else run_cross_model(f)
  print(text, flush=True)


def cli_main():
  """The `markovian-analyze` console script; the same as `python -m markovian_jax.analyze`."""
  from markovian_jax.runtime import cli
  _define_flags()
  command = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
  cli.run(lambda: main(command))


if __name__ == "__main__":
  cli_main()
