"""Checks a run config before anything is loaded or compiled; every message names the key.

Each section checks itself when it is read into its spec (`specs.RunSpec.read`); what stays here
are the rules that span sections.
"""

from __future__ import annotations

from markovian_jax import sharding
from markovian_jax.errors import InvalidConfig
from markovian_jax.specs import RunSpec

__all__ = ["InvalidConfig", "validate", "make_mesh"]


def validate(c) -> RunSpec:
  """The typed spec of run config `c` (a ConfigDict); raises InvalidConfig naming the key."""
  spec = RunSpec.read(c)
  n = spec.train.rows
  mb = spec.objective.ppo_minibatches
  if n % mb:
    raise InvalidConfig(f"config.objective.ppo_minibatches: {mb} does not divide the {n} samples "
                        f"per step (train.questions_per_step x train.group_size)")
  return spec


def make_mesh(spec: RunSpec):
  """The device mesh of the run (`mesh.preset` wins over `mesh.shape`)."""
  return sharding.make_mesh(spec.mesh.resolved)
