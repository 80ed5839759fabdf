"""The one base class of errors that are the user's input, not a bug.

The CLIs (`markovian_jax.runtime.cli`) print such an error as one `error:` line and exit with
status EXIT_BAD_INPUT (2);
anything else keeps its traceback. Config, data and checkpoint errors all derive from it.
`is_disk_full` tells a full disk or quota apart, which is not a bug either (one line as well).
"""

import errno

EXIT_BAD_INPUT = 2


class UserError(Exception):
  """Bad input: a config value, a data file, a checkpoint, a flag. The message names the knob."""


class InvalidConfig(UserError, ValueError):
  """A run config that cannot work; the message starts with the offending `config.` key."""


class CheckpointError(UserError, ValueError):
  """A model, adapter or training checkpoint that is missing or does not fit the run."""


def is_disk_full(e: BaseException) -> bool:
  """Whether `e` (or what caused it) is a full disk or quota: orbax and TensorStore report one as
  OSError(ENOSPC) or in their own message."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False
