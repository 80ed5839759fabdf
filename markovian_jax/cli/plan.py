"""The memory and layout plan of a run, before anything is loaded or compiled.

  python -m markovian_jax.plan --config=configs/presets/v5e-8.py [--config.key=value ...]

Prints the per-device plan (`markovian_jax.planning`); exit 0 when it fits, 2 when it does not.
"""

from __future__ import annotations

from markovian_jax.planning.plan import describe, make_plan, refusal
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.training import config_validation


def _main_flags():
  from absl import flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file("config", None, "Run config file (configs/...).")
  memory = flags.DEFINE_float(
    "device_memory_gib",
    0.0,
    "Usable GiB per device (0: config.mesh.device_memory_gib, the device, or the preset's chip).",
    lower_bound=0.0,
  )
  devices = flags.DEFINE_integer(
    "devices", 0, "Devices a -1 in mesh.shape fills (0: this host's).", lower_bound=0
  )
  prompt = flags.DEFINE_integer(
    "prompt_length",
    0,
    "Longest CoT prompt in tokens (0: the task's assumed longest, plan.LONGEST_PROMPT).",
    lower_bound=0,
  )

  def main():
    from markovian_jax.runtime import cli

    if config.value is None:
      cli.fail("--config is required (e.g. --config=configs/presets/8xh100.py)")
    spec = config_validation.validate(config.value)
    p = make_plan(spec, devices.value or None, memory.value or None, prompt.value or None)
    print(describe(p), flush=True)
    if p.fits is None:
      raise InvalidConfig(
        f"config.mesh.device_memory_gib: no device memory to plan against ({p.memory_source})"
      )
    if not p.fits:
      raise InvalidConfig(refusal(p))

  return main


def cli_main():
  """The `markovian-plan` console script; the same as `python -m markovian_jax.plan`."""
  from markovian_jax.runtime import cli

  cli.run(_main_flags())


if __name__ == "__main__":
  cli_main()
