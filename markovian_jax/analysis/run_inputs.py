"""What the paper's analyses (`fragility`, `cross_model`) need from a finished or live run
directory: its config as a RunSpec, a RunContext on it (or on another model), its adapter, and
its logged CoTs (samples.jsonl).

    config = run_config(workdir)                   # config.json onto configs/base.py's defaults
    ctx = load_context(config, model_path=None)    # the run's model, or a reader
    lora = run_adapter(workdir, ctx, step=None)    # its latest (or `step`) checkpoint's LoRA
    lora, step, why = checkpoint_adapter(workdir, ctx)  # the best by selection (or `step`)
    step, why = checkpoint_step(workdir)           # the same choice, nothing restored
    rows = logged_rows(workdir, num=32)            # the last 32 logged questions

The step is chosen and the adapter restored (with the settings the run recorded) by
`training.checkpoint_choice`, as evaluate and export do.
"""

from __future__ import annotations

import os
from typing import Optional

from absl import logging
from etils import epath

from markovian_jax.data import Example
from markovian_jax.runtime import files
from markovian_jax.runtime.errors import UserError


class AnalysisError(UserError):
  """A run directory or a model that an analysis cannot use; the message names it."""


def _merge(config, values: dict, prefix: str = "") -> None:
  """Sets `config`'s keys from a nested dict; keys this version does not know are skipped (a run
  written by an older or newer version still loads)."""
  import ml_collections

  for key, value in values.items():
    if key not in config:
      logging.warning("config.json: %s%s is not a config key of this version; ignored", prefix, key)
      continue
    current = config[key]
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(current, value, f"{prefix}{key}.")
      continue
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      config[key] = value
    except (TypeError, ValueError) as e:
      logging.warning(
        "config.json: %s%s=%r does not fit this version (%s); default kept", prefix, key, value, e
      )


def run_config(workdir: str):
  """The run's ConfigDict: its config.json over configs/base.py's defaults for its task."""
  path = epath.Path(workdir) / "config.json"
  if not path.is_file():
    raise AnalysisError(
      f"--workdir {workdir}: no config.json (written by training at start); "
      "is this a run directory?"
    )
  values = files.read_json(path)
  try:
    from markovian_jax.configs import base
  except ImportError:  # outside the repository: the file alone
    import ml_collections

    return ml_collections.ConfigDict(values)
  config = base.get_config(values.get("task", "gsm8k"))
  _merge(config, values)
  return config


def load_context(
  config, model_path: Optional[str] = None, dtype: Optional[str] = None, *, reuse=None
):
  """A RunContext for the run `config` (its prompts, task, mesh) on its own model, or on
  `model_path` with that model's tokenizer. A tokenizer that cannot be loaded raises
  AnalysisError before any weights load. `reuse`: a context of another run whose model settings
  and mesh are the same (one reader reading two runs); its weights and tokenizer are shared
  instead of loaded again."""
  import dataclasses

  from markovian_jax.models import load_tokenizer
  from markovian_jax.training import config_validation
  from markovian_jax.training.run_context import RunContext

  config = config.copy_and_resolve_references()
  if model_path:
    config.model.path = model_path
  if dtype:
    config.model.dtype = dtype
  spec = config_validation.validate(config)
  if reuse is not None and (reuse.spec.model, reuse.spec.mesh) == (spec.model, spec.mesh):
    return dataclasses.replace(reuse, spec=spec)
  try:
    tokenizer = load_tokenizer(spec.model.path)
  except Exception as e:  # noqa: BLE001 - any failure means this model cannot read the CoTs
    raise AnalysisError(
      f"model {spec.model.path}: cannot load its tokenizer ({type(e).__name__}: {e})"
    ) from e
  return RunContext.create(spec, tokenizer=tokenizer)


def run_adapter(workdir: str, ctx, step: Optional[int] = None):
  """The LoRA of the run's checkpoint `step` (default: the latest), placed on ctx's mesh."""
  lora, _, _ = _adapter(workdir, ctx, step, best=False)
  return lora


def checkpoint_adapter(workdir: str, ctx, step: Optional[int] = None) -> tuple:
  """(LoRA on ctx's mesh, step, how it was chosen): checkpoint `step`, or by default the best
  step by the run's selection (validation) score, the latest when no step has one."""
  return _adapter(workdir, ctx, step, best=step is None)


def checkpoint_step(workdir: str, step: Optional[int] = None) -> tuple:
  """(step, how it was chosen) as `checkpoint_adapter` chooses it, without restoring."""
  from markovian_jax.training import checkpoint_choice

  return tuple(
    checkpoint_choice.choose_step(
      os.path.join(workdir, "checkpoints"), step, best=step is None, latest_if_unscored=True
    )
  )


def _adapter(workdir: str, ctx, step: Optional[int], best: bool) -> tuple:
  """(LoRA restored onto ctx's mesh, step, how it was chosen)."""
  from markovian_jax.training import checkpoint_choice

  ckpt_dir = os.path.join(workdir, "checkpoints")
  chosen, reason = checkpoint_choice.choose_step(ckpt_dir, step, best=best, latest_if_unscored=True)
  lora = checkpoint_choice.restore_adapter(ckpt_dir, chosen, ctx.model, mesh=ctx.mesh)
  logging.info("adapter of step %d from %s (%s)", chosen, ckpt_dir, reason)
  return lora, chosen, reason


def logged_rows(workdir: str, num: Optional[int] = None) -> list:
  """The last `num` (all when None) question records of samples.jsonl, in logged order."""
  from markovian_jax.reporting.runs import read_jsonl

  rows = [r for r in read_jsonl(os.path.join(workdir, "samples.jsonl")) if r.get("cots")]
  if not rows:
    raise AnalysisError(
      f"--workdir {workdir}: no logged CoTs (samples.jsonl is missing or "
      "empty; training writes it every train.text_every steps)"
    )
  return rows[-num:] if num else rows


def example(row: dict) -> Example:
  """The Example a samples.jsonl record is about (question text and gold answer)."""
  return Example(question=row["question"], answer=str(row["answer"]), id=row.get("id"))
