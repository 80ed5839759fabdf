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
the latest step. The step is chosen and the adapter restored, with the rank, alpha and targets the
run recorded, by `checkpoint_choice`, as evaluate and the analyses do. Bad input (no such
directory or step, no validation score for --best, an --out that holds other files) exits 2 with
one line before any weights load.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from markovian_jax.runtime import files
from markovian_jax.runtime.errors import UserError
from markovian_jax.training import checkpoint_choice

FORMATS = ("peft", "merged")


class ExportError(UserError):
  """Flags that select nothing to export, or nowhere to write it."""


# `export.best_step(checkpoint_dir)` -> (step, reason), as callers have read it.
best_step = checkpoint_choice.best_step


def _model_config(path: str):
  """The DecoderConfig of a base model; only an HF directory's is read without its weights."""
  from markovian_jax.models import DecoderConfig, load_checkpoint, resolve_model_path

  local = resolve_model_path(path)
  if os.path.isfile(os.path.join(local, "config.json")):
    return DecoderConfig.from_json_file(os.path.join(local, "config.json")), None
  config, params = load_checkpoint(local)
  return config, params


def _check_out(out: str, overwrite: bool):
  if not out:
    raise ExportError("--out is required (the directory to write)")
  if os.path.isfile(out):
    raise ExportError(f"--out {out} is a file; give a directory")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ExportError(f"--out {out} is not empty; give a new directory or --overwrite")


def export(
  checkpoint_dir: str,
  out: str,
  *,
  fmt: str = "peft",
  step: Optional[int] = None,
  best: bool = False,
  model: Optional[str] = None,
  dtype: Optional[str] = None,
  overwrite: bool = False,
) -> dict:
  """Writes checkpoint `step` (or the best, or the latest) of `checkpoint_dir` to `out` as a PEFT
  adapter or merged HF weights. Returns the export.json record."""
  from markovian_jax.models import hf, load_checkpoint, load_tokenizer

  if fmt not in FORMATS:
    raise ExportError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
  _check_out(out, overwrite)
  chosen, why = checkpoint_choice.choose_step(checkpoint_dir, step, best)
  settings = checkpoint_choice.adapter_settings(checkpoint_dir, chosen)
  model_path = model or settings["model"]
  if not model_path:
    raise ExportError("the checkpoint's config names no model.path; give --model")
  dtype = dtype or settings["dtype"]
  config, params = _model_config(model_path)
  lora = checkpoint_choice.restore_adapter(checkpoint_dir, chosen, config, settings)
  if fmt == "peft":
    local = os.path.abspath(model_path) if os.path.exists(model_path) else model_path
    hf.save_peft_adapter(lora, config, out, base_model_name_or_path=local)
  else:
    if params is None or dtype != "float32":  # _model_config reads weights in float32
      config, params = load_checkpoint(model_path, dtype=dtype)
    hf.save_merged_hf(config, params, lora, out, tokenizer=load_tokenizer(model_path))
  record = {
    "checkpoint_dir": os.path.abspath(checkpoint_dir),
    "step": chosen,
    "chosen_by": why,
    "format": fmt,
    "base_model": model_path,
    "rank": lora.rank,
    "alpha": lora.alpha,
    "targets": list(lora.targets),
  }
  files.write_atomic(os.path.join(out, "export.json"), json.dumps(record, indent=2))
  return record
