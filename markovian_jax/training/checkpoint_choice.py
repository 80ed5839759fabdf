"""Which checkpoint of a run to read, and its adapter as the run trained it: the one place that
evaluate, export and the analyses choose a step and restore its LoRA.

    step, why = choose_step(checkpoint_dir)                  # the latest saved step
    step, why = choose_step(checkpoint_dir, 4000)            # --step=4000
    step, why = choose_step(checkpoint_dir, best=True)       # --best: by validation score
    step, why = choose_step(checkpoint_dir, best=True, latest_if_unscored=True)
    lora = restore_adapter(checkpoint_dir, step, model_config, mesh=ctx.mesh)

The steps are those the checkpoint manager lists: orbax renames a checkpoint into place only when
it is complete, so a save that was cut off is never among them. A listed checkpoint damaged later
(a truncated or missing array file, broken JSON state) is not skipped: reading it raises
`BrokenCheckpoint`, one line naming the step (a resumed run sets it aside instead; read-only
commands change nothing in a run).

Best by selection: the highest validation score among the saved steps, ties to the earliest. The
score is the one stored with each checkpoint (`Checkpointer.save(score=...)`, what
`train.keep_best` ranks); a run without stored scores falls back to its selection-split accuracy in
its TensorBoard events (selection/<method>/accuracy). The test split never chooses.

The adapter's settings (`adapter_settings`): rank, alpha and dropout as the checkpoint's state
records them (its "lora" entry), targets and base model as recorded in the config saved with it.
A checkpoint written before those were recorded lacks them; then, and only then, each missing
setting comes from the run's config.json (beside checkpoints/), else from the config the command
was given. A setting none of them holds is an error naming the step.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Optional

from absl import logging

from markovian_jax.runtime import files
from markovian_jax.runtime.errors import CheckpointError

# The adapter's settings and where each lives in a checkpoint's state
# (training.state.checkpoint_json): the "lora" entry for the shape of the adapter, the saved
# config for the rest.
_LORA_KEYS = ("rank", "alpha", "dropout")
_CONFIG_KEYS = {
  "targets": ("lora", "targets"),
  "model": ("model", "path"),
  "dtype": ("model", "dtype"),
}
_CASTS = {
  "rank": int,
  "alpha": float,
  "dropout": float,
  "targets": tuple,
  "model": str,
  "dtype": str,
}
# Optional: export names its own base model or its own dtype when these are missing.
_OPTIONAL = ("model", "dtype")


class NoSelectionScore(CheckpointError):
  """--best on a run none of whose saved steps has a validation score."""


class Choice(NamedTuple):
  """A chosen checkpoint: its step and how it was chosen (for logs, export.json, protocols)."""

  step: int
  reason: str


def open_checkpoints(checkpoint_dir):
  """A read-only `checkpointing.Checkpointer` over an existing run's checkpoints (local or
  gs://...). Raises CheckpointError when the directory is missing or holds none."""
  from markovian_jax.runtime import checkpointing

  if not checkpoint_dir or not checkpointing.absolute(checkpoint_dir).is_dir():
    raise CheckpointError(f"--checkpoint_dir {checkpoint_dir}: no such directory")
  ckpt = checkpointing.Checkpointer(checkpoint_dir, create=False, keep_best=False)
  if not ckpt.all_steps():
    raise CheckpointError(f"no checkpoints in --checkpoint_dir {checkpoint_dir}")
  return ckpt


def saved_steps(checkpoint_dir) -> list:
  """The saved (complete) steps, ascending."""
  return open_checkpoints(checkpoint_dir).all_steps()


def stored_scores(checkpoint_dir) -> dict:
  """{step: validation score} saved with the checkpoints (Checkpointer.save(score=...))."""
  import orbax.checkpoint as ocp

  from markovian_jax.runtime import checkpointing

  manager = ocp.CheckpointManager(
    checkpointing.absolute(checkpoint_dir),
    item_names=checkpointing.ITEMS,
    options=ocp.CheckpointManagerOptions(
      create=False, best_fn=lambda m: m["score"], best_mode="max"
    ),
  )
  scores = {}
  for step in manager.all_steps():
    metrics = manager.metrics(step)
    if isinstance(metrics, dict) and "score" in metrics:
      scores[int(step)] = float(metrics["score"])
  manager.close()
  return scores


def _event_scores(checkpoint_dir, task: Optional[str]) -> tuple:
  """({step: selection accuracy}, tag) from the run's events (the checkpoint dir's parent)."""
  from markovian_jax.reporting import runs as report_runs
  from markovian_jax.runtime import checkpointing

  workdir = os.fspath(checkpointing.absolute(checkpoint_dir).parent)
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


def _argmax(scores: dict) -> int:
  """The step of the highest score; ties to the earliest step."""
  return max(sorted(scores), key=scores.get)


def best_step(checkpoint_dir) -> Choice:
  """The saved step with the highest validation score (see the module docstring). Raises
  NoSelectionScore when no saved step has one."""
  ckpt = open_checkpoints(checkpoint_dir)
  saved = ckpt.all_steps()
  stored = {s: v for s, v in stored_scores(checkpoint_dir).items() if s in saved}
  if stored:
    step = _argmax(stored)
    return Choice(
      step, f"best by selection: validation score stored with the checkpoint ({stored[step]:.4f})"
    )
  # The task names the events' selection tags; the latest state records it.
  task = (ckpt.restore_state(saved[-1]).get("config") or {}).get("task")
  scores, tag = _event_scores(checkpoint_dir, task)
  scores = {s: v for s, v in scores.items() if s in saved}
  if scores:
    step = _argmax(scores)
    return Choice(
      step, f"best by selection: {tag} = {scores[step]:.4f} (best of saved steps {sorted(scores)})"
    )
  raise NoSelectionScore(
    f"--best: none of the saved steps {saved} in {checkpoint_dir} has a "
    "validation score (none stored with the checkpoint, no selection/ "
    "scalars in the run's events); give --step"
  )


def choose_step(
  checkpoint_dir,
  step: Optional[int] = None,
  best: bool = False,
  *,
  latest_if_unscored: bool = False,
) -> Choice:
  """The checkpoint --step N, --best or (neither) the latest step selects. With
  `latest_if_unscored`, --best on a run without validation scores takes the latest step (with a
  warning) instead of raising NoSelectionScore. Raises CheckpointError (one line, naming the saved
  steps) for a step that was not saved."""
  if step is not None and best:
    raise CheckpointError("give --step or --best, not both")
  saved = saved_steps(checkpoint_dir)
  if best:
    try:
      return best_step(checkpoint_dir)
    except NoSelectionScore as e:
      if not latest_if_unscored:
        raise
      logging.warning("%s: no selection score (%s); using the latest step", checkpoint_dir, e)
      return Choice(saved[-1], "the latest step (no selection score)")
  if step is None:
    return Choice(saved[-1], "the latest step")
  if step not in saved:
    raise CheckpointError(
      f"--step {step}: no checkpoint for that step in {checkpoint_dir}; saved steps: {saved}"
    )
  return Choice(step, "--step")


def recorded_settings(state: Mapping[str, Any]) -> dict:
  """What a checkpoint's state (training.state.checkpoint_json) records of its adapter and base
  model: any of rank, alpha, dropout, targets, model (path), dtype; a key the state lacks is
  absent. The one reader of the state's layout."""
  lora = state.get("lora") or {}
  # The "lora" entry is the adapter as built; the saved config's lora section is what was asked.
  return {**_from_config(state.get("config")), **{k: lora[k] for k in _LORA_KEYS if k in lora}}


def _from_config(config) -> dict:
  """The adapter settings a run config (a nested dict or ConfigDict) holds."""
  if config is None:
    return {}
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out = {}
  for key in _LORA_KEYS:
    if key in (config.get("lora") or {}):
      out[key] = config["lora"][key]
  for key, (section, leaf) in _CONFIG_KEYS.items():
    if leaf in (config.get(section) or {}):
      out[key] = config[section][leaf]
  return out


def adapter_settings(checkpoint_dir, step: int, config=None) -> dict:
  """{rank, alpha, dropout, targets, model, dtype} of checkpoint `step`'s adapter: what the
  checkpoint records, each missing one from the run's config.json, else from `config` (a
  ConfigDict or nested dict; the command's --config). model and dtype may be None; a missing
  rank, alpha, dropout or targets raises CheckpointError."""

  from markovian_jax.runtime import checkpointing

  state = open_checkpoints(checkpoint_dir).restore_state(step)
  settings = recorded_settings(state)
  missing = [k for k in _CASTS if k not in settings]
  if missing:
    run_json = checkpointing.absolute(checkpoint_dir).parent / "config.json"
    run_config = files.read_json(run_json) if run_json.is_file() else None
    for source, values in (
      ("the run's config.json", _from_config(run_config)),
      ("the given config", _from_config(config)),
    ):
      found = {k: values[k] for k in missing if k in values}
      if found:
        logging.info("checkpoint step %d records no %s; taken from %s", step, sorted(found), source)
      settings.update(found)
      missing = [k for k in missing if k not in found]
  absent = [k for k in missing if k not in _OPTIONAL]
  if absent:
    raise CheckpointError(
      f"checkpoint step {step} in {checkpoint_dir} records no LoRA "
      f"{', '.join(absent)}, and neither the run's config.json nor a config "
      "gives one"
    )
  return {k: (None if k in missing else _CASTS[k](settings[k])) for k in _CASTS}


def restore_adapter(
  checkpoint_dir,
  step: int,
  model_config,
  settings: Optional[dict] = None,
  *,
  mesh=None,
  config=None,
):
  """The LoRA of checkpoint `step` as a `LoraAdapter` for `model_config` (a DecoderConfig), with
  the settings the run recorded (`adapter_settings(checkpoint_dir, step, config)` unless given),
  restored straight onto `mesh` (param_shardings) or, without one, the first local device. Raises
  BrokenCheckpoint for a damaged checkpoint and CheckpointError for one that does not fit the
  model."""
  import jax

  from markovian_jax.models import init_lora
  from markovian_jax.runtime import sharding

  s = settings or adapter_settings(checkpoint_dir, step, config)
  template = init_lora(
    model_config,
    jax.random.PRNGKey(0),
    rank=s["rank"],
    alpha=s["alpha"],
    dropout=s["dropout"],
    targets=s["targets"],
  )
  template = template.replace(
    params=jax.device_put(template.params, sharding.placement(template.params, mesh))
  )
  try:
    params = open_checkpoints(checkpoint_dir).restore_lora(step, template.params)
  except CheckpointError:  # a broken checkpoint names its step itself
    raise
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
      f"checkpoint step {step} in {checkpoint_dir} does not fit a rank-"
      f"{s['rank']} LoRA on {list(s['targets'])} of this model: {e}"
    ) from e
  return template.replace(params=params)
