"""`python -m markovian_jax.plan`, the documented command, kept where it has always been.

The code is markovian_jax/cli/plan.py; importing this module gives that module itself (the same
flags and state).
"""

import sys

from markovian_jax.cli import plan as _command

if __name__ == "__main__":
  _command.cli_main()
else:
  sys.modules[__name__] = _command
