"""Progress of long loops, one way for every command: training, evaluation, the analyses.

    with progress.advancing(progress_arg, total, "score") as bar:   # a caller's bar, or a new one
      ...; bar.update(rows_done)

A tqdm bar on stderr, refreshed in place: done/total, elapsed<time left and the rate (e.g.
`fragility char: 42%|####   | 2184/5200 [03:10<04:22, 11.5row/s]`). Only process 0 draws it
(every process runs the same loop).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Union

from tqdm import tqdm

Progress = Union[bool, tqdm]


def bar(
  total: int,
  desc: str,
  *,
  unit: str = "row",
  initial: int = 0,
  leave: bool = True,
  enabled: bool = True,
) -> tqdm:
  """A progress bar of `total` `unit`s (disabled off process 0 or when not `enabled`)."""
  import jax

  return tqdm(
    total=total,
    desc=desc,
    unit=unit,
    initial=initial,
    leave=leave,
    disable=not enabled or jax.process_index() != 0,
  )


@contextlib.contextmanager
def advancing(progress: Progress, total: int, desc: str, **kw) -> Iterator[tqdm]:
  """The bar a loop of `total` units advances: `progress` itself when it is a bar (a caller's
  loop that spans several calls; the caller closes it), else a new bar, silent when `progress`
  is False, closed at the end."""
  if isinstance(progress, tqdm):
    yield progress
    return
  b = bar(total, desc, enabled=bool(progress), **kw)
  try:
    yield b
  finally:
    b.close()
