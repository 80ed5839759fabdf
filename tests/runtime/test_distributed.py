"""distributed: who joins a multi-process job (JAX's cluster detection or explicit JAX_* variables),
the error of a job that does not form, and the signal-driven stop."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from markovian_jax.runtime import distributed
from markovian_jax.runtime.distributed import DistributedError, Plan
from tests import helpers

# Every variable that JAX's detection or our explicit path reads, cleared so the host running the
# tests (a SLURM allocation, an MPI job) cannot leak into the cases.
_LAUNCH_VARS = (
  "JAX_COORDINATOR_ADDRESS",
  "JAX_NUM_PROCESSES",
  "JAX_PROCESS_ID",
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
  "OMPI_MCA_orte_hnp_uri",
  "OMPI_COMM_WORLD_SIZE",
  "OMPI_COMM_WORLD_RANK",
  "OMPI_COMM_WORLD_LOCAL_RANK",
  "KUBERNETES_SERVICE_HOST",
  "TPU_WORKER_HOSTNAMES",
  distributed.TIMEOUT_ENV,
)


@pytest.fixture
def env(monkeypatch):
  for name in _LAUNCH_VARS:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_alone_without_a_job(env):
  assert distributed.plan() is None


def test_explicit_variables(env):
  env.setenv("JAX_COORDINATOR_ADDRESS", "node0:1234")
  env.setenv("JAX_NUM_PROCESSES", "2")
  env.setenv("JAX_PROCESS_ID", "1")
  assert distributed.plan() == Plan("JAX_* variables", "node0:1234", 2, 1)
  env.setenv("JAX_NUM_PROCESSES", "1")
  env.setenv("JAX_PROCESS_ID", "0")
  assert distributed.plan() is None  # one process: nothing to join


@pytest.mark.parametrize(
  "values,expected",
  [
    (
      {"JAX_COORDINATOR_ADDRESS": "node0:1234"},
      "JAX_COORDINATOR_ADDRESS set but JAX_NUM_PROCESSES, JAX_PROCESS_ID not",
    ),
    (
      {"JAX_COORDINATOR_ADDRESS": "n:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
      "JAX_NUM_PROCESSES='two': not an integer >= 1",
    ),
    (
      {"JAX_COORDINATOR_ADDRESS": "n:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
      "JAX_PROCESS_ID=2 is not below JAX_NUM_PROCESSES=2",
    ),
    ({distributed.TIMEOUT_ENV: "soon"}, "MARKOVIAN_DISTRIBUTED_TIMEOUT='soon'"),
  ],
)
def test_bad_launch_variables_name_the_variable(env, values, expected):
  for k, v in values.items():
    env.setenv(k, v)
  with pytest.raises(DistributedError, match=expected):
    distributed.plan()
    distributed.timeout_s()


def test_slurm_and_open_mpi_come_from_jax_detection(env):
  for k, v in {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[001-002]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
  }.items():
    env.setenv(k, v)
  assert distributed.plan() == Plan("SlurmCluster", None, 2, 1)
  env.setenv("JAX_COORDINATOR_ADDRESS", "gpu001:5000")  # explicit parts win over detection
  assert distributed.plan() == Plan("SlurmCluster", "gpu001:5000", 2, 1)
  env.setenv("SLURM_NTASKS", "1")
  env.setenv("SLURM_PROCID", "0")
  assert distributed.plan() is None  # a one-task job step
  for k in (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "JAX_COORDINATOR_ADDRESS",
  ):
    env.delenv(k)
  for k, v in {
    "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "3",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
  }.items():
    env.setenv(k, v)
  assert distributed.plan() == Plan("OmpiCluster", None, 4, 3)


@pytest.mark.slow
def test_single_process_stop_on_sigterm_and_sigint():
  before = signal.getsignal(signal.SIGTERM)
  with distributed.StopOnSignal() as stop:
    assert not stop.requested(0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
    assert stop.requested(1) and stop.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before
  with distributed.StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert stop.requested(0) and stop.signum == signal.SIGINT


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_a_process_that_never_joins_is_one_clear_error_within_the_timeout(tmp_path):
  """Process 0 of 2 waits for a process 1 that never starts; separately, a process 1 whose
  coordinator never starts. Both end within the 5 s timeout plus start-up, with one line each."""
  port, timeout = free_port(), 5
  base = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_NUM_PROCESSES="2",
    **{distributed.TIMEOUT_ENV: str(timeout)},
  )
  argv = [
    sys.executable,
    "-m",
    "markovian_jax.train",
    "--config=configs/demo.py",
    f"--config.workdir={tmp_path / 'w'}",
    "--config.host_allocator=system",
    "--config.compilation_cache_dir=",
  ]
  start = time.monotonic()
  # Different ports: process 1 must find no coordinator at all.
  procs = [
    subprocess.Popen(
      argv,
      cwd=helpers.REPO,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=dict(base, JAX_PROCESS_ID=str(rank), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port + rank}"),
    )
    for rank in (0, 1)
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  elapsed = time.monotonic() - start
  lines = []
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 2, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    lines.append(errors[0])
  assert "process 0 of 2" in lines[0] and "process 1 did not join" in lines[0], lines[0]
  assert "process 1 of 2" in lines[1] and "could not complete the join" in lines[1], lines[1]
  assert all(distributed.TIMEOUT_ENV in ln and f"within {timeout}s" in ln for ln in lines)
  # JAX itself would abort (no message) only after timeout + 30 s.
  assert elapsed < timeout + 25, elapsed


# A two-process job of plain JAX (no model): join, then process 1 either dies by SIGKILL or ends
# normally; process 0 then blocks in a coordination-service barrier (where JAX itself would wait
# for its heartbeat timeout and abort with no message) or sleeps past the peer timeout.
_PEER_JOB = """
import os, signal, sys, time
from markovian_jax.runtime import distributed
distributed.initialize()
from jax._src import distributed as jax_distributed
rank, mode = int(os.environ["JAX_PROCESS_ID"]), sys.argv[1]
if rank == 1:
  time.sleep(1)
  if mode == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
  sys.exit(0)
if mode == "kill":
  jax_distributed.global_state.client.wait_at_barrier("never", 600_000)
else:
  time.sleep(float(os.environ["MARKOVIAN_PEER_TIMEOUT"]) * 2)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_a_dead_peer_ends_the_survivor_with_one_line_and_a_finished_one_does_not():
  """Process 1 killed -9: process 0, blocked in a barrier, exits with status 3 and one `error:`
  line within the peer timeout plus a beat. Process 1 ending normally (in the job run beside it):
  process 0 keeps working past twice the timeout and finishes with status 0."""
  timeout = 4
  procs = {}
  for mode in ("kill", "finish"):
    port = free_port()
    for rank in (0, 1):
      env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(rank),
        **{distributed.PEER_TIMEOUT_ENV: str(timeout)},
      )
      procs[mode, rank] = subprocess.Popen(
        [sys.executable, "-c", _PEER_JOB, mode],
        cwd=helpers.REPO,
        text=True,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
      )
  outs = {k: p.communicate(timeout=120) for k, p in procs.items()}
  killed_out, killed_err = outs["kill", 0]
  assert procs["kill", 1].returncode == -signal.SIGKILL
  assert procs["kill", 0].returncode == distributed.EXIT_PEER_LOST, killed_err[-3000:]
  errors = [ln for ln in killed_err.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in killed_err, killed_err[-3000:]
  assert "process 0 of 2" in errors[0] and "process 1 showed no sign of life" in errors[0]
  assert "--config.train.resume=True" in errors[0] and "finished" not in killed_out
  out, err = outs["finish", 0]
  assert procs["finish", 0].returncode == 0 and "finished" in out, err[-3000:]
  assert procs["finish", 1].returncode == 0, outs["finish", 1][1][-3000:]
