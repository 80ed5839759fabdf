"""Export a training checkpoint's LoRA: a PEFT adapter, or merged HF weights.

  python -m markovian_jax.export --checkpoint_dir=runs/gsm8k/checkpoints --best \
      --format=peft --out=runs/gsm8k/adapter
  python -m markovian_jax.export --checkpoint_dir=runs/gsm8k/checkpoints --step=4000 \
      --format=merged --out=runs/gsm8k/merged [--model=PATH] [--dtype=bfloat16]

--format=peft writes adapter_config.json + adapter_model.safetensors, which
`peft.PeftModel.from_pretrained(LlamaForCausalLM, DIR)`, `sample --lora=DIR` and
`config.lora.init_from=DIR` load. --format=merged writes the base model with the adapter folded
into its kernels (config.json, safetensors, tokenizer): a plain Llama for any runtime. Both add
export.json (which checkpoint, chosen how). The base model is the one the run trained on (the
checkpoint's config), unless --model names another copy of it.

--best takes the saved step with the best validation score: the score stored with the checkpoint
(what train.keep_best ranks), else the run's selection-split accuracy in its TensorBoard events
(selection/<method>/accuracy). The test split is never used to choose. Without --step or --best:
the latest step. Bad input (no such directory or step, no validation score for --best, an --out
that holds other files) exits 2 with one line before any weights load.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from markovian_jax.runtime.errors import CheckpointError, UserError

FORMATS = ("peft", "merged")


class ExportError(UserError):
  """Flags that select nothing to export, or nowhere to write it."""


def open_checkpoints(checkpoint_dir: str):
  """A read-only `checkpointing.Checkpointer` over an existing run's checkpoints."""
  from markovian_jax.runtime import checkpointing
  if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
    raise CheckpointError(f"--checkpoint_dir {checkpoint_dir}: no such directory")
  ckpt = checkpointing.Checkpointer(checkpoint_dir, create=False, keep_best=False)
  if not ckpt.all_steps():
    raise CheckpointError(f"--checkpoint_dir {checkpoint_dir}: holds no checkpoints")
  return ckpt


def _stored_scores(checkpoint_dir: str) -> dict:
  """{step: score} saved with the checkpoints (Checkpointer.save(score=...))."""
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(
      os.path.abspath(checkpoint_dir), item_names=("lora", "opt_state", "state"),
      options=ocp.CheckpointManagerOptions(create=False, best_fn=lambda m: m["score"],
                                           best_mode="max"))
  scores = {}
  for step in manager.all_steps():
    metrics = manager.metrics(step)
    if isinstance(metrics, dict) and "score" in metrics:
      scores[int(step)] = float(metrics["score"])
  manager.close()
  return scores


def _selection_scores(checkpoint_dir: str, task: Optional[str]) -> tuple:
  """({step: selection metric}, tag) from the run's events (the checkpoint dir's parent)."""
  from markovian_jax.reporting import runs as report_runs
  workdir = os.path.dirname(os.path.abspath(checkpoint_dir))
  try:
    run = report_runs.load_run(workdir)
  except report_runs.ReportError:
    return {}, None
  run.config.setdefault("task", task)
  methods = run.methods("selection")
  if not methods:
    return {}, None
  tag = run.metric_tag(methods[0], "selection")
  steps, values = run.series(tag)
  return dict(zip(steps.tolist(), values.tolist())), tag


def best_step(checkpoint_dir: str) -> tuple:
  """(step, how it was chosen): the saved step with the highest validation score; ties go to
  the earliest step. Raises ExportError when no saved step has one."""
  ckpt = open_checkpoints(checkpoint_dir)
  saved = ckpt.all_steps()
  stored = {s: v for s, v in _stored_scores(checkpoint_dir).items() if s in saved}
  if stored:
    step = max(sorted(stored), key=stored.get)
    return step, f"validation score stored with the checkpoint ({stored[step]:.4f})"
  task = (ckpt.restore_state(saved[-1]).get("config") or {}).get("task")
  scores, tag = _selection_scores(checkpoint_dir, task)
  scores = {s: v for s, v in scores.items() if s in saved}
  if scores:
    step = max(sorted(scores), key=scores.get)
    return step, f"{tag} = {scores[step]:.4f} (best of saved steps {sorted(scores)})"
  raise ExportError(f"--best: none of the saved steps {saved} in {checkpoint_dir} has a "
                    "validation score (none stored with the checkpoint, no selection/ scalars in "
                    "the run's events); give --step")


def choose_step(checkpoint_dir: str, step: Optional[int] = None, best: bool = False) -> tuple:
  """(step, reason) for --step N, --best or (neither) the latest step."""
  ckpt = open_checkpoints(checkpoint_dir)
  if step is not None and best:
    raise ExportError("give --step or --best, not both")
  if best:
    return best_step(checkpoint_dir)
  saved = ckpt.all_steps()
  if step is None:
    return saved[-1], "the latest step"
  if step not in saved:
    raise CheckpointError(f"--step {step}: no checkpoint for that step in {checkpoint_dir}; "
                          f"saved steps: {saved}")
  return step, "--step"


def adapter_settings(checkpoint_dir: str, step: int) -> dict:
  """The adapter's rank, alpha, dropout and targets, and the base model path, as the run saved
  them."""
  from markovian_jax.models import lora as lora_lib
  state = open_checkpoints(checkpoint_dir).restore_state(step)
  saved, config = state.get("lora") or {}, state.get("config") or {}
  lora_cfg = config.get("lora") or {}
  return dict(rank=int(saved.get("rank", lora_cfg.get("rank", 8))),
              alpha=float(saved.get("alpha", lora_cfg.get("alpha", 16.0))),
              dropout=float(saved.get("dropout", lora_cfg.get("dropout", 0.0))),
              targets=tuple(lora_cfg.get("targets", lora_lib.ALL_LINEAR)),
              model=(config.get("model") or {}).get("path"),
              dtype=(config.get("model") or {}).get("dtype", "float32"))


def restore_adapter(checkpoint_dir: str, step: int, model_config, settings: Optional[dict] = None):
  """The LoRA of checkpoint `step` as a `LoraAdapter` for `model_config` (a LlamaConfig), on the
  default device. Raises CheckpointError when it does not fit that model."""
  import jax
  from markovian_jax.models import init_lora
  s = settings or adapter_settings(checkpoint_dir, step)
  template = init_lora(model_config, jax.random.PRNGKey(0), rank=s["rank"], alpha=s["alpha"],
                       dropout=s["dropout"], targets=s["targets"])
  try:
    params = open_checkpoints(checkpoint_dir).restore_lora(step, template.params)
  except CheckpointError:  # a broken checkpoint says so itself
    raise
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint step {step} in {checkpoint_dir} does not fit a rank-"
                          f"{s['rank']} LoRA on {list(s['targets'])} of this model: {e}") from e
  return template.replace(params=params)


def _model_config(path: str):
  """The LlamaConfig of a base model; only an HF directory's is read without its weights."""
  from markovian_jax.models import LlamaConfig, load_checkpoint, resolve_model_path
  local = resolve_model_path(path)
  if os.path.isfile(os.path.join(local, "config.json")):
    return LlamaConfig.from_json_file(os.path.join(local, "config.json")), None
  config, params = load_checkpoint(local)
  return config, params


def _check_out(out: str, overwrite: bool):
  if not out:
    raise ExportError("--out is required (the directory to write)")
  if os.path.isfile(out):
    raise ExportError(f"--out {out} is a file; give a directory")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ExportError(f"--out {out} is not empty; give a new directory or --overwrite")


def export(checkpoint_dir: str, out: str, *, fmt: str = "peft", step: Optional[int] = None,
           best: bool = False, model: Optional[str] = None, dtype: Optional[str] = None,
           overwrite: bool = False) -> dict:
  """Writes checkpoint `step` (or the best, or the latest) of `checkpoint_dir` to `out` as a PEFT
  adapter or merged HF weights. Returns the export.json record."""
  from markovian_jax.models import hf, load_checkpoint, load_tokenizer
  if fmt not in FORMATS:
    raise ExportError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
  _check_out(out, overwrite)
  chosen, why = choose_step(checkpoint_dir, step, best)
  settings = adapter_settings(checkpoint_dir, chosen)
  model_path = model or settings["model"]
  if not model_path:
    raise ExportError("the checkpoint's config names no model.path; give --model")
  dtype = dtype or settings["dtype"]
  config, params = _model_config(model_path)
  lora = restore_adapter(checkpoint_dir, chosen, config, settings)
  if fmt == "peft":
    local = os.path.abspath(model_path) if os.path.exists(model_path) else model_path
    hf.save_peft_adapter(lora, config, out, base_model_name_or_path=local)
  else:
    if params is None or dtype != "float32":  # _model_config reads weights in float32
      config, params = load_checkpoint(model_path, dtype=dtype)
    hf.save_merged_hf(config, params, lora, out, tokenizer=load_tokenizer(model_path))
  record = {"checkpoint_dir": os.path.abspath(checkpoint_dir), "step": chosen, "chosen_by": why,
            "format": fmt, "base_model": model_path, "rank": lora.rank, "alpha": lora.alpha,
            "targets": list(lora.targets)}
  with open(os.path.join(out, "export.json"), "w") as f:
    json.dump(record, f, indent=2)
  return record
