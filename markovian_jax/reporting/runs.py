"""A training run directory, read: TensorBoard scalars, config.json, samples.jsonl and the eval
rows, as `Run`.

    runs = [load_run(p) for p in find_runs(workdir)]
    run.series("answer/normalized_reward")  -> (steps int [T], values float64 [T])
    run.interval("anchor")                   -> (steps, accuracy, low, high) of an eval method

A run directory is what training writes (train.py): TensorBoard events, config.json, samples.jsonl,
eval/step_N.jsonl (and eval/selection/step_N.jsonl), and what the evaluate CLI writes apart from
those (FINAL_EVAL_DIR: step_N.jsonl, base.jsonl, protocol.json at the full test size). Everything
but the events is optional, and a run that is still being written is read as far as it goes (a JSONL
line without its newline yet is skipped). Paths may be local or URIs (gs://...), read through etils
epath as the rest of the workdir is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

from etils import epath
import numpy as np

from markovian_jax.data import extraction
from markovian_jax.runtime import files, summary
from markovian_jax.runtime.errors import UserError

EVENTS_GLOB = "events.out.tfevents.*"
# The evaluate CLI's files in a run directory: never training's eval/step_N.jsonl (another
# protocol: training's periodic n), which it would otherwise overwrite.
FINAL_EVAL_DIR = os.path.join("eval", "final")
# What a run's numbers are read under besides its checkpoint: the evaluate CLI evaluates a run
# under its own recorded values of these (config.json), and the results table keys cells by them.
RUN_PROTOCOL_KEYS = (
  "task",
  "model.path",
  "variant",
  "prompt.markovian",
  "prompt.format",
  "eval.reader",
  "sampling.cot_length",
  "sampling.cot_stops_at_eos",
  "sampling.temperature",
  "eval.temperature",
)


class ReportError(UserError):
  """A directory that holds no run to report on."""


def find_runs(workdir: str) -> list:
  """`workdir` itself when it holds TensorBoard events, else its direct subdirectories that do
  (sorted). Deeper directories are not searched: a run's own eval/ may hold the evaluate CLI's
  events."""
  root = epath.Path(workdir)
  if not root.is_dir():
    raise ReportError(f"--workdir {workdir}: no such directory")
  if any(root.glob(EVENTS_GLOB)):
    return [os.fspath(workdir)]
  runs = sorted(
    os.path.join(os.fspath(workdir), d.name)
    for d in root.iterdir()
    if d.is_dir() and any(d.glob(EVENTS_GLOB))
  )
  if not runs:
    raise ReportError(
      f"--workdir {workdir}: no TensorBoard events ({EVENTS_GLOB}) in it or in "
      "its subdirectories; give a run directory (config.workdir) or their parent"
    )
  return runs


def read_jsonl(path: str) -> list:
  """The records of a JSONL file; a last line still being written (no newline yet) is skipped."""
  file = epath.Path(path)
  if not file.is_file():
    return []
  return [
    json.loads(line)
    for line in file.read_text().splitlines(keepends=True)
    if line.endswith("\n") and line.strip()
  ]


def _step_files(directory: str) -> dict:
  """{N: path} of the step_N.jsonl files in `directory`."""
  folder = epath.Path(directory)
  out = {}
  for path in folder.glob("step_*.jsonl") if folder.is_dir() else []:
    stem = path.name[len("step_") : -len(".jsonl")]
    if stem.isdigit():
      out[int(stem)] = os.path.join(directory, path.name)
  return dict(sorted(out.items()))


def flatten(config: dict, prefix: str = "") -> dict:
  """{"optim.lr": 1e-4, ...} from a nested config dict."""
  out = {}
  for k, v in config.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


@dataclasses.dataclass
class Run:
  """One run directory, read. scalars: tag -> [(step, value)]; config: the flattened
  config.json ({} when absent); samples: samples.jsonl records; eval_files / selection_files:
  step -> path of the eval rows of the reported / selection split (training's periodic
  evaluation); final_files: step -> path, and final_base: the base model's rows (or None), of the
  evaluate CLI's evaluations at the full test size (FINAL_EVAL_DIR), when its protocol.json
  matches the run's config (`final_protocol`)."""

  path: str
  name: str
  scalars: dict
  config: dict
  samples: list
  eval_files: dict
  selection_files: dict
  final_files: dict = dataclasses.field(default_factory=dict)
  final_base: Optional[str] = None
  final_protocol: dict = dataclasses.field(default_factory=dict)

  def series(self, tag: str) -> tuple:
    """(steps int64 [T], values float64 [T]) sorted by step; a step logged twice (a resumed
    run) keeps its last value; empty arrays when the tag is absent."""
    points = dict(self.scalars.get(tag, []))
    if not points:
      return np.zeros(0, np.int64), np.zeros(0)
    steps = np.asarray(sorted(points), np.int64)
    return steps, np.asarray([points[s] for s in steps], np.float64)

  def has(self, tag: str) -> bool:
    return bool(self.scalars.get(tag))

  @property
  def task(self) -> Optional[str]:
    return self.config.get("task")

  @property
  def model(self) -> str:
    """The base model the run trained (config model.path; "?" when not recorded)."""
    return str(self.config.get("model.path") or "?")

  @property
  def full_test_size(self) -> Optional[int]:
    """The task's full test size the run was configured with (eval.final_num_examples; None when
    not recorded or 0, the whole split)."""
    n = self.config.get("eval.final_num_examples")
    return int(n) if isinstance(n, int) and n > 0 else None

  @property
  def train_steps(self) -> np.ndarray:
    """The training steps logged (steps of the per-step tags)."""
    for tag in ("train/loss", "answer/logprob", "answer/normalized_reward"):
      if self.has(tag):
        return self.series(tag)[0]
    return np.zeros(0, np.int64)

  @property
  def last_step(self) -> int:
    steps = self.train_steps
    return int(steps[-1]) if steps.size else 0

  def methods(self, prefix: str = "eval") -> list:
    """The extraction methods with an accuracy under `prefix`/, primary first when the task is
    known (else alphabetical); ['answer_logprob'] for wiki continuation."""
    found = sorted(
      t[len(prefix) + 1 : -len("/accuracy")]
      for t in self.scalars
      if t.startswith(prefix + "/") and t.endswith("/accuracy")
    )
    if not found and self.has(f"{prefix}/answer_logprob"):
      return ["answer_logprob"]
    try:
      order = list(extraction.methods(self.task)) if self.task else []
    except ValueError:
      order = []
    return [m for m in order if m in found] + [m for m in found if m not in order]

  def metric_tag(self, method: str, prefix: str = "eval") -> str:
    return f"{prefix}/{method}" if method == "answer_logprob" else f"{prefix}/{method}/accuracy"

  def interval(self, method: str, prefix: str = "eval") -> tuple:
    """(steps, value, low, high) of a method's metric; the bounds are the logged 95% interval
    (value -+ ci95 for runs logged before ci95_low existed, NaN without either)."""
    steps, v = self.series(self.metric_tag(method, prefix))
    if method == "answer_logprob":
      _, half = self.series(f"{prefix}/answer_logprob_ci95")
      half = half if half.size == v.size else np.full(v.shape, np.nan)
      return steps, v, v - half, v + half
    _, low = self.series(f"{prefix}/{method}/ci95_low")
    _, high = self.series(f"{prefix}/{method}/ci95_high")
    if low.size != v.size or high.size != v.size:
      _, half = self.series(f"{prefix}/{method}/ci95")
      half = half if half.size == v.size else np.full(v.shape, np.nan)
      low, high = v - half, v + half
    return steps, v, low, high

  def eval_size(self, selection: bool = False) -> Optional[int]:
    """Questions per evaluation: the distinct ids of the first eval file, else (reported split
    only) config eval.num_examples when evaluations were logged."""
    for path in (self.selection_files if selection else self.eval_files).values():
      rows = read_jsonl(path)
      if rows:
        return len({r.get("id") for r in rows})
    n = self.config.get("eval.num_examples")
    return int(n) if not selection and isinstance(n, int) and self.methods() else None


def load_run(path: str, name: Optional[str] = None) -> Run:
  """Reads a run directory (see the module docstring)."""
  scalars = summary.read_scalars(path)
  if not scalars:
    raise ReportError(f"{path}: its TensorBoard events hold no scalars yet")
  config = {}
  cfg_path = epath.Path(path) / "config.json"
  if cfg_path.is_file():
    config = flatten(files.read_json(cfg_path))
  final_dir = os.path.join(path, FINAL_EVAL_DIR)
  protocol = read_protocol(final_dir)
  own = bool(protocol) and not protocol_differences(protocol, config)
  base = os.path.join(final_dir, "base.jsonl")
  return Run(
    path=path,
    name=name or os.path.basename(os.path.normpath(path)),
    scalars=scalars,
    config=config,
    samples=read_jsonl(os.path.join(path, "samples.jsonl")),
    eval_files=_step_files(os.path.join(path, "eval")),
    selection_files=_step_files(os.path.join(path, "eval", "selection")),
    final_files=_step_files(final_dir) if own else {},
    final_base=base if own and epath.Path(base).is_file() else None,
    final_protocol=protocol,
  )


def read_protocol(directory: str) -> dict:
  """The protocol.json the evaluate CLI wrote in `directory` ({} when there is none)."""
  path = epath.Path(directory) / "protocol.json"
  return files.read_json(path) if path.is_file() else {}


def foreign_protocol(run_dir: str, config: dict, elsewhere: bool) -> Optional[str]:
  """Why the evaluate CLI must not evaluate run `run_dir` under flat `config`: the run's
  config.json differs from it in a protocol key, and the numbers would go into the run (not
  `elsewhere`, an explicit --output_dir: then only a warning). None when nothing is wrong."""
  recorded = epath.Path(run_dir) / "config.json"
  differ = (
    protocol_differences(flatten(files.read_json(recorded)), config) if recorded.is_file() else []
  )
  if not differ:
    return None
  what = ", ".join(f"{k}={theirs!r} (--config: {ours!r})" for k, theirs, ours in differ)
  if elsewhere:
    logging.warning(
      "evaluating the run in %s under another protocol than its own: %s", run_dir, what
    )
    return None
  return (
    f"the run in {run_dir} was trained with {what}: give --config the run's values "
    "(--config=FILE:VARIANT, --config.KEY=VALUE) so that its cell is read under its own "
    "protocol, or --output_dir to evaluate it under another one elsewhere"
  )


def foreign_directory(out_dir: str, protocol: dict) -> Optional[str]:
  """Why the evaluate CLI must not write evaluations of `protocol` into `out_dir`: it holds
  another protocol's (its protocol.json differs in a key both record). None when it may."""
  earlier = read_protocol(out_dir)
  changed = [k for k in protocol if k in earlier and earlier[k] != protocol[k]]
  if not changed:
    return None
  what = ", ".join(f"{k} {earlier[k]!r} there, {protocol[k]!r} here" for k in changed)
  return (
    f"{out_dir} holds evaluations of another protocol ({what}); give another --output_dir "
    "(or remove that directory) rather than mixing the two"
  )


def protocol_differences(a: dict, b: dict) -> list:
  """[(key, a's value, b's value)] of the RUN_PROTOCOL_KEYS both flat dicts record and that
  differ. An unresolved prompt.format (not one of the formats, e.g. a family default still to be
  resolved) is not compared."""
  from markovian_jax.data.prompts import PROMPT_FORMATS

  out = []
  for key in RUN_PROTOCOL_KEYS:
    if key not in a or key not in b:
      continue
    if key == "prompt.format" and not {a[key], b[key]} <= set(PROMPT_FORMATS):
      continue
    if a[key] != b[key]:
      out.append((key, a[key], b[key]))
  return out
