"""aqua: reference defaults (docs/method.md#tasks)."""

from markovian_jax.configs import base


def get_config(arg: str = ""):
  """`arg`: a variant name (base.VARIANTS), e.g. `--config=configs/aqua.py:ei`."""
  return base.task_config("aqua", arg)
