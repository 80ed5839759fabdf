"""`python -m markovian_jax.train`, the documented command, kept where it has always been.

The code is markovian_jax/cli/train.py; importing this module gives that module itself (the same
flags and state).
"""

import sys

from markovian_jax.cli import train as _command

if __name__ == "__main__":
  from absl import flags

  # --help prints __main__'s docstring and key flags: the command's.
  __doc__ = _command.__doc__
  flags.adopt_module_key_flags(_command)
  _command.cli_main()
else:
  sys.modules[__name__] = _command
