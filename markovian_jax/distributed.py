"""Multi-process start-up: one place that decides whether and how to call `jax.distributed`.

Single-process runs (one GPU host, a CPU) skip it. On TPU pods `jax.distributed.initialize()`
auto-detects everything; on multi-host GPU the launcher exports the coordinator address, the number
of processes and this process's rank (launch/gpu_multinode.sh). A timeout turns the classic "one host
never started" hang into an error that says what to check.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(timeout_s: int = 600) -> None:
  """Initialises jax.distributed when the environment describes a multi-process job."""
  if jax.distributed.is_initialized():
    return
  env = {k: os.environ.get(k) for k in _ENV}
  on_tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
  if all(env.values()):
    log.info("jax.distributed: process %s of %s, coordinator %s", env["JAX_PROCESS_ID"],
             env["JAX_NUM_PROCESSES"], env["JAX_COORDINATOR_ADDRESS"])
    kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
              num_processes=int(env["JAX_NUM_PROCESSES"]),
              process_id=int(env["JAX_PROCESS_ID"]))
  elif any(env.values()):
    missing = [k for k, v in env.items() if not v]
    raise RuntimeError(f"multi-process launch is half-configured: {missing} unset "
                       f"(set all of {list(_ENV)} or none)")
  elif on_tpu_pod:
    log.info("jax.distributed: TPU pod detected, auto-configuring")
    kw = {}
  else:
    return
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kw)
  except Exception as e:  # the backend's message alone rarely says which host is missing
    raise RuntimeError(
        f"jax.distributed.initialize failed after up to {timeout_s}s: {e}. Check that every host "
        "runs the same command (TPU: gcloud ... --worker=all), that the coordinator address is "
        "reachable from all hosts, and (GPU) NCCL settings such as NCCL_P2P_DISABLE=1.") from e
  log.info("jax.distributed ready: process %d/%d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
