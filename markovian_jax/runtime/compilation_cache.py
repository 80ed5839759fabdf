"""JAX's persistent compilation cache, switched on by the entry points.

A resumed or restarted run, or a second run of the same config, loads its compiled programs from
disk instead of compiling them again: the sampler, scoring and update programs of an 8B model take
minutes to compile on a TPU pod, and a preempted job pays that on every restart. Programs are keyed
by their HLO, compile options and backend, so a changed config or library version simply misses.
"""

from __future__ import annotations

import collections
import os
from typing import Optional

import jax

from markovian_jax.runtime.errors import InvalidConfig

DEFAULT_DIR = "~/.cache/markovian_jax/xla"  # config.compilation_cache_dir, sample's flag
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_MIN_SECS_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
MIN_COMPILE_SECS = 0.1  # programs that compile faster are not stored
_counts: collections.Counter = collections.Counter()
_listening = False


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  if event in (_HIT, _MISS):
    _counts[event] += 1


def enable(path: str, setting: str = "config.compilation_cache_dir") -> Optional[str]:
  """Stores compiled programs under `path` (`~` expanded; "" leaves the cache off).

  Call before the first compilation: JAX reads the setting once per process. Only programs that
  took at least MIN_COMPILE_SECS to compile are stored (the environment variable
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, when set, wins).
  `setting` names where `path` came from (`config.compilation_cache_dir` in train and evaluate,
  `--compilation_cache_dir` in sample), for the error message.

  Returns the absolute directory, or None when off. Raises InvalidConfig when the directory
  cannot be created or written.
  """
  global _listening
  if not path:
    return None
  directory = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(directory, exist_ok=True)
    writable = os.access(directory, os.W_OK)
  except OSError as e:
    raise InvalidConfig(
      f"{setting}={path!r}: cannot create {directory} "
      f"({e}); set it to a writable directory, or to '' to turn the cache "
      "off"
    ) from e
  if not writable:
    raise InvalidConfig(
      f"{setting}={path!r}: {directory} is not writable; "
      "set it to a writable directory, or to '' to turn the cache off"
    )
  jax.config.update("jax_compilation_cache_dir", directory)
  if _MIN_SECS_ENV not in os.environ:
    # JAX's default (1 s) skips the small-model programs (the demo's scoring and sampling ones
    # compile in 0.2-0.9 s), which then recompile on every start; a run has only a handful.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  if not _listening:
    jax.monitoring.register_event_listener(_on_event)
    _listening = True
  return directory


def stats() -> dict:
  """{"loaded": programs read from the cache, "compiled": cacheable programs compiled} so far in
  this process."""
  return {"loaded": _counts[_HIT], "compiled": _counts[_MISS]}
