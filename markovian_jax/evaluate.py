"""Evaluation CLI: a results table for the base model and/or orbax checkpoints of a run.

  python -m markovian_jax.evaluate --config=configs/gsm8k.py --checkpoint_dir=runs/gsm8k/checkpoints
  python -m markovian_jax.evaluate --config=configs/gsm8k.py --base_model        # no checkpoint needed

Writes to --output_dir (default: <checkpoint_dir>/../eval, or <workdir>/eval): `summary.json`,
`<model>.jsonl` (one row per example and CoT sample), TensorBoard scalars under `eval/`.
"""

from __future__ import annotations

import json
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


def _models_to_evaluate(ckpt):
  if ckpt is None:
    return []
  steps = ckpt.all_steps()
  if not steps:
    raise EvalError(f"no checkpoints in {ckpt.directory}")
  if _ALL.value:
    return steps
  step = _STEP.value if _STEP.value is not None else steps[-1]
  if step not in steps:
    raise EvalError(f"no checkpoint for step {step} in {ckpt.directory}; available: {steps}")
  return [step]


def run(config) -> dict:
  import jax

  from markovian_jax import checkpointing, evaluation, summary
  from markovian_jax.models import init_lora
  from markovian_jax.run_context import RunContext

  if not _CKPT.value and not _BASE.value:
    raise EvalError("give --checkpoint_dir (a training run's checkpoints) and/or --base_model")
  ckpt = None
  if _CKPT.value:
    if not os.path.isdir(_CKPT.value):
      raise EvalError(f"--checkpoint_dir {_CKPT.value} does not exist")
    ckpt = checkpointing.Checkpointer(_CKPT.value, create=False)
  steps = _models_to_evaluate(ckpt)
  out_dir = _OUT.value or (os.path.join(os.path.dirname(os.path.abspath(_CKPT.value)), "eval")
                           if _CKPT.value else os.path.join(config.workdir, "eval"))
  ctx = RunContext.create(config)
  examples = ctx.load_examples(config.data.eval_split,
                               _NUM_EXAMPLES.value or config.eval.num_examples)
  writer = summary.SummaryWriter(out_dir)
  kw = dict(num_samples=_NUM_SAMPLES.value or config.eval.num_samples,
            temperature=0.0 if _GREEDY.value else config.eval.temperature,
            reader=config.eval.reader, answer_max_tokens=config.eval.answer_max_tokens,
            batch_size=config.eval.batch_size, seed=config.eval.seed)
  lora_template = init_lora(ctx.model, jax.random.PRNGKey(0), rank=config.lora.rank,
                            alpha=config.lora.alpha, dropout=config.lora.dropout,
                            targets=tuple(config.lora.targets))
  results = []
  models = (["base"] if _BASE.value else []) + [f"step_{s}" for s in steps]
  os.makedirs(out_dir, exist_ok=True)
  for name in models:
    lora = None
    if name != "base":
      step = int(name.split("_")[1])
      lora = lora_template.replace(params=ckpt.restore_lora(step, lora_template.params))
    summ, rows = evaluation.evaluate(ctx, lora, examples, desc=name, **kw)
    results.append((name, summ))
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    writer.scalars(0 if name == "base" else int(name.split("_")[1]), evaluation.scalars(summ),
                   prefix="eval/" if name != "base" else "eval_base/")
  writer.close()
  table = evaluation.format_table(results)
  print(table)
  out = {name: s for name, s in results}
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {out_dir}/summary.json and one JSONL per model")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (e.g. --config=configs/gsm8k.py)")
  try:
    run(_CONFIG.value)
  except (EvalError, FileNotFoundError, ValueError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
