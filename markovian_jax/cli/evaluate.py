"""Evaluation CLI: a results table for the base model and/or orbax checkpoints of a run.

  python -m markovian_jax.evaluate --config=configs/gsm8k.py --checkpoint_dir=runs/gsm8k/checkpoints
  python -m markovian_jax.evaluate --config=configs/gsm8k.py --base_model  # no checkpoint

Writes to --output_dir (default: <checkpoint_dir>/../eval/final, or <workdir>/eval/final, apart
from training's periodic eval/step_N.jsonl): `summary.json`, `<model>.jsonl` (one row per example
and CoT sample), `protocol.json` (what the numbers were read under), TensorBoard scalars under
`eval/` at each checkpoint's step (the base model at step 0, as in training). The results table
(`report`) takes its cells from these files. Flags, config, checkpoints and data are all checked
before the model is loaded; bad input exits with status 2 and one `error:` line. The step is chosen
and the adapter restored by `training.checkpoint_choice` (as export and analyze do): its rank,
alpha and targets are those the run recorded, not --config's.

A run is evaluated under its own protocol: where --config differs from the run's config.json in
a protocol key (reporting.runs.RUN_PROTOCOL_KEYS: variant, prompt.markovian, eval.reader,
prompt.format, model, CoT length and temperature) the command refuses, unless --output_dir sends
the numbers elsewhere; a directory that holds another protocol's files (protocol.json: those keys,
the test set's size, CoT samples, temperature, seed, sampling.cot_stops_at_eos) is never written
into.

Multi-process (a TPU pod, several GPU hosts): every process runs this same command and evaluates
its share of each batch; process 0 alone writes the files and prints the table. Directories may be
local or gs://... (etils epath).
"""

from __future__ import annotations

import json

from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from markovian_jax.runtime import cli, files
from markovian_jax.runtime.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/<task>.py).")
_CKPT = flags.DEFINE_string("checkpoint_dir", None, "Orbax checkpoint directory of a training run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")
_ALL = flags.DEFINE_bool(
  "all_steps",
  False,
  "Evaluate every saved step on the selection "
  "(validation) and the test split; writes steps.md, one row per step.",
)
_BEST = flags.DEFINE_bool(
  "best",
  False,
  "Evaluate the step with the best validation score "
  "(stored with the checkpoints; never the test split).",
)
_BASE = flags.DEFINE_bool(
  "base_model", False, "Also evaluate the base model (alone when no --checkpoint_dir)."
)
_NUM_SAMPLES = flags.DEFINE_integer(
  "num_samples", None, "CoT samples per question (default config.eval.num_samples)."
)
_NUM_EXAMPLES = flags.DEFINE_integer(
  "num_examples",
  None,
  "Test questions to evaluate (default "
  "config.eval.final_num_examples: the paper's full test "
  "size; 0 there = the whole eval split). The selection set "
  "of --all_steps is the run's own (selection.json).",
)
_GREEDY = flags.DEFINE_bool("greedy_cot", False, "Greedy CoTs instead of the training temperature.")
_OUT = flags.DEFINE_string("output_dir", None, "Where to write summary.json and the JSONL rows.")


class EvalError(UserError):
  """Flags or checkpoints that do not select anything to evaluate."""


def _check_flags():
  if not _CKPT.value and not _BASE.value:
    raise EvalError("give --checkpoint_dir (a training run's checkpoints) and/or --base_model")
  if sum([_STEP.value is not None, _ALL.value, _BEST.value]) > 1:
    raise EvalError("give one of --step, --all_steps and --best (--step or --all_steps, not both)")
  if (_STEP.value is not None or _ALL.value or _BEST.value) and not _CKPT.value:
    raise EvalError("--step / --all_steps / --best select checkpoints: give --checkpoint_dir too")
  for flag in (_NUM_SAMPLES, _NUM_EXAMPLES):
    if flag.value is not None and flag.value < 1:
      raise EvalError(f"--{flag.name} must be a positive integer, got {flag.value}")


def _steps_to_evaluate() -> list:
  """The saved steps the flags select (checkpoint_choice: --step, --best or the latest)."""
  from markovian_jax.training import checkpoint_choice

  saved = checkpoint_choice.saved_steps(_CKPT.value)
  logging.info("checkpoints in %s: steps %s", _CKPT.value, saved)
  if _ALL.value:
    return saved
  step, reason = checkpoint_choice.choose_step(_CKPT.value, _STEP.value, _BEST.value)
  logging.info("checkpoint step %d: %s", step, reason)
  return [step]


def _lora_settings(step: int, spec) -> dict:
  """The adapter's settings as the run recorded them (its rank may differ from this config's;
  --config only fills what an old checkpoint does not record)."""
  from markovian_jax.training import checkpoint_choice

  settings = checkpoint_choice.adapter_settings(_CKPT.value, step, spec.recorded)
  if settings["model"] and settings["model"] != spec.model.path:
    logging.warning(
      "checkpoint step %d was trained on model %s; evaluating it on %s",
      step,
      settings["model"],
      spec.model.path,
    )
  return settings


def run(spec) -> dict:
  """Evaluates the models the flags select on the eval split of `spec` (the RunSpec of --config,
  validated once by `main`); returns {model: summary}."""
  import jax

  from markovian_jax.models import load_tokenizer
  from markovian_jax.runtime import checkpointing, summary
  from markovian_jax.training import checkpoint_choice, evaluation
  from markovian_jax.training.run_context import RunContext, read_examples

  # Everything that can be wrong with the input is checked before the model is loaded.
  _check_flags()
  steps, settings = [], {}
  if _CKPT.value:
    steps = _steps_to_evaluate()
    settings = {step: _lora_settings(step, spec) for step in steps}
  models = (["base"] if _BASE.value else []) + [f"step_{s}" for s in steps]
  logging.info("models to evaluate: %s", models)
  # The run's own protocol (its config.json), before its data is read.
  from markovian_jax.reporting import runs as report_runs

  refusal = report_runs.foreign_protocol(
    str(run_dir(spec)), report_runs.flatten(spec.recorded), bool(_OUT.value)
  )
  if refusal:
    raise EvalError(refusal)
  tokenizer = load_tokenizer(spec.model.path)
  # The final number: the paper's full test size unless --num_examples says otherwise. Subsets
  # are hash-ranked, so training's periodic test set (eval.num_examples) is a part of this one.
  test_size = _NUM_EXAMPLES.value or spec.eval.final_num_examples
  from markovian_jax.data import selection as selection_lib

  split = read_examples(spec, spec.data.eval_split, tokenizer)
  examples = selection_lib.eval_subset(
    split, test_size or len(split), spec.eval.seed, selection_lib.strata(spec.task)
  )
  logging.info(
    "test set: %d of the %d %s %r items", len(examples), len(split), spec.task, spec.data.eval_split
  )
  selection_set = None
  if _ALL.value:
    # The run's own selection set (selection.json), whatever the sizes of this command.
    from markovian_jax.training.run_context import recorded_selection

    selection_set, where = recorded_selection(
      spec, checkpointing.absolute(_CKPT.value).parent, tokenizer
    )
    logging.info("selection set: %d items (%s)", len(selection_set), where)
  out_dir = output_dir(spec)
  cli.writing_to(out_dir, "--output_dir")
  kw = dict(
    num_samples=_NUM_SAMPLES.value or spec.eval.num_samples,
    temperature=0.0 if _GREEDY.value else spec.eval.temperature,
    reader=spec.eval.reader,
    answer_max_tokens=spec.eval.answer_max_tokens,
    answer_first_line=spec.eval.answer_first_line,
    batch_size=spec.eval.batch_size,
    seed=spec.eval.seed,
  )
  protocol = check_protocol(spec, out_dir, len(examples), kw)

  ctx = RunContext.create(spec, tokenizer=tokenizer)
  writer_process = jax.process_index() == 0
  if writer_process:
    out_dir.mkdir(parents=True, exist_ok=True)
  writer = summary.SummaryWriter(out_dir)
  results, selection = [], []
  sets = [("test", examples, "eval/", "")]
  if _ALL.value:
    sets.append(("selection", selection_set, "selection/", "selection/"))
  try:
    for name in models:
      # The base model is logged at step 0, as the training loop does.
      step = 0 if name == "base" else int(name[len("step_") :])
      # Restored straight onto the mesh, where the base params live.
      lora = (
        None
        if name == "base"
        else checkpoint_choice.restore_adapter(
          _CKPT.value, step, ctx.model, settings[step], mesh=ctx.mesh
        )
      )
      for split, items, prefix, sub in sets:
        desc = name if split == "test" else f"{name} {split}"
        summ, rows = evaluation.evaluate(ctx, lora, items, desc=desc, **kw)
        (results if split == "test" else selection).append((name, summ))
        if writer_process:
          (out_dir / sub).mkdir(parents=True, exist_ok=True)
          files.write_atomic(
            out_dir / sub / f"{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows)
          )
        writer.scalars(step, evaluation.scalars(summ), prefix=prefix)
  finally:
    writer.close()
  if selection and writer_process:
    table = step_table(selection, results)
    print(table)
    files.write_atomic(out_dir / "steps.md", table + "\n")
  out = {name: s for name, s in results}
  if writer_process:
    print(evaluation.format_table(results))
    # Earlier models of this same protocol stay (e.g. --base_model once, --best later).
    earlier = out_dir / "summary.json"
    kept = files.read_json(earlier) if earlier.is_file() else {}
    files.write_atomic(out_dir / "summary.json", json.dumps({**kept, **out}, indent=2))
    files.write_atomic(out_dir / "protocol.json", json.dumps(protocol, indent=1))
    print(f"wrote {out_dir}/summary.json and {', '.join(m + '.jsonl' for m in models)}")
  return out


def step_table(selection: list, test: list) -> str:
  """A markdown table, one row per model: each extractor's selection and test accuracy, the
  model with the best selection score marked (the checkpoint an honest report picks)."""
  from markovian_jax.training import evaluation

  sel, tst = dict(selection), dict(test)
  methods = [
    k[: -len("/accuracy")] for k in evaluation.scalars(test[0][1]) if k.endswith("/accuracy")
  ]
  best = max(sel, key=lambda n: evaluation.primary_score(sel[n]))
  head = ["model"] + [f"{m} {split}" for m in methods for split in ("selection", "test")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, _ in test:
    cells = [name + (" (best selection)" if name == best else "")]
    for m in methods:
      for summ in (sel[name], tst[name]):
        cells.append(f"{evaluation.scalars(summ).get(m + '/accuracy', float('nan')):.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_dir(spec) -> epath.Path:
  """The run evaluated: --checkpoint_dir's parent, else config.workdir (local or gs://)."""
  from markovian_jax.runtime import checkpointing

  if _CKPT.value:
    return checkpointing.absolute(_CKPT.value).parent
  return epath.Path(spec.workdir)


def output_dir(spec) -> epath.Path:
  """--output_dir, else the run's eval/final (reporting.runs.FINAL_EVAL_DIR)."""
  from markovian_jax.reporting.runs import FINAL_EVAL_DIR

  if _OUT.value:
    return epath.Path(_OUT.value)
  return run_dir(spec) / FINAL_EVAL_DIR


def check_protocol(spec, out_dir: epath.Path, test_size: int, kw: dict) -> dict:
  """The protocol of this evaluation (protocol.json). Raises EvalError when `out_dir` holds
  another protocol's evaluations."""
  from markovian_jax.reporting import runs as report_runs

  current = report_runs.flatten(spec.recorded)
  protocol = {k: current.get(k) for k in report_runs.RUN_PROTOCOL_KEYS}
  protocol.update(
    num_examples=test_size,
    eval_split=spec.data.eval_split,
    num_samples=kw["num_samples"],
    cot_temperature=kw["temperature"],
    seed=kw["seed"],
  )
  refusal = report_runs.foreign_directory(str(out_dir), protocol)
  if refusal:
    raise EvalError(refusal)
  return protocol


def main():
  from markovian_jax.training import config_validation

  with config_validation.config_session(_CONFIG.value, "configs/gsm8k.py") as spec:
    run(spec)


def cli_main():
  """The `markovian-evaluate` console script; the same as `python -m markovian_jax.evaluate`."""
  cli.run(main)


if __name__ == "__main__":
  cli_main()
