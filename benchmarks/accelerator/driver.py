"""The driver: versions first, the preflight, then every row in order (ratios first: ours' step
then torch's at the same Q, then the decode pairs), each checked against the budget before it
starts; ours in a worker process per row, torch's in one worker that keeps the weights and is
fed one row at a time. The merged JSON and table are rewritten after every row and once more in
a `finally`, so a cut at any minute keeps every finished row and says which rows did not run
and why. A rerun into the same --out moves the earlier files aside, never deletes them."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Optional

from benchmarks.accelerator import probes, results
from benchmarks.accelerator import workload as wl

REPO = pathlib.Path(__file__).resolve().parents[2]
FORBIDDEN_MODULES = ("ml_collections", "tensorboardX", "gguf")
CACHE_DIR = REPO / ".xla_cache"  # git-ignored; kept between calls on a warm machine
WORKER_FILES = ("preflight.json", "ours.json", "torch.json", "torch_probe.json")
KILL_GRACE_S = 10.0


def parse(argv=None):
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.accelerator",
    description="Our sampler and Markovian step against transformers "
    "+ peft on the visible accelerator (Llama-3.1-8B shapes).",
  )
  p.add_argument("--out", required=True, help="directory for the JSON files and the table")
  p.add_argument("--tiny", action="store_true", help="a tiny model (CPU, CI)")
  p.add_argument(
    "--budget_s",
    type=float,
    default=480.0,
    help="seconds for the whole run (default 480: a margin under a 540 s limit); "
    "a row expected not to finish in what is left is skipped, with the reason",
  )
  p.add_argument("--skip_torch", action="store_true", help="only our side")
  p.add_argument("--batches", help="decode batch sizes in run order, e.g. 1,256,64,12")
  p.add_argument("--questions", help="questions per step in run order, e.g. 8,1")
  p.add_argument("--repeats", type=int, help="timed calls per row after the first")
  p.add_argument(
    "--row_estimates",
    help="seconds that replace rows' prior estimates, e.g. "
    "ours/step/8=40,torch/load=90 (say, from a first run's row_s on this machine)",
  )
  p.add_argument(
    "--attention_impl",
    default="auto",
    choices=("auto", "einsum", "dot_product", "cudnn"),
    help="auto: cuDNN if the preflight passes, else XLA's attention (on GPU)",
  )
  p.add_argument("--hbm_tb_s", type=float, help="datasheet HBM bandwidth (default: by name)")
  p.add_argument("--peak_tflops", type=float, help="datasheet bf16 peak (default: by name)")
  p.add_argument(
    "--compile_cache",
    default=str(CACHE_DIR),
    help="persistent compilation cache directory ('' disables)",
  )
  p.add_argument(
    "--worker", choices=("preflight", "torch_probe", "ours", "torch"), help=argparse.SUPPRESS
  )
  p.add_argument("--rows", help=argparse.SUPPRESS)
  p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _workload(args) -> wl.Workload:
  return wl.make_workload(
    args.tiny, args.attention_impl, args.batches, args.questions, args.repeats, args.row_estimates
  )


def forbidden_loaded() -> list:
  return sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN_MODULES)


def run_worker(args, w: wl.Workload) -> None:
  """One worker process's job; it writes DIR/<worker>.json (atomically, after every row)."""
  out = pathlib.Path(args.out)
  if args.deadline:
    # A backstop should the driver itself be killed outright (SIGKILL skips its `finally`): the
    # worker ends itself soon after the run's deadline instead of holding the device.
    signal.alarm(max(1, int(args.deadline - time.time() + 3 * KILL_GRACE_S)))
  probes.enable_compilation_cache(args.compile_cache)
  rows = args.rows.split(",") if args.rows else []
  if args.worker == "preflight":
    data = probes.preflight(w, args.tiny)
    results.write_json(out / "preflight.json", {**data, "forbidden_modules": forbidden_loaded()})
  elif args.worker == "torch_probe":
    try:
      data = probes.torch_probe()
    except Exception as e:  # noqa: BLE001 - the driver turns it into its stop line
      data = {"error": f"{type(e).__name__}: {e}"[:300]}
    results.write_json(out / "torch_probe.json", data)
  elif args.worker == "ours":
    from benchmarks.accelerator import ours

    ours.worker(w, rows, out / "ours.json", args.deadline)
    results.RowFile(out / "ours.json").meta(forbidden_modules=forbidden_loaded())
  else:
    from benchmarks.accelerator import peer

    sums = (results.read_json(out / "ours.json") or {}).get("meta", {}).get("weight_sums")
    feed = rows or iter(sys.stdin.readline, "")  # the driver's row ids, one a line
    peer.worker(w, feed, out / "torch.json", args.deadline, sums, allow_cpu=args.tiny)
    results.RowFile(out / "torch.json").meta(forbidden_modules=forbidden_loaded())


def _command(args, worker: str, rows=(), deadline=None, attention=None) -> list:
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.accelerator",
    f"--worker={worker}",
    f"--out={args.out}",
    f"--attention_impl={attention or args.attention_impl}",
    f"--compile_cache={args.compile_cache}",
  ]
  for flag in ("batches", "questions", "repeats", "row_estimates"):
    if getattr(args, flag):
      cmd.append(f"--{flag}={getattr(args, flag)}")
  if rows:
    cmd.append("--rows=" + ",".join(rows))
  if deadline is not None:
    cmd.append(f"--deadline={deadline}")
  return cmd + (["--tiny"] if args.tiny else [])


_RUNNING = []  # the workers started and not yet waited for: a cut driver ends them


def _start(cmd, env: dict, stdin=None) -> subprocess.Popen:
  # Its own session: a timeout ends the worker and anything it started, nothing else.
  proc = subprocess.Popen(
    cmd, cwd=str(REPO), env={**os.environ, **env}, start_new_session=True, stdin=stdin, text=True
  )
  _RUNNING.append(proc)
  return proc


def _finish(proc: subprocess.Popen, timeout: float):
  """The worker's exit code, or None after ending it at `timeout` seconds."""
  try:
    code = proc.wait(timeout=max(timeout, 1.0))
  except subprocess.TimeoutExpired:
    _end(proc)
    code = None
  _RUNNING.remove(proc)  # not on a cut (SystemExit): the `finally` in main ends it
  return code


def _end(proc: subprocess.Popen):
  """SIGTERM to the worker's process group, SIGKILL if it is still there after a grace."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(proc.pid, sig)
      proc.wait(timeout=KILL_GRACE_S)
      break
    except subprocess.TimeoutExpired:
      continue
    except ProcessLookupError:
      break


def attention_choice(requested: str, pre: dict) -> tuple:
  """(attention_impl for our rows, reason): under auto, cuDNN pinned when the preflight ran it
  at every layout (so a later failure is an error, never a silent fallback), XLA's attention
  when it failed on the GPU, the backend's default elsewhere."""
  att = pre.get("attention") or {}
  if requested != "auto":
    return requested, "requested"
  if att.get("ok"):
    return "cudnn", "preflight passed"
  if pre.get("platform") == "gpu":
    return "dot_product", f"XLA attention: {att.get('reason', 'no preflight result')}"
  return "auto", att.get("reason") or "no preflight result"


class Run:
  """The driver's state: what ran, what was skipped, and the merged files."""

  def __init__(self, args, w: wl.Workload):
    self.args, self.w, self.out = args, w, pathlib.Path(args.out)
    self.start = time.time()
    self.budget = results.Budget(self.start + args.budget_s, w)
    self.skipped, self.versions, self.attention = {}, {}, {}
    self.order = w.order()
    self.memory = {}  # the device memory our rows may take while the peer holds its weights

  def write(self) -> str:
    part = lambda n: results.read_json(self.out / n)  # noqa: E731
    pre = part("preflight.json") or {}
    dev = results.device_figures(pre, self.args.hbm_tb_s, self.args.peak_tflops)
    res = results.merge(
      self.w,
      {"ours": part("ours.json"), "torch": part("torch.json")},
      dev,
      self.order,
      self.skipped,
    )
    ours_meta = (part("ours.json") or {}).get("meta", {})
    torch_meta = (part("torch.json") or {}).get("meta", {})
    self.attention["ran"] = ours_meta.get("self_attention_kernel")
    self.attention["hlo_cudnn_fmha_calls"] = {
      r: row.get("hlo_cudnn_fmha_calls") for r, row in res["rows"].items() if "/step/" in r
    }
    res.update(
      workload=self.w.as_dict(),
      versions=self.versions,
      preflight=pre,
      attention=self.attention,
      ours_meta=ours_meta,
      torch_meta=torch_meta,
      budget_s=self.args.budget_s,
      wall_s=time.time() - self.start,
      ours_memory=self.memory,
      forbidden_modules=sorted(
        set(forbidden_loaded())
        | {m for d in (pre, ours_meta, torch_meta) for m in d.get("forbidden_modules", [])}
      ),
    )
    att = res["attention"]
    att["used"] = sorted(set((att.get("ran") or {}).values())) or None
    # The compiled programs must agree with the resolved kernel: cuDNN calls in the HLO iff
    # cuDNN was resolved (None until a step row has compiled).
    calls = [sum(c.values()) for c in att["hlo_cudnn_fmha_calls"].values() if c]
    att["hlo_agrees"] = (
      None
      if not calls or not att["used"]
      else all((n > 0) == ("cudnn" in att["used"]) for n in calls)
    )
    text = results.table(res)
    results.write_json(self.out / "accelerator.json", res)
    (self.out / "table.txt").write_text(text + "\n")
    return text


def _on_term(signum, frame):
  del frame
  raise SystemExit(128 + signum)  # unwinds into the `finally` that writes the results


def _preflight(run: Run) -> tuple:
  """(preflight dict, torch probe dict or None): both workers at once, versions printed."""
  args = run.args
  end = run.budget.deadline
  procs = {
    "preflight": _start(
      _command(args, "preflight", deadline=end), {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    )
  }
  if not args.skip_torch:
    procs["torch_probe"] = _start(
      _command(args, "torch_probe", deadline=end), {"JAX_PLATFORMS": "cpu"}
    )
  timeout = min(run.budget.left(), 3 * run.w.estimate("preflight") + 60)
  for name, proc in procs.items():
    code = _finish(proc, timeout)
    if code != 0:
      print(f"[driver] {name} worker ended with {code} (None: timed out)", flush=True)
  pre = results.read_json(run.out / "preflight.json") or {}
  probe = results.read_json(run.out / "torch_probe.json") if not args.skip_torch else None
  run.versions.update(
    jax={
      k: v
      for k, v in pre.items()
      if k
      in (
        "jax",
        "jaxlib",
        "platform",
        "device_kind",
        "device_count",
        "platform_version",
        "cudnn",
        "cuda_runtime",
        "cuda_driver",
      )
    },
    torch=probe,
  )
  print(f"[versions] jax sees {run.versions['jax']}", flush=True)
  print(f"[versions] torch {probe}", flush=True)
  return pre, probe


def _ours_env(run: Run) -> dict:
  """Our row's device memory: 90% of the device, or what the resident peer leaves (its
  free bytes after a row, less 2 GiB for the CUDA context and fragmentation)."""
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9"))
  meta = (results.read_json(run.out / "torch.json") or {}).get("meta", {})
  free, total = meta.get("device_free_bytes"), meta.get("device_total_bytes")
  if free and total:
    fraction = min(fraction, max(0.05, (free - 2 * 2**30) / total))
    run.memory.update(fraction=fraction, peer_free_bytes=free, total_bytes=total)
  return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.3f}"}


def _ours_row(run: Run, rid: str, attention: str):
  why = run.budget.why_not(rid)
  if why:
    run.skipped[rid] = why
    print(f"[driver] skip {rid}: {why}", flush=True)
    return
  expected = run.budget.expected(rid)
  limit = min(run.budget.left(), max(3 * expected, expected + 120))
  t = time.time()
  code = _finish(
    _start(_command(run.args, "ours", [rid], run.budget.deadline, attention), _ours_env(run)), limit
  )
  took = time.time() - t
  done = rid in ((results.read_json(run.out / "ours.json") or {}).get("rows", {}))
  if done:
    run.budget.finished(rid, took)
  elif code is None:
    why = f"timed out after {took:.0f} s (limit {limit:.0f} s, expected {expected:.0f})"
    results.RowFile(run.out / "ours.json").fail(rid, why)
  elif code:
    results.RowFile(run.out / "ours.json").fail(rid, f"worker exit {code} (its log is above)")
  print(f"[driver] {rid}: {'done' if done else 'not done'} in {took:.0f} s", flush=True)


class Peer:
  """The torch worker: started at the first torch row that fits with the peer's start, then fed
  one row id at a time on its stdin while it keeps the weights, so that its rows alternate with
  ours. A row is done when it is in torch.json (rows, skipped or failed)."""

  POLL_S = 0.2

  def __init__(self, run: Run):
    self.run, self.proc, self.gone = run, None, None

  def _state(self, rid: str):
    data = results.read_json(self.run.out / "torch.json") or {}
    for key in ("rows", "skipped", "failed"):
      if rid in data.get(key, {}):
        return key, data
    return None, data

  def row(self, rid: str):
    run = self.run
    if self.gone:
      run.skipped[rid] = self.gone
      return
    first = self.proc is None
    why = (
      run.budget.why_not("torch/load", run.w.estimate(rid)) if first else run.budget.why_not(rid)
    )
    if why:
      run.skipped[rid] = why + (" (with the peer's start)" if first else "")
      print(f"[driver] skip {rid}: {run.skipped[rid]}", flush=True)
      return
    expected = run.budget.expected(rid) + (run.budget.expected("torch/load") if first else 0)
    limit = min(run.budget.left(), max(3 * expected, expected + 120))
    if first:
      # JAX only makes the weights there: no preallocation, freed buffers go back to the device.
      env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}
      self.proc = _start(
        _command(run.args, "torch", deadline=run.budget.deadline), env, stdin=subprocess.PIPE
      )
    t = time.time()
    try:
      self.proc.stdin.write(rid + "\n")
      self.proc.stdin.flush()
    except (BrokenPipeError, OSError):
      pass  # it has ended: the loop below says how
    while True:
      state, data = self._state(rid)
      if state:
        break
      code = self.proc.poll()
      if code is not None:
        self.gone = f"the peer worker ended (exit {code}) before this row"
        run.skipped[rid] = self.gone
        break
      if time.time() - t > limit:
        _end(self.proc)
        self.gone = f"the peer worker was ended at a row's timeout ({limit:.0f} s)"
        results.RowFile(run.out / "torch.json").fail(
          rid,
          f"timed out after {time.time() - t:.0f} s (limit {limit:.0f} s, expected {expected:.0f})",
        )
        state = "failed"
        break
      time.sleep(self.POLL_S)
    if state == "rows":
      load = data.get("meta", {}).get("load_s") if first else None
      if load is not None:
        run.budget.finished("torch/load", load)
      run.budget.finished(rid, data["rows"][rid]["row_s"])
    print(f"[driver] {rid}: {state or 'not done'} in {time.time() - t:.0f} s", flush=True)

  def close(self):
    if self.proc is not None and self.proc.poll() is None:
      try:
        self.proc.stdin.close()  # end of the rows: the worker returns
      except OSError:
        pass
      _finish(self.proc, 60)
    elif self.proc is not None and self.proc in _RUNNING:
      _RUNNING.remove(self.proc)


def keep_earlier(out: pathlib.Path) -> Optional[pathlib.Path]:
  """Move an earlier run's files in `out` into out/earlier-<time of its last write>/ (a rerun
  never deletes them); returns that directory, or None when there were none."""
  names = [n for n in WORKER_FILES + ("accelerator.json", "table.txt") if (out / n).exists()]
  if not names:
    return None
  stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(max((out / n).stat().st_mtime for n in names)))
  dest = out / f"earlier-{stamp}"
  i = 1
  while dest.exists():
    dest, i = out / f"earlier-{stamp}-{i}", i + 1
  dest.mkdir()
  for n in names:
    os.replace(out / n, dest / n)
  return dest


def main(argv=None) -> int:
  args = parse(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.tiny:
    # The tiny model checks the code paths, not the speed: XLA:CPU's LLVM optimisation would
    # triple the compile time of the programs (the update's from ~6 s to ~17 s on 2 cores).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
      ).strip()
  if args.compile_cache:
    pathlib.Path(args.compile_cache).mkdir(parents=True, exist_ok=True)
  if args.worker:
    w = _workload(args)
    run_worker(args, w)
    return 0
  run = Run(args, _workload(args))
  run.versions.update(packages=probes.package_versions(), gpu=probes.gpu_versions())
  print(f"[versions] {json.dumps(run.versions)}", flush=True)  # first: whatever happens next
  kept = keep_earlier(out)
  if kept:
    print(f"[driver] the earlier run's files are in {kept}", flush=True)
  signal.signal(signal.SIGTERM, _on_term)
  peer = Peer(run)
  try:
    pre, probe = _preflight(run)
    stop = None if args.skip_torch else probes.peer_stop_line(pre.get("platform"), probe)
    if stop:
      print(stop, flush=True)
      for rid in run.order:
        run.skipped[rid] = stop
      return 2
    attention, reason = attention_choice(args.attention_impl, pre)
    run.attention.update(requested=args.attention_impl, impl=attention, reason=reason)
    for rid in run.order:  # the merged JSON and table after every row of either side
      if rid.startswith("ours/"):
        _ours_row(run, rid, attention)
      elif args.skip_torch:
        run.skipped[rid] = "--skip_torch"
      else:
        peer.row(rid)
      run.write()
    peer.close()
  finally:
    for proc in list(_RUNNING):
      _end(proc)
    text = run.write()
    print(
      "\n" + text + f"\n\nwall {time.time() - run.start:.0f} s; every figure in "
      f"{out / 'accelerator.json'}",
      flush=True,
    )
  return 0
