"""Two processes proven equal to one: the train and evaluate CLIs on localhost, 2 processes x 4 CPU
devices (gloo collectives, loopback coordinator) against 1 process x 8 devices, on the same
(data=2, fsdp=2, tensor=2) mesh.

One module-scoped set of runs serves every assertion (compiling is what costs here):
  one:  1 process, 4 steps, a checkpoint every step
  two:  2 processes, the same config; SIGTERM to process 1 once step 1 is logged, so both stop
        at one step s < 4 and checkpoint; then resumed on 2 processes to step 4
  eval: evaluate on 2 processes, the resumed run's step 4
Also here: a gs:// workdir (a fake GCS filesystem) stays a URI through the training start-up,
evaluation files, TensorBoard and checkpoint manager.

Tolerances: only the reduction order differs (in-process vs gloo all-reduces), so values agree to
float32 rounding, and the data, the RNG and so the sampled CoTs agree exactly. Logged scalars
(loss, gradient norm, KL): rtol 1e-5 + atol 1e-6 (measured: 2.4e-7 on losses of ~0.02). Adam's
moments, i.e. the clipped LoRA gradients (mu = (1-b1) sum b1^k g, nu likewise): rtol 1e-3 + atol
1e-4 x their largest entry (measured: 3.5e-6 x). The LoRA after Adam: rtol 1e-4 + atol 1e-6
(measured: 7.5e-8), only where the gradient is well above rounding (test_train's reason: Adam turns
a near-zero gradient into a +-lr step whose sign is rounding noise).
"""

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers

pytestmark = pytest.mark.slow  # two-process jobs of the real CLIs

STEPS = 4
TIMEOUT_S = 600


def _config_args(model_dir, workdir, cache_dir, *extra):
  return [
    "--config=configs/demo.py",
    f"--config.model.path={model_dir}",
    f"--config.workdir={workdir}",
    "--config.host_allocator=system",
    f"--config.compilation_cache_dir={cache_dir}",
    "--config.mesh.shape=(2,2,2)",
    "--config.sampling.cot_length=8",
    "--config.train.group_size=4",
    f"--config.train.num_steps={STEPS}",
    "--config.train.eval_every=2",
    "--config.train.text_every=1",
    "--config.train.max_to_keep=5",
    "--config.eval.num_examples=4",
    # The demo's 32 selection questions were 8 of every evaluation's 9 sampler batches: one
    # batch shows the processes agree as well (benchmarks/faults.py evaluates 4 likewise).
    "--config.eval.selection_size=4",
    "--config.eval.final_num_examples=4",
    "--config.eval.batch_size=4",
    "--config.eval.answer_max_tokens=4",
    *extra,
  ]


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """`n` processes of one CLI command, each logging to <logdir>/<name>.<rank>.log."""

  def __init__(self, logdir, name, module, args, n):
    env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID"))
    }
    env.update(
      HF_HUB_OFFLINE="1",
      HF_DATASETS_OFFLINE="1",
      JAX_PLATFORMS="cpu",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
      XLA_FLAGS=helpers.xla_flags(devices=8 // n),
    )
    port = _free_port()
    self.logs = [logdir / f"{name}.{rank}.log" for rank in range(n)]
    self.procs = []
    for rank in range(n):
      if n > 1:
        env.update(
          JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
          JAX_NUM_PROCESSES=str(n),
          JAX_PROCESS_ID=str(rank),
        )
      with open(self.logs[rank], "w") as log:
        self.procs.append(
          subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=helpers.REPO,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
          )
        )

  def wait(self) -> list[int]:
    deadline = time.monotonic() + TIMEOUT_S
    try:
      return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
    finally:
      self.kill()

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def text(self, rank: int) -> str:
    return self.logs[rank].read_text()

  def check(self) -> "Job":
    codes = self.wait()
    assert codes == [0] * len(codes), "\n".join(
      f"--- process {r} exit {c}:\n{self.text(r)[-3000:]}" for r, c in enumerate(codes)
    )
    return self


def _sigterm_after_step_one(job: Job, workdir, rank: int = 1) -> None:
  """Process 0 appends samples.jsonl after each step (text_every=1): once it exists, step 1 is
  done, and a SIGTERM to process `rank` must stop both processes before the last step."""
  deadline = time.monotonic() + TIMEOUT_S
  while not (workdir / "samples.jsonl").exists():
    assert time.monotonic() < deadline and all(p.poll() is None for p in job.procs), job.text(0)[
      -3000:
    ]
    time.sleep(0.05)
  job.procs[rank].send_signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  cache = root / "xla"  # the two-process runs after the first load its programs
  one_dir, two_dir, eval_dir = root / "one", root / "two", root / "eval_out"
  jobs = []

  def start(name, module, args, n) -> Job:
    jobs.append(Job(root, name, module, args, n))
    return jobs[-1]

  try:
    t0 = time.monotonic()
    one = start(
      "one",
      "markovian_jax.train",  # side by side with the first two-process run
      _config_args(tiny_model_dir, one_dir, "", "--config.train.checkpoint_every=1"),
      1,
    )
    two_args = _config_args(tiny_model_dir, two_dir, cache, "--config.train.checkpoint_every=100")
    stopped = start("two_stopped", "markovian_jax.train", two_args, 2)
    _sigterm_after_step_one(stopped, two_dir)
    stopped.check()
    stopped_steps = _steps(two_dir)
    one.check()
    t1 = time.monotonic()
    resumed = start(
      "two_resumed", "markovian_jax.train", [*two_args, "--config.train.resume=True"], 2
    ).check()
    t2 = time.monotonic()
    evaluated = start(
      "eval",
      "markovian_jax.evaluate",
      [
        *_config_args(tiny_model_dir, two_dir, cache),
        f"--checkpoint_dir={two_dir / 'checkpoints'}",
        f"--step={STEPS}",
        f"--output_dir={eval_dir}",
      ],
      2,
    ).check()
    t3 = time.monotonic()
  finally:
    for job in jobs:  # a failed assertion above leaves no process behind
      job.kill()
  print(
    f"multihost runs: one and two (stopped) {t1 - t0:.0f}s, resumed {t2 - t1:.0f}s, "
    f"evaluate {t3 - t2:.0f}s"
  )
  return dict(
    one=one,
    stopped=stopped,
    resumed=resumed,
    evaluated=evaluated,
    one_dir=one_dir,
    two_dir=two_dir,
    eval_dir=eval_dir,
    stopped_steps=stopped_steps,
  )


def _steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def _tree(workdir, step: int, item: str) -> dict:
  """A checkpoint item as {key path: numpy array}, read without the run's devices."""
  import jax
  import orbax.checkpoint as ocp

  handler = ocp.PyTreeCheckpointHandler()
  path = workdir / "checkpoints" / str(step) / item
  meta = handler.metadata(path).tree
  args = jax.tree.map(
    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta, is_leaf=lambda x: hasattr(x, "shape")
  )
  tree = handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return {
    jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _jsonl(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def _stop_step(log: str):
  found = re.findall(r"every process stops at step (\d+)", log)
  return int(found[-1]) if found else None


def test_two_processes_form_one_eight_device_job(runs):
  assert "jax.distributed: single process" in runs["one"].text(0)
  for job in ("stopped", "resumed", "evaluated"):
    for rank in (0, 1):
      assert f"jax.distributed ready: process {rank} of 2, 4 local / 8 global devices" in runs[
        job
      ].text(rank), runs[job].text(rank)[-3000:]


def test_sigterm_on_one_process_stops_both_at_the_same_step_with_a_checkpoint(runs):
  stops = [_stop_step(runs["stopped"].text(rank)) for rank in (0, 1)]
  assert stops[0] is not None and stops[0] == stops[1], stops
  assert 1 <= stops[0] < STEPS
  assert "SIGTERM caught" in runs["stopped"].text(1)  # JAX's preemption notifier got it
  # checkpoint_every=100: the only checkpoint is the one the stop wrote.
  assert runs["stopped_steps"] == [stops[0]]


def test_resume_across_two_processes_continues_exactly(runs):
  stop = _stop_step(runs["stopped"].text(0))
  for rank in (0, 1):
    assert f"restored step {stop} from" in runs["resumed"].text(rank)
  # Every step drew the same questions and the same CoTs as the uninterrupted one-process run:
  # the data cursor, the RNG key and the baselines came back exactly.
  one, two = _jsonl(runs["one_dir"] / "samples.jsonl"), _jsonl(runs["two_dir"] / "samples.jsonl")
  assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # written once, by process 0
  for a, b in zip(one, two):
    assert (a["question"], a["cots"]) == (b["question"], b["cots"]), a["step"]
    np.testing.assert_allclose(b["rewards"], a["rewards"], rtol=1e-5, atol=1e-6)


def test_losses_and_lora_gradients_equal_the_one_process_run(runs):
  from markovian_jax.runtime import summary

  one, two = summary.read_scalars(str(runs["one_dir"])), summary.read_scalars(str(runs["two_dir"]))
  for tag in ("train/loss", "train/grad_norm", "answer/logprob", "policy/kl"):
    assert [s for s, _ in two[tag]] == list(range(1, STEPS + 1)), tag  # once per step
    a, b = np.array([v for _, v in one[tag]]), np.array([v for _, v in two[tag]])
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=tag)
  for step in (runs["stopped_steps"][0], STEPS):
    opt_one, opt_two = (
      _tree(runs["one_dir"], step, "opt_state"),
      _tree(runs["two_dir"], step, "opt_state"),
    )
    moments = [k for k in opt_one if "['mu']" in k or "['nu']" in k]
    assert len(moments) >= 28 and set(opt_one) == set(opt_two)
    for key in moments:
      scale = max(np.abs(opt_one[key]).max(), 1e-30)
      np.testing.assert_allclose(
        opt_two[key], opt_one[key], rtol=1e-3, atol=1e-4 * scale, err_msg=f"step {step} {key}"
      )
  lora_one, lora_two = _tree(runs["one_dir"], STEPS, "lora"), _tree(runs["two_dir"], STEPS, "lora")
  compared = 0
  for key, value in lora_one.items():
    mu = opt_one[next(k for k in opt_one if "['mu']" in k and k.endswith(key))]
    well = np.abs(mu) > 1e-2 * np.abs(mu).max()
    compared += well.sum()
    np.testing.assert_allclose(lora_two[key][well], value[well], rtol=1e-4, atol=1e-6, err_msg=key)
  assert compared > 100


def test_one_process_writes_one_set_of_files(runs):
  two = runs["two_dir"]
  events = [f for f in os.listdir(two) if f.startswith("events.out.tfevents")]
  # Event files are named <time>.<host>.<pid>.<n> (a new one after each checkpoint): two writing
  # processes, process 0 of each launch (stopped, resumed), none from process 1.
  assert len({f.split(".")[-2] for f in events}) == 2, events
  assert sorted(f for f in os.listdir(two / "eval") if f.endswith(".jsonl")) == [
    f"step_{s}.jsonl" for s in (0, 2, 4)
  ]
  assert sorted(os.listdir(two / "eval" / "selection")) == [f"step_{s}.jsonl" for s in (0, 2, 4)]
  assert _steps(two) == [runs["stopped_steps"][0], STEPS]
  assert (two / "config.json").is_file()
  # Evaluation at step 4 saw the same CoTs and answers in both runs.
  for a, b in zip(
    _jsonl(runs["one_dir"] / "eval" / "step_4.jsonl"), _jsonl(two / "eval" / "step_4.jsonl")
  ):
    assert a == b


def test_evaluate_on_two_processes_writes_one_summary(runs):
  out = runs["eval_dir"]
  # protocol.json: what the cells were read under (evaluate refuses to mix protocols in one dir).
  assert sorted(f for f in os.listdir(out) if not f.startswith("events")) == [
    "protocol.json",
    "step_4.jsonl",
    "summary.json",
  ]
  assert len([f for f in os.listdir(out) if f.startswith("events")]) == 1
  assert "wrote " in runs["evaluated"].text(0) and "wrote " not in runs["evaluated"].text(1)
  summary = json.loads((out / "summary.json").read_text())
  assert list(summary) == ["step_4"]
  # The CLI's evaluation of the checkpoint is the training loop's evaluation at that step.
  assert _jsonl(out / "step_4.jsonl") == _jsonl(runs["two_dir"] / "eval" / "step_4.jsonl")


# --------------------------------------------------------------- a gs:// workdir, kept a URI
@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://BUCKET/PATH served from tmp_path/gcs/BUCKET/PATH through fsspec (the backend etils
  epath uses for gs:// when TensorFlow is absent); the test runs in an empty working directory,
  where a URI mistaken for a local path would show up as a 'gs:' directory."""
  from etils.epath import backend
  import fsspec
  from fsspec.implementations.local import LocalFileSystem

  root = tmp_path / "gcs"
  root.mkdir()

  class FakeGCS(LocalFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      del finalize_on_close  # gcsfs's option, passed by epath
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path)
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          return str(root / path[len(prefix) :]).rstrip("/")
      return super()._strip_protocol(path)

  registry = importlib.import_module("fsspec.registry")._registry  # fsspec.registry: a view
  previous = registry.get("gcs")
  fsspec.register_implementation("gcs", FakeGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  # Orbax asks GCS (google-cloud-storage, which gcsfs brings) whether the bucket has a
  # hierarchical namespace; a fake bucket has none.
  from orbax.checkpoint._src.path import gcs_utils

  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  backend.fsspec_backend._get_filesystem.cache_clear()
  if previous is not None:
    registry["gcs"] = previous
  else:
    registry.pop("gcs", None)
  assert os.listdir(cwd) == [], "a gs:// path was written as a local path"


def test_gs_workdir_stays_a_uri(fake_gcs, tiny_model_dir):
  from markovian_jax.runtime import checkpointing, summary
  from markovian_jax.runtime.errors import InvalidConfig
  from markovian_jax.trainer import Trainer, check_workdir
  from tests.helpers import make_config

  c = make_config(tiny_model_dir, "gs://bucket/run", **{"train.max_to_keep": 2})
  trainer = Trainer(c)
  assert str(trainer.ckpt.directory) == "gs://bucket/run/checkpoints"
  assert trainer.ckpt.all_steps() == []
  trainer.evaluate()  # the eval JSONL and TensorBoard scalars, through epath
  trainer.writer.close()
  run = fake_gcs / "bucket" / "run"
  assert sorted(f for f in os.listdir(run / "eval") if f.endswith(".jsonl")) == ["step_0.jsonl"]
  assert os.listdir(run / "eval" / "selection") == ["step_0.jsonl"]
  assert (run / "config.json").is_file() and (run / "checkpoints").is_dir()
  scalars = summary.read_scalars(str(run))
  assert [s for s, _ in scalars["eval/anchor/accuracy"]] == [0]
  # A second run in that workdir is refused by what the URI holds.
  with pytest.raises(InvalidConfig, match="gs://bucket/run holds the TensorBoard events"):
    check_workdir(trainer.spec)
  (run / "checkpoints" / "3").mkdir()
  with pytest.raises(InvalidConfig, match=r"gs://bucket/run/checkpoints already holds .*\[3\]"):
    check_workdir(trainer.spec)
  assert (
    str(checkpointing.absolute("gs://bucket/run/checkpoints").parent / "eval")
    == "gs://bucket/run/eval"
  )
