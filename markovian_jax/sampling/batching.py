"""Host-side padding of token sequences into static, bucketed shapes (few distinct jit shapes)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket(n: int, multiple: int) -> int:
  """Smallest multiple of `multiple` that is >= n (and >= multiple)."""
  return max(multiple, -(-n // multiple) * multiple)


def pad_left(seqs: Sequence[Sequence[int]], length: int, pad_id: int = 0):
  """Left-pads token lists to `length`.

  Returns (tokens int32 [B, length], mask bool [B, length]). Raises if a sequence is longer.
  """
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence {i} has {len(s)} tokens, more than the padded length {length}")
    if len(s):
      tokens[i, length - len(s) :] = s
      mask[i, length - len(s) :] = True
  return tokens, mask
