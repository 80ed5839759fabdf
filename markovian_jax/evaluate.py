"""Evaluation CLI: a results table for the base model and/or orbax checkpoints of a run.

  python -m markovian_jax.evaluate --config=configs/gsm8k.py --checkpoint_dir=runs/gsm8k/checkpoints
  python -m markovian_jax.evaluate --config=configs/gsm8k.py --base_model  # no checkpoint

Writes to --output_dir (default: <checkpoint_dir>/../eval, or <workdir>/eval): `summary.json`,
`<model>.jsonl` (one row per example and CoT sample), TensorBoard scalars under `eval/` at each
checkpoint's step (the base model at step 0, as in training). Flags, config, checkpoints and data
are all checked before the model is loaded; bad input exits with status 2 and one `error:` line.
The adapter's rank, alpha and targets are read from the checkpoint, not from --config.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/<task>.py).")
_CKPT = flags.DEFINE_string("checkpoint_dir", None, "Orbax checkpoint directory of a training run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")
_ALL = flags.DEFINE_bool("all_steps", False, "Evaluate every saved step.")
_BASE = flags.DEFINE_bool("base_model", False,
                          "Also evaluate the base model (alone when no --checkpoint_dir).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "CoT samples per question "
                                    "(default config.eval.num_samples).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "Questions to evaluate "
                                     "(default config.eval.num_examples).")
_GREEDY = flags.DEFINE_bool("greedy_cot", False, "Greedy CoTs instead of the training temperature.")
_OUT = flags.DEFINE_string("output_dir", None, "Where to write summary.json and the JSONL rows.")


class EvalError(RuntimeError):
  pass


def _check_flags():
  if not _CKPT.value and not _BASE.value:
    raise EvalError("give --checkpoint_dir (a training run's checkpoints) and/or --base_model")
  if _STEP.value is not None and _ALL.value:
    raise EvalError("give --step or --all_steps, not both")
  if (_STEP.value is not None or _ALL.value) and not _CKPT.value:
    raise EvalError("--step / --all_steps select checkpoints: give --checkpoint_dir too")
  for flag in (_NUM_SAMPLES, _NUM_EXAMPLES):
    if flag.value is not None and flag.value < 1:
      raise EvalError(f"--{flag.name} must be a positive integer, got {flag.value}")


def _steps_to_evaluate(ckpt) -> list:
  steps = ckpt.all_steps()
  if not steps:
    raise EvalError(f"no checkpoints in {ckpt.directory}")
  if _ALL.value:
    return steps
  step = _STEP.value if _STEP.value is not None else steps[-1]
  if step not in steps:
    raise EvalError(f"no checkpoint for step {step} in {ckpt.directory}; available: {steps}")
  return [step]


def _lora_settings(ckpt, step: int, config) -> dict:
  """The adapter's shape as the run saved it (its rank may differ from this config's)."""
  state = ckpt.restore_state(step)
  saved = state.get("lora") or {}
  saved_config = (state.get("config") or {}).get("lora") or {}
  settings = dict(rank=int(saved.get("rank", config.lora.rank)),
                  alpha=float(saved.get("alpha", config.lora.alpha)),
                  targets=tuple(saved_config.get("targets", config.lora.targets)))
  trained_on = (state.get("config") or {}).get("model", {}).get("path")
  if trained_on and trained_on != config.model.path:
    logging.warning("checkpoint step %d was trained on model %s; evaluating it on %s", step,
                    trained_on, config.model.path)
  return settings


def _load_examples(config, limit: int) -> list:
  """The eval split, read before the model so that bad data fails in seconds."""
  from markovian_jax import data as data_lib
  path = config.data.path
  if path and config.task != "arithmetic" and not os.path.exists(os.path.expanduser(path)):
    raise FileNotFoundError(f"data.path {path}: no such file or directory ({config.task} data)")
  tokenizer = None
  if config.task == "wiki_continuation":  # the only task whose examples need the tokenizer
    from markovian_jax.models import load_tokenizer
    tokenizer = load_tokenizer(config.model.path)
  options = data_lib.task_options(config.task, config.data, tokenizer)
  examples = data_lib.load_task(config.task, config.data.eval_split, config.data.path or None,
                                **options)[:limit]
  if not examples:
    raise EvalError(f"{config.task} split {config.data.eval_split!r} has no examples "
                    f"(data.path={config.data.path!r})")
  return examples


def _restore_lora(ckpt, step: int, settings: dict, ctx):
  import jax

  from markovian_jax import sharding
  from markovian_jax.models import init_lora
  template = init_lora(ctx.model, jax.random.PRNGKey(0), rank=settings["rank"],
                       alpha=settings["alpha"], dropout=0.0, targets=settings["targets"])
  # Restored straight onto the mesh, where the base params live.
  template = template.replace(params=jax.device_put(
      template.params, sharding.param_shardings(template.params, ctx.mesh)))
  try:
    params = ckpt.restore_lora(step, template.params)
  except (ValueError, KeyError, TypeError) as e:
    raise EvalError(f"checkpoint step {step} in {ckpt.directory} does not fit model "
                    f"{ctx.config.model.path} with a rank-{settings['rank']} LoRA on "
                    f"{list(settings['targets'])}: {e}") from e
  return template.replace(params=params)


def run(config) -> dict:
  """Evaluates the models the flags select on `config`'s eval split; returns {model: summary}."""
  from markovian_jax import checkpointing, config_validation, evaluation, summary
  from markovian_jax.run_context import RunContext

  # Everything that can be wrong with the input is checked before the model is loaded.
  _check_flags()
  config_validation.validate(config)
  ckpt, steps, settings = None, [], {}
  if _CKPT.value:
    if not os.path.isdir(_CKPT.value):
      raise EvalError(f"--checkpoint_dir {_CKPT.value} does not exist")
    ckpt = checkpointing.Checkpointer(_CKPT.value, create=False)
    steps = _steps_to_evaluate(ckpt)
    settings = {step: _lora_settings(ckpt, step, config) for step in steps}
    logging.info("checkpoints in %s: steps %s", ckpt.directory, ckpt.all_steps())
  models = (["base"] if _BASE.value else []) + [f"step_{s}" for s in steps]
  logging.info("models to evaluate: %s", models)
  examples = _load_examples(config, _NUM_EXAMPLES.value or config.eval.num_examples)
  out_dir = _OUT.value or (os.path.join(os.path.dirname(os.path.abspath(_CKPT.value)), "eval")
                           if _CKPT.value else os.path.join(config.workdir, "eval"))

  ctx = RunContext.create(config)
  kw = dict(num_samples=_NUM_SAMPLES.value or config.eval.num_samples,
            temperature=0.0 if _GREEDY.value else config.eval.temperature,
            reader=config.eval.reader, answer_max_tokens=config.eval.answer_max_tokens,
            answer_first_line=config.eval.answer_first_line,
            batch_size=config.eval.batch_size, seed=config.eval.seed)
  os.makedirs(out_dir, exist_ok=True)
  writer = summary.SummaryWriter(out_dir)
  results = []
  try:
    for name in models:
      # The base model is logged at step 0, as the training loop does.
      step = 0 if name == "base" else int(name[len("step_"):])
      lora = None if name == "base" else _restore_lora(ckpt, step, settings[step], ctx)
      summ, rows = evaluation.evaluate(ctx, lora, examples, desc=name, **kw)
      results.append((name, summ))
      with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
      writer.scalars(step, evaluation.scalars(summ), prefix="eval/")
  finally:
    writer.close()
  print(evaluation.format_table(results))
  out = {name: s for name, s in results}
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {out_dir}/summary.json and {', '.join(m + '.jsonl' for m in models)}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (e.g. --config=configs/gsm8k.py)")
  absl_logger = pylogging.getLogger("absl")
  absl_logger.setLevel(pylogging.INFO)
  # orbax logs every restore step at INFO through absl; keep its warnings, drop the chatter.
  absl_logger.addFilter(lambda r: r.levelno >= pylogging.WARNING or "orbax" not in r.pathname)
  from markovian_jax.checkpointing import CheckpointError
  from markovian_jax.config_validation import InvalidConfig
  from markovian_jax.data import DataError
  from markovian_jax import compilation_cache, host_allocator
  # Bad input gets one line; anything else keeps its traceback.
  try:
    host_allocator.ensure(_CONFIG.value.host_allocator)  # may restart this command
    cache = compilation_cache.enable(_CONFIG.value.compilation_cache_dir)
    run(_CONFIG.value)
    if cache:
      logging.info("compilation cache %s: %s", cache, compilation_cache.stats())
  except (EvalError, CheckpointError, InvalidConfig, DataError, FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
