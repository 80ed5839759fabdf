"""The driver: versions first, the preflight, then every row in order, each in a worker process
with a timeout and checked against the budget before it starts; the merged JSON and table are
rewritten after every row and once more in a `finally`, so a cut at any minute keeps every
finished row and says which rows did not run and why."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from benchmarks.accelerator import probes, results
from benchmarks.accelerator import workload as wl

REPO = pathlib.Path(__file__).resolve().parents[2]
FORBIDDEN_MODULES = ("ml_collections", "tensorboardX", "gguf")
CACHE_DIR = REPO / ".xla_cache"  # git-ignored; kept between calls on a warm machine
WORKER_FILES = ("preflight.json", "ours.json", "torch.json", "torch_probe.json")
KILL_GRACE_S = 10.0


def parse(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.accelerator",
                              description="Our sampler and Markovian step against transformers "
                              "+ peft on the visible accelerator (Llama-3.1-8B shapes).")
  p.add_argument("--out", required=True, help="directory for the JSON files and the table")
  p.add_argument("--tiny", action="store_true", help="a tiny model (CPU, CI)")
  p.add_argument("--budget_s", type=float, default=480.0,
                 help="seconds for the whole run (default 480: a margin under a 540 s limit); "
                 "a row expected not to finish in what is left is skipped, with the reason")
  p.add_argument("--skip_torch", action="store_true", help="only our side")
  p.add_argument("--batches", help="decode batch sizes in run order, e.g. 1,256,64,12")
  p.add_argument("--questions", help="questions per step in run order, e.g. 8,1")
  p.add_argument("--repeats", type=int, help="timed calls per row after the first")
  p.add_argument("--row_estimates", help="seconds that replace rows' prior estimates, e.g. "
                 "ours/step/8=40,torch/load=90 (say, from a first run's row_s on this machine)")
  p.add_argument("--attention_impl", default="auto",
                 choices=("auto", "einsum", "dot_product", "cudnn"),
                 help="auto: cuDNN if the preflight passes, else XLA's attention (on GPU)")
  p.add_argument("--hbm_tb_s", type=float, help="datasheet HBM bandwidth (default: by name)")
  p.add_argument("--peak_tflops", type=float, help="datasheet bf16 peak (default: by name)")
  p.add_argument("--compile_cache", default=str(CACHE_DIR),
                 help="persistent compilation cache directory ('' disables)")
  p.add_argument("--worker", choices=("preflight", "torch_probe", "ours", "torch"),
                 help=argparse.SUPPRESS)
  p.add_argument("--rows", help=argparse.SUPPRESS)
  p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _workload(args) -> wl.Workload:
  return wl.make_workload(args.tiny, args.attention_impl, args.batches, args.questions,
                          args.repeats, args.row_estimates)


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
    peer.worker(w, rows, out / "torch.json", args.deadline, sums, allow_cpu=args.tiny)
    results.RowFile(out / "torch.json").meta(forbidden_modules=forbidden_loaded())


def _command(args, worker: str, rows=(), deadline=None, attention=None) -> list:
  cmd = [sys.executable, "-m", "benchmarks.accelerator", f"--worker={worker}",
         f"--out={args.out}", f"--attention_impl={attention or args.attention_impl}",
         f"--compile_cache={args.compile_cache}"]
  for flag in ("batches", "questions", "repeats", "row_estimates"):
    if getattr(args, flag):
      cmd.append(f"--{flag}={getattr(args, flag)}")
  if rows:
    cmd.append("--rows=" + ",".join(rows))
  if deadline is not None:
    cmd.append(f"--deadline={deadline}")
  return cmd + (["--tiny"] if args.tiny else [])


_RUNNING = []  # the workers started and not yet waited for: a cut driver ends them


def _start(cmd, env: dict) -> subprocess.Popen:
  # Its own session: a timeout ends the worker and anything it started, nothing else.
  proc = subprocess.Popen(cmd, cwd=str(REPO), env={**os.environ, **env}, start_new_session=True)
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
    self.order = w.rows("ours") + w.rows("torch")

  def write(self) -> str:
    part = lambda n: results.read_json(self.out / n)  # noqa: E731
    pre = part("preflight.json") or {}
    dev = results.device_figures(pre, self.args.hbm_tb_s, self.args.peak_tflops)
    res = results.merge(self.w, {"ours": part("ours.json"), "torch": part("torch.json")}, dev,
                        self.order, self.skipped)
    ours_meta = (part("ours.json") or {}).get("meta", {})
    torch_meta = (part("torch.json") or {}).get("meta", {})
    self.attention["ran"] = ours_meta.get("self_attention_kernel")
    self.attention["hlo_cudnn_fmha_calls"] = {
        r: row.get("hlo_cudnn_fmha_calls") for r, row in res["rows"].items() if "/step/" in r}
    res.update(workload=self.w.as_dict(), versions=self.versions, preflight=pre,
               attention=self.attention, ours_meta=ours_meta, torch_meta=torch_meta,
               budget_s=self.args.budget_s, wall_s=time.time() - self.start,
               forbidden_modules=sorted(set(forbidden_loaded()) | {
                   m for d in (pre, ours_meta, torch_meta)
                   for m in d.get("forbidden_modules", [])}))
    att = res["attention"]
    att["used"] = sorted(set((att.get("ran") or {}).values())) or None
    # The compiled programs must agree with the resolved kernel: cuDNN calls in the HLO iff
    # cuDNN was resolved (None until a step row has compiled).
    calls = [sum(c.values()) for c in att["hlo_cudnn_fmha_calls"].values() if c]
    att["hlo_agrees"] = None if not calls or not att["used"] else \
        all((n > 0) == ("cudnn" in att["used"]) for n in calls)
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
  procs = {"preflight": _start(_command(args, "preflight", deadline=end),
                               {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})}
  if not args.skip_torch:
    procs["torch_probe"] = _start(_command(args, "torch_probe", deadline=end),
                                  {"JAX_PLATFORMS": "cpu"})
  timeout = min(run.budget.left(), 3 * run.w.estimate("preflight") + 60)
  for name, proc in procs.items():
    code = _finish(proc, timeout)
    if code != 0:
      print(f"[driver] {name} worker ended with {code} (None: timed out)", flush=True)
  pre = results.read_json(run.out / "preflight.json") or {}
  probe = results.read_json(run.out / "torch_probe.json") if not args.skip_torch else None
  run.versions.update(jax={k: v for k, v in pre.items() if k in (
      "jax", "jaxlib", "platform", "device_kind", "device_count", "platform_version", "cudnn",
      "cuda_runtime", "cuda_driver")}, torch=probe)
  print(f"[versions] jax sees {run.versions['jax']}", flush=True)
  print(f"[versions] torch {probe}", flush=True)
  return pre, probe


def _ours_rows(run: Run, attention: str):
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                          "0.9")}
  for rid in run.w.rows("ours"):
    why = run.budget.why_not(rid)
    if why:
      run.skipped[rid] = why
      print(f"[driver] skip {rid}: {why}", flush=True)
      continue
    expected = run.budget.expected(rid)
    limit = min(run.budget.left(), max(3 * expected, expected + 120))
    t = time.time()
    code = _finish(_start(_command(run.args, "ours", [rid], run.budget.deadline, attention), env),
                   limit)
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
    run.write()


def _torch_rows(run: Run):
  rows = run.w.rows("torch")
  why = run.budget.why_not("torch/load", run.w.estimate(rows[0]))
  if why:
    for rid in rows:
      run.skipped[rid] = why + " (with the peer's start)"
    return
  # JAX only makes the weights there: no preallocation, freed buffers go back to the device.
  env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}
  t = time.time()
  code = _finish(_start(_command(run.args, "torch", rows, run.budget.deadline), env),
                 run.budget.left())
  data = results.read_json(run.out / "torch.json") or {}
  for rid in rows:
    if not any(rid in data.get(k, {}) for k in ("rows", "skipped", "failed")):
      run.skipped[rid] = (f"the peer worker timed out after {time.time() - t:.0f} s" if code is None
                          else f"the peer worker ended (exit {code}) before this row")


def main(argv=None) -> int:
  args = parse(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.tiny:
    # The tiny model checks the code paths, not the speed: XLA:CPU's LLVM optimisation would
    # triple the compile time of the programs (the update's from ~6 s to ~17 s on 2 cores).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                 + " --xla_backend_optimization_level=0").strip()
  if args.compile_cache:
    pathlib.Path(args.compile_cache).mkdir(parents=True, exist_ok=True)
  if args.worker:
    w = _workload(args)
    run_worker(args, w)
    return 0
  run = Run(args, _workload(args))
  run.versions.update(packages=probes.package_versions(), gpu=probes.gpu_versions())
  print(f"[versions] {json.dumps(run.versions)}", flush=True)  # first: whatever happens next
  for name in WORKER_FILES + ("accelerator.json", "table.txt"):
    (out / name).unlink(missing_ok=True)
  signal.signal(signal.SIGTERM, _on_term)
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
    _ours_rows(run, attention)
    if args.skip_torch:
      run.skipped.update({rid: "--skip_torch" for rid in run.w.rows("torch")})
    else:
      _torch_rows(run)
  finally:
    for proc in list(_RUNNING):
      _end(proc)
    text = run.write()
    print("\n" + text + f"\n\nwall {time.time() - run.start:.0f} s; every figure in "
          f"{out / 'accelerator.json'}", flush=True)
  return 0
