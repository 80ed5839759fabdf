"""Multi-process start-up, and the stop that every process of a job agrees on.

    distributed.initialize()          join the job the environment describes, or stay alone
    with distributed.StopOnSignal() as stop:
      while ... and not stop.requested(step): ...   # every process, every step

Who joins what is JAX's own cluster detection (`jax.distributed.initialize()` without arguments):
Cloud TPU VMs (the metadata server), GKE TPU slices, SLURM (`srun`), Open MPI (`mpirun`) and
Kubernetes. Explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (a plain
multi-node launch, launch/gpu_multinode.sh) fill in or replace what detection finds. One process
(a laptop, one GPU host, a one-task SLURM job, a single-host TPU VM) joins nothing.

A job that does not form within MARKOVIAN_DISTRIBUTED_TIMEOUT seconds (default 300) ends each
waiting process with status 2 and one `error:` line naming it, the coordinator and what to check;
JAX alone aborts with a C++ stack trace that names neither.

A process of a formed job that dies (kill -9, preemption, a lost host) ends every other process
within MARKOVIAN_PEER_TIMEOUT seconds (default 60) with status 3 and one `error:` line saying how
to resume (`PeerWatch`). JAX's own detection (missed heartbeats) aborts the survivors with SIGABRT
and no message, and its Python callback hook cannot be used (jaxlib 0.10 throws std::bad_cast
converting the status): our watch runs first, and JAX's heartbeat timeout is set above it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

import jax
from jax.experimental import multihost_utils

from markovian_jax.runtime.errors import EXIT_BAD_INPUT, UserError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "MARKOVIAN_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
PEER_TIMEOUT_ENV = "MARKOVIAN_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT_S = 60
_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# JAX aborts the process this long after our own deadline, so our message comes first.
_JAX_GRACE_S = 30


class DistributedError(UserError):
  """A multi-process launch that is misconfigured or did not form."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins a job (None fields: JAX's cluster detection fills them in).

  source: what described the job ("JAX_* variables", or a jax cluster class such as
  "SlurmCluster"). num_processes / process_id: ints when known before joining.
  """

  source: str
  coordinator_address: Optional[str]
  num_processes: Optional[int]
  process_id: Optional[int]

  def kwargs(self) -> dict:
    return {
      k: v
      for k, v in dict(
        coordinator_address=self.coordinator_address,
        num_processes=self.num_processes,
        process_id=self.process_id,
      ).items()
      if v is not None
    }


def _seconds(name: str, default: int) -> int:
  raw = os.environ.get(name, "")
  if not raw:
    return default
  try:
    value = int(raw)
  except ValueError:
    value = 0
  if value < 1:
    raise DistributedError(f"{name}={raw!r}: not a positive number of seconds")
  return value


def timeout_s() -> int:
  """Seconds to wait for every process to join (MARKOVIAN_DISTRIBUTED_TIMEOUT)."""
  return _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def peer_timeout_s() -> int:
  """Seconds without a sign of life from another process before this one stops
  (MARKOVIAN_PEER_TIMEOUT)."""
  return _seconds(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT_S)


def _env_int(name: str, minimum: int) -> Optional[int]:
  raw = os.environ.get(name, "")
  if not raw:
    return None
  try:
    value = int(raw)
  except ValueError:
    value = minimum - 1
  if value < minimum:
    raise DistributedError(f"{name}={raw!r}: not an integer >= {minimum}")
  return value


def detected_cluster():
  """The cluster environment class JAX's auto-detection would use here, or None.

  The same walk as `jax.distributed.initialize()` makes (jax._src.clusters is where JAX keeps
  it: there is no public "would you join?" call), so the two cannot disagree.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top

  for env in clusters.ClusterEnv._cluster_types:  # noqa: SLF001
    if not env.opt_in_only_method and env.is_env_present():
      return env
  return None


def plan() -> Optional[Plan]:
  """How this process joins a multi-process job, or None when it runs alone.

  Raises DistributedError for explicit variables that are malformed, half set without a cluster
  to fill in the rest, or inconsistent.
  """
  address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  count = _env_int("JAX_NUM_PROCESSES", 1)
  index = _env_int("JAX_PROCESS_ID", 0)
  if count is not None and index is not None and index >= count:
    raise DistributedError(f"JAX_PROCESS_ID={index} is not below JAX_NUM_PROCESSES={count}")
  if address and count is not None and index is not None:
    return None if count == 1 else Plan("JAX_* variables", address, count, index)
  cluster = detected_cluster()
  if cluster is None:
    given = [k for k in _EXPLICIT if os.environ.get(k)]
    if given:
      missing = [k for k in _EXPLICIT if k not in given]
      raise DistributedError(
        f"{', '.join(given)} set but {', '.join(missing)} not, and no "
        "cluster environment (SLURM, Open MPI, Cloud TPU) to fill them in: "
        f"set all of {', '.join(_EXPLICIT)}, or none"
      )
    return None
  count = cluster.get_process_count() if count is None else count
  index = cluster.get_process_id() if index is None else index
  if count == 1:
    return None
  return Plan(cluster.__name__, address, count, index)


def _not_formed(p: Plan, seconds: int) -> str:
  """The line a process prints when the job did not form in time."""
  where = f"process {p.process_id} of {p.num_processes} on {socket.gethostname()}"
  coordinator = p.coordinator_address or f"the coordinator {p.source} names"
  if p.process_id == 0:
    others = (
      "process 1" if p.num_processes == 2 else f"at least one of processes 1..{p.num_processes - 1}"
    )
    who = (
      f"{others} did not join: it never started, crashed before joining, or cannot reach "
      f"{coordinator}"
    )
  else:
    who = (
      f"this process could not complete the join at {coordinator}: process 0 (which runs "
      "the coordinator) or another process never started, crashed, or is unreachable"
    )
  return (
    f"jax.distributed: the {p.num_processes}-process job did not form within {seconds}s "
    f"({where}, from {p.source}); {who}. Start the same command on every host (each logs "
    "'jax.distributed: joining as process i of n'), check that the coordinator's host and "
    f"port are reachable from all hosts, or raise {TIMEOUT_ENV}"
  )


def initialize(timeout: Optional[int] = None) -> None:
  """Joins the multi-process job the environment describes (once), or logs why not.

  `timeout`: seconds (default: MARKOVIAN_DISTRIBUTED_TIMEOUT, else 300). A job that does not form
  in time ends this process with exit status 2 and one `error:` line (see `_not_formed`).
  """
  if jax.distributed.is_initialized():
    log.info(
      "jax.distributed: already initialised (process %d of %d)",
      jax.process_index(),
      jax.process_count(),
    )
    return
  p = plan()
  if p is None:
    log.info("jax.distributed: single process (no multi-process job in the environment)")
    return
  seconds = timeout_s() if timeout is None else timeout
  peer_seconds = peer_timeout_s()
  log.info(
    "jax.distributed: joining as process %s of %s (from %s), coordinator %s, timeout %ds",
    p.process_id,
    p.num_processes,
    p.source,
    p.coordinator_address or "from the cluster",
    seconds,
  )
  watchdog = threading.Timer(seconds, _give_up, args=(_not_formed(p, seconds),))
  watchdog.daemon = True
  watchdog.start()
  try:
    # JAX's heartbeat abort (no message) must come after PeerWatch's line.
    jax.distributed.initialize(
      initialization_timeout=seconds + _JAX_GRACE_S,
      heartbeat_timeout_seconds=peer_seconds + _JAX_GRACE_S,
      **p.kwargs(),
    )
  finally:
    watchdog.cancel()
  log.info(
    "jax.distributed ready: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  PeerWatch(peer_seconds).start()


def _give_up(message: str) -> None:
  """Ends the process from the watchdog thread: the main thread is blocked inside JAX's C++
  join, where no exception can reach it."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(EXIT_BAD_INPUT)


EXIT_PEER_LOST = 3
# How a collective or the coordination service reports a process of the job that is gone.
_PEER_LOST = (
  "Gloo",
  "Connection reset by peer",
  "Connection closed by peer",
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "heartbeat",
  "Socket closed",
  "Broken pipe",
)


def exit_if_peer_lost(error: BaseException) -> None:
  """Ends this process at once (status 3, one `error:` line) when `error` says that another
  process of a multi-process job is gone (killed, preempted, its host lost): a traceback and the
  normal exit, whose shutdown barrier waits for the dead process, would hang instead. The job's
  last complete checkpoint stays; the line says how to resume. Returns for any other error."""
  if jax.process_count() < 2:
    return
  text = " ".join(str(error).split())
  if not any(s in text for s in _PEER_LOST):
    return
  _peer_lost(text[:160])


_exit_lock = threading.Lock()


def _peer_lost(detail: str) -> None:
  """The one line and status 3; the first caller (main thread or PeerWatch) wins."""
  with _exit_lock:
    sys.stdout.flush()
    print(
      f"error: process {jax.process_index()} of {jax.process_count()} on "
      f"{socket.gethostname()}: another process of the job is gone (killed, preempted or its "
      f"host lost: {detail}); stopping this one too. Restart the whole job with "
      "--config.train.resume=True: it resumes from the last complete checkpoint",
      file=sys.stderr,
      flush=True,
    )
    os._exit(EXIT_PEER_LOST)


class PeerWatch:
  """A daemon thread that ends this process (`_peer_lost`) when another process of the job has
  shown no sign of life for `timeout` seconds, or the coordinator is unreachable.

  Signs of life are counters in the coordination service's key-value store: every process bumps
  its own each `interval` seconds and reads everyone's. A counter that stops moving is a dead (or
  wholly stalled) process, whatever this process's main thread is blocked in (a collective with
  the dead peer, a barrier, a compile). A process that ends normally marks itself done first
  (atexit), so a peer that finishes later is not mistaken for a survivor of a crash.
  """

  PREFIX = "markovian/alive/"

  def __init__(self, timeout: float, interval: Optional[float] = None):
    from jax._src import distributed as jax_distributed  # the client: no public accessor

    self.client = jax_distributed.global_state.client
    self.timeout = float(timeout)
    self.interval = interval if interval is not None else min(2.0, self.timeout / 5)
    self.me = jax.process_index()
    self.count = jax.process_count()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="PeerWatch", daemon=True)

  def start(self) -> "PeerWatch":
    import atexit

    atexit.register(self.finish)
    self._thread.start()
    return self

  def finish(self) -> None:
    """This process ends normally: it stops watching and tells the others it is done."""
    if self._stop.is_set():
      return
    self._stop.set()
    try:
      self.client.key_value_set(f"{self.PREFIX}{self.me}", "done", allow_overwrite=True)
    except Exception:  # noqa: BLE001 -- the coordinator may already be gone; nothing to tell
      pass

  def _run(self) -> None:
    last: dict[str, tuple[str, float]] = {}
    beat = 0
    while not self._stop.is_set():
      beat += 1
      now = time.monotonic()
      try:
        self.client.key_value_set(f"{self.PREFIX}{self.me}", str(beat), allow_overwrite=True)
        seen = dict(self.client.key_value_dir_get(self.PREFIX))
      except Exception as e:  # noqa: BLE001 -- the coordinator (process 0) is gone
        if self._stop.is_set():
          return
        _peer_lost(f"the coordinator does not answer: {' '.join(str(e).split())[:120]}")
        return
      for i in range(self.count):
        key = f"{self.PREFIX}{i}"
        if i == self.me or seen.get(key) == "done":
          continue
        value = seen.get(key)
        if value is None or key not in last or last[key][0] != value:
          last[key] = (value, now)
        elif now - last[key][1] > self.timeout and not self._stop.is_set():
          _peer_lost(f"process {i} showed no sign of life for {self.timeout:.0f}s")
          return
      self._stop.wait(self.interval)


def sync(name: str) -> None:
  """A barrier across all processes (a no-op for one): e.g. every process has read the workdir
  before any of them writes to it."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class StopOnSignal:
  """SIGTERM or SIGINT on any process stops every process after the same step.

  One process: a Python handler notes the signal and `requested()` says so at the next check.
  Several: SIGTERM is left to JAX's preemption notifier (a Python handler would replace it),
  which tells the coordinator; `requested(step)` is `multihost_utils.reached_preemption_sync_point`,
  True on every process at the same step (the largest step any process had reached, plus one).
  SIGINT (Ctrl-C on one host) is turned into that SIGTERM. Every process must call
  `requested(step)` once per step with the same `step`.
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self._multi = False
    self._previous: dict = {}

  def install(self) -> "StopOnSignal":
    """Takes over the signals (the previous handlers come back with `uninstall`)."""
    self._multi = jax.process_count() > 1
    if self._multi:
      if jax.config.jax_enable_preemption_service is False:
        raise DistributedError(
          "jax_enable_preemption_service is off: a SIGTERM on one process "
          "could not stop the others at the same step; turn it back on"
        )
      self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._forward)}
    else:
      self._previous = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def __enter__(self) -> "StopOnSignal":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def _note(self, signum, frame) -> None:
    del frame
    self.signum = signum
    log.warning("signal %d: checkpointing and stopping after this step", signum)

  def _forward(self, signum, frame) -> None:
    del frame
    log.warning("signal %d: passing it to every process as a preemption notice", signum)
    signal.raise_signal(signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """Whether to stop now, before the step after `step` (the same answer on every process)."""
    if not self._multi:
      return self.signum is not None
    if multihost_utils.reached_preemption_sync_point(step):
      log.warning("preemption notice: every process stops at step %d and checkpoints", step)
      return True
    return False
