"""Files written whole or not at all, and JSON records read with one line when they are broken.

A run's records are rewritten in place: `config.json` on every start and resume, evaluate's
`summary.json` with every model evaluated (it keeps the earlier ones), `export.json`. Written
directly, a kill or a full disk between the truncation and the last byte leaves a torn file, and
the earlier content, which may be all that is left of hours of evaluation, is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from etils import epath

from markovian_jax.runtime.errors import UserError


class BrokenFile(UserError, ValueError):
  """A JSON record (config.json, summary.json, protocol.json, ...) that does not parse."""


def read_json(path) -> Any:
  """The JSON value stored in `path` (local or a URI). A file that does not parse (cut short by
  an older writer or a crash, or edited by hand) raises BrokenFile naming the file and where it
  breaks, which the CLIs print as one line."""
  path = epath.Path(path)
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    where = f", line {e.lineno} column {e.colno}" if hasattr(e, "lineno") else ""
    # json's messages may end in " at" before the position it appends itself
    reason = (getattr(e, "msg", None) or type(e).__name__).removesuffix(" at")
    raise BrokenFile(
      f"{path} is not valid JSON ({reason}{where}): repair it or restore it from a copy"
    ) from e


def write_atomic(path, text: str) -> None:
  """Writes `text` to `path` (local, or a URI through etils epath) by way of a hidden temporary
  file beside it, renamed over `path` once complete: a reader, and the next run, see the old
  content or the new one, never part of either. A failed write removes the temporary and raises.
  """
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  try:
    tmp.write_text(text)
    tmp.replace(path)
  except BaseException:
    with contextlib.suppress(OSError):
      if tmp.exists():
        tmp.unlink()
    raise
