"""Checks a run config before anything is loaded or compiled; every message names the key.

Each section checks itself when it is read into its spec (`specs.RunSpec.read`); what stays here
are the rules that span sections, among them the rows rule: the Q x G rows a user chooses (and each
PPO minibatch of them) split over data x fsdp, so that no device of the score and update phases
repeats another's work. Rows the implementation adds (the reference's CoT' rows in the sampler)
are padded there instead (`sampling`). With `mesh.allow_replication` the rule only warns: the
lenient path for tiny test models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Optional, Sequence

from markovian_jax.data import prompts
from markovian_jax.runtime import cli, presets, sharding
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.training.specs import RunSpec

__all__ = ["InvalidConfig", "validate", "make_mesh", "check_rows"]

log = logging.getLogger(__name__)


def validate(c) -> RunSpec:
  """The typed spec of run config `c` (a ConfigDict); raises InvalidConfig naming the key.

  `prompt.format="auto"` is resolved here, once, to the model family's format and written back
  into `c`, so that everything downstream and the run's recorded config (config.json) name the
  format its prompts use."""
  spec = RunSpec.read(c)
  n = spec.train.rows
  mb = spec.objective.ppo_minibatches
  if n % mb:
    raise InvalidConfig(
      f"config.objective.ppo_minibatches: {mb} does not divide the {n} samples "
      f"per step (train.questions_per_step x train.group_size)"
    )
  if spec.mesh.known:  # otherwise plan.check applies the rule once the devices are counted
    check_rows(spec)
  spec = resolve_prompt_format(c, spec)
  return dataclasses.replace(spec, recorded=c.to_dict())


def resolve_prompt_format(c, spec: RunSpec) -> RunSpec:
  """`spec` with `prompt.format="auto"` replaced by the format of the model's family (config.json's
  model_type, `prompts.FAMILY_FORMATS`), also set in `c`; an explicit format is kept."""
  if spec.prompt.format != prompts.AUTO_FORMAT:
    return spec
  from markovian_jax.models.loading import model_type

  try:
    family = model_type(spec.model.path)
  except OSError as e:  # an unsupported family is a ConfigError of its own, raised as it is
    raise InvalidConfig(
      f"config.model.path: {e} (prompt.format=auto takes the model family's "
      "format: set config.prompt.format to skip this)"
    ) from None
  fmt = prompts.family_format(family)
  log.info("prompt.format=auto: %r, the format of the %s family", fmt, family)
  c.prompt.format = fmt
  return dataclasses.replace(spec, prompt=dataclasses.replace(spec.prompt, format=fmt))


def _mesh_words(spec: RunSpec, shape: Sequence[int]) -> str:
  m = spec.mesh
  if m.preset:
    return f"mesh.preset={m.preset} {tuple(shape)}"
  if tuple(m.shape) != tuple(shape):
    return f"mesh.shape={tuple(m.shape)} -> {tuple(shape)}"
  return f"mesh.shape={tuple(shape)}"


def check_rows(spec: RunSpec, shape: Optional[Sequence[int]] = None) -> None:
  """Raises InvalidConfig (or, with mesh.allow_replication, warns) when the step's Q x G rows, or
  a PPO minibatch of them, do not split over data x fsdp of the mesh `shape` (default: the
  config's, which must then be known)."""
  shape = tuple(spec.mesh.resolved if shape is None else shape)
  split = presets.row_split(shape)
  t = spec.train
  n, q, g = t.rows, t.questions_per_step, t.group_size
  mb = spec.objective.ppo_minibatches
  where = _mesh_words(spec, shape)
  error = None
  if n % split:
    error = (
      f"config.train.questions_per_step: {n} rows (questions_per_step={q} x group_size="
      f"{g}) do not split over data*fsdp={split} ({where}): set "
      f"train.questions_per_step to a multiple of {presets.questions_for(shape, g)}"
    )
  elif (n // mb) % split:
    error = (
      f"config.objective.ppo_minibatches: {mb} minibatches of {n // mb} rows do not "
      f"split over data*fsdp={split} ({where}): set objective.ppo_minibatches to a "
      f"divisor of {n // split}, or train.questions_per_step to a multiple of "
      f"{presets.questions_for(shape, g, mb)}"
    )
  if error and spec.mesh.allow_replication:
    log.warning("%s (mesh.allow_replication=True: those rows are replicated instead)", error)
  elif error:
    raise InvalidConfig(error)


def make_mesh(spec: RunSpec):
  """The device mesh of the run (`mesh.preset` wins over `mesh.shape`)."""
  return sharding.make_mesh(spec.mesh.resolved)


@contextlib.contextmanager
def config_session(config, example: str):
  """`session` for a CLI driven by a run config (`--config=FILE`, e.g. `example`): the config is
  validated first, before the allocator restart and any device work. Yields its RunSpec."""
  if config is None:
    cli.fail(f"--config is required (e.g. --config={example})")
  spec = validate(config)
  with cli.session(spec.host_allocator, spec.compilation_cache_dir):
    yield spec
