"""Markovian training entry point.

  python -m markovian_jax.train --config=configs/svamp.py [--config.key=value ...]

The run itself (start-up order, the step's stages, the hooks): `markovian_jax.trainer.Trainer`;
its default hooks (scalars, samples, guards, evaluation, checkpoints) are wired here, by
`add_default_hooks`, where a run with other hooks would add them.
"""

from __future__ import annotations

from ml_collections import config_flags

from markovian_jax.runtime import cli
from markovian_jax.trainer import Trainer, TrainingStopped, add_default_hooks
from markovian_jax.training import config_validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/<task>.py).")


def main():
  with config_validation.config_session(_CONFIG.value, "configs/demo.py") as spec:
    cli.writing_to(spec.workdir, "--config.workdir")
    try:
      trainer = Trainer(spec, default_hooks=False)
      add_default_hooks(trainer)
      trainer.run()
    except TrainingStopped as e:
      raise cli.Stopped(str(e)) from e


def cli_main():
  """The `markovian-train` console script; the same as `python -m markovian_jax.train`."""
  cli.run(main)


if __name__ == "__main__":
  cli_main()
