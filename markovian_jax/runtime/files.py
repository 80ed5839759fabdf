"""Files written whole or not at all.

A run's records are rewritten in place: `config.json` on every start and resume, evaluate's
`summary.json` with every model evaluated (it keeps the earlier ones), `export.json`. Written
directly, a kill or a full disk between the truncation and the last byte leaves a torn file, and
the earlier content, which may be all that is left of hours of evaluation, is gone.
"""

from __future__ import annotations

import contextlib
import os

from etils import epath


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
