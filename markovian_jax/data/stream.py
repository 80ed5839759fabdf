"""`ExampleStream`: an endless, seeded, resumable iterator over a list of examples.

Epoch e visits the examples in an order fixed by (seed, e) alone, so the cursor `(epoch, index)`
is the whole state: `state()` is a small JSON-able dict for the checkpoint, and `restore(state)`
continues with exactly the examples an uninterrupted run would have seen. The order comes from
hashing (seed, epoch, i), not from a NumPy generator, so it survives library upgrades.

Multi-host training keeps one global cursor: every process builds the same stream (the default
process_index=0, process_count=1) and takes the same examples each step, since a step's Q
questions (often 1) cannot be split between hosts; `run_context.put` then hands each process's
devices their rows of the global batch, and the checkpoint's cursor is the same on every process
(checkpointing verifies it). With process_index/process_count, process p of k instead takes every
k-th example of each epoch's order (positions p, p+k, ...), truncated to the same length on every
process so all processes step in lockstep; the shards of one epoch are disjoint and together cover
all but `len(examples) % k` examples.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from markovian_jax.data.records import DataError, Example


def _fingerprint(examples: Sequence[Example]) -> str:
  h = hashlib.blake2b(digest_size=8)
  for e in examples:
    h.update(e.question.encode())
    h.update(b"\x00")
    h.update(e.answer.encode())
    h.update(b"\x01")
  return h.hexdigest()


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
  """The permutation of range(num_examples) visited in `epoch`."""

  def key(i):
    return hashlib.blake2b(f"{seed}/{epoch}/{i}".encode(), digest_size=8).digest()

  return sorted(range(num_examples), key=key)


class ExampleStream:
  """Iterates over `examples` forever, reshuffled each epoch with `seed`.

  Args:
    examples: the task's examples (every process passes the same list).
    seed: the data-order seed.
    process_index, process_count: this process's shard (jax.process_index(), jax.process_count()).
    shuffle: False visits the examples in list order every epoch (still sharded).
  """

  def __init__(
    self,
    examples: Sequence[Example],
    seed: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
  ):
    if not examples:
      raise DataError("ExampleStream needs at least one example")
    if not 0 <= process_index < process_count:
      raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    if len(examples) < process_count:
      raise DataError(f"{len(examples)} examples cannot be split over {process_count} processes")
    self._examples = list(examples)
    self._seed = int(seed)
    self._process_index = process_index
    self._process_count = process_count
    self._shuffle = shuffle
    self._per_process = len(self._examples) // process_count
    self._fingerprint = _fingerprint(self._examples)
    self._epoch = 0
    self._index = 0
    self._order = None

  def __len__(self) -> int:
    """Examples this process sees per epoch."""
    return self._per_process

  @property
  def epoch(self) -> int:
    return self._epoch

  def _shard(self) -> list[int]:
    if self._order is None:
      n = len(self._examples)
      order = epoch_order(n, self._seed, self._epoch) if self._shuffle else list(range(n))
      k = self._process_count
      self._order = order[self._process_index : self._per_process * k : k]
    return self._order

  def __iter__(self):
    return self

  def __next__(self) -> Example:
    if self._index >= self._per_process:
      self._epoch += 1
      self._index = 0
      self._order = None
    example = self._examples[self._shard()[self._index]]
    self._index += 1
    return example

  def take(self, n: int) -> list[Example]:
    """The next `n` examples (crossing epoch boundaries as needed)."""
    return [next(self) for _ in range(n)]

  def state(self) -> dict:
    """The cursor, JSON-able: save it with the checkpoint (the same on every process)."""
    return {
      "epoch": self._epoch,
      "index": self._index,
      "seed": self._seed,
      "shuffle": self._shuffle,
      "num_examples": len(self._examples),
      "process_count": self._process_count,
      "fingerprint": self._fingerprint,
    }

  def restore(self, state: dict) -> None:
    """Continues from `state()`; refuses a state saved for different data or settings, since the
    order would silently differ."""
    try:
      saved = {
        k: state[k]
        for k in ("epoch", "index", "seed", "num_examples", "process_count", "fingerprint")
      }
    except (KeyError, TypeError) as e:
      raise DataError(f"not an ExampleStream state (missing {e}): {state!r:.200}") from None
    mine = self.state()
    for key in ("seed", "num_examples", "process_count", "fingerprint"):
      if saved[key] != mine[key]:
        raise DataError(
          f"data stream state was saved with {key}={saved[key]!r}, but this stream "
          f"has {key}={mine[key]!r}; the data order would not match the saved run"
        )
    if state.get("shuffle", True) != self._shuffle:
      raise DataError(
        f"data stream state was saved with shuffle={state.get('shuffle')}, this "
        f"stream has shuffle={self._shuffle}"
      )
    epoch, index = int(saved["epoch"]), int(saved["index"])
    if epoch < 0 or not 0 <= index <= self._per_process:
      raise DataError(
        f"data stream state has an invalid cursor epoch={epoch}, index={index} "
        f"(epoch length {self._per_process})"
      )
    self._epoch, self._index, self._order = epoch, index, None
