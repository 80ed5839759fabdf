"""The process's malloc, chosen by the entry points before JAX starts.

XLA:CPU allocates the temporaries of a compiled program when a call starts and frees them when it
ends. The SmolLM2 train step's update needs 2.3 GB of them. glibc serves a block that large from a
fresh `mmap` (in a worker thread's arena it has no other choice) and unmaps it on free, so every
call page-faults all of it in again: 717k minor faults and about 2 s of kernel time per update on a
2-core machine. tcmalloc keeps freed spans mapped and hands them back on the next call. Measured
(benchmarks/README.md): update 5.1-5.4 s -> 3.7-3.9 s in the training step, sampling unchanged.

Which malloc a process uses is fixed when it starts, so `ensure("tcmalloc")` re-executes the
current command line once with tcmalloc in `LD_PRELOAD` (like torch's CPU launcher does). Call it
first thing in `main`, before any device is touched: nothing computed before it survives.

On GPU and TPU hosts the programs' temporaries live in device memory, so neither the restart nor
its warning applies there: `accelerator_host()` tells, without starting JAX.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from typing import Optional

from absl import logging

from markovian_jax.runtime.errors import InvalidConfig

SETTINGS = ("tcmalloc", "system")  # config.host_allocator

_KEY = "config.host_allocator"
_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # gperftools' sonames, smallest first
_REEXECUTED = "MARKOVIAN_ALLOCATOR_REEXEC"  # set in the child: never re-execute twice
INSTALL_HINT = "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu), or conda install gperftools"


# Device nodes of the accelerators JAX drives: NVIDIA GPUs, TPU v4 (accel), TPU v5e/v5p/v6e (vfio),
# AMD GPUs (kfd).
_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")


def accelerator_host(environ=os.environ, device_nodes=_DEVICE_NODES) -> Optional[str]:
  """Why this host runs JAX on an accelerator ("JAX_PLATFORMS=cuda", "/dev/nvidia0"), or None
  for a CPU host. JAX_PLATFORMS decides when set (its first platform); else the device nodes."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    first = platforms.split(",")[0].strip().lower()
    return None if first == "cpu" else f"JAX_PLATFORMS={platforms}"
  for pattern in device_nodes:
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  return None


def find_tcmalloc() -> Optional[str]:
  """The soname of an installed tcmalloc (searched like the dynamic linker does), or None."""
  for name in _LIBRARIES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def mapped_tcmalloc(maps: Optional[str] = None) -> Optional[str]:
  """Path of the tcmalloc library mapped into this process (`maps`: the text of
  /proc/self/maps, read when None), or None."""
  if maps is None:
    try:
      with open("/proc/self/maps") as f:
        maps = f.read()
    except OSError:  # not Linux: no LD_PRELOAD either
      return None
  for line in maps.splitlines():
    fields = line.split()
    if len(fields) >= 6 and "/libtcmalloc" in fields[-1]:
      return fields[-1]
  return None


def preload_value(library: str, existing: str = "") -> str:
  """`LD_PRELOAD` with `library` first (an allocator must come before what it serves)."""
  rest = [p for p in existing.replace(":", " ").split() if p]
  return " ".join([library] + rest)


def ensure(setting: str) -> str:
  """Makes this process run on the allocator `setting` names; logs and returns what it runs on.

  "system" keeps the C library's malloc. "tcmalloc" returns at once when tcmalloc is already
  mapped; otherwise, if it is installed, replaces this process with the same command line and
  tcmalloc preloaded (and does not return); if it is not installed, or a re-executed process
  still lacks it, says so and continues on the system malloc.

  Raises InvalidConfig on an unknown setting.
  """
  line, ok = _decide(setting)
  (logging.info if ok else logging.warning)("host allocator: %s", line)
  return line


def _decide(setting: str) -> tuple[str, bool]:
  if setting not in SETTINGS:
    raise InvalidConfig(f"{_KEY}: {setting!r} is not one of {list(SETTINGS)}")
  if setting == "system":
    return "system malloc (as configured)", True
  accelerator = accelerator_host()
  if accelerator:
    return (
      f"system malloc: an accelerator host ({accelerator}), where XLA's temporaries live "
      "in device memory; tcmalloc only helps CPU hosts"
    ), True
  mapped = mapped_tcmalloc()
  if mapped:
    return f"tcmalloc ({mapped})", True
  if os.environ.get(_REEXECUTED):
    return (
      f"system malloc: tcmalloc was preloaded ({os.environ.get('LD_PRELOAD', '')!r}) but "
      "is not mapped; on CPU every call then page-faults its temporaries in again"
    ), False
  library = find_tcmalloc()
  if library is None:
    return (
      "system malloc: tcmalloc is not installed, so on CPU every call page-faults its "
      f"temporaries in again (about 2 s per SmolLM2 update); install it with "
      f"{INSTALL_HINT}, or set {_KEY}=system to silence this"
    ), False
  env = dict(os.environ, LD_PRELOAD=preload_value(library, os.environ.get("LD_PRELOAD", "")))
  env[_REEXECUTED] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  raise AssertionError("unreachable: execve returned")  # pragma: no cover
