"""`python -m benchmarks.accelerator`: one --tiny run (as CI runs it) whose priors skip a pair
half way, read for every figure and for the skipped rows; a run cut by SIGTERM; the pieces that
make a cut lose nothing (atomic files, the budget, the merge); the honest-figure formulas;
imports without the packages the GPU image lacks; and the cost model's layer-scan accounting."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers

# Every figure a finished row must carry (the JSON holds more: raw times, first-call times).
DECODE_FIGURES = (
  "batch",
  "full_s",
  "prefill_s",
  "tok_s",
  "decode_tok_s",
  "decode_steps_s",
  "prefill_tok_s",
  "decode_step_bytes",
  "ideal_step_bytes",
  "kernel_cache_slots",
  "roofline_steps_s",
  "hbm_roofline_fraction",
  "measured_bw_roofline_fraction",
  "ideal_roofline_fraction",
  "full_first_call_s",
  "prefill_first_call_s",
  "row_s",
)
OURS_DECODE = ("compile_s", "first_calls_wall_s")
STEP_FIGURES = (
  "questions",
  "step_s",
  "sample_s",
  "score_s",
  "update_s",
  "cot_tok_s",
  "sample_tok_s",
  "score_tok_s",
  "update_tok_s",
  "update_model_flops",
  "update_tflop_s",
  "update_mfu",
  "update_mfu_vs_measured_matmul",
  "first_step_s",
  "reward",
  "row_s",
)
BLOCKED = ("ml_collections", "tensorboardX", "gguf")  # not on the GPU image


def _numbers(row, keys, where):
  for k in keys:
    assert k in row, f"{where}: {k} missing"
    assert isinstance(row[k], (int, float)) and math.isfinite(row[k]), f"{where}: {k}={row[k]}"


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
  """One compilation cache for this module's benchmark runs: the cut run reuses the full run's
  programs (the benchmark's own cache, as a user's second run would)."""
  return tmp_path_factory.mktemp("bench_xla_cache")


def _bench(out, cache, *flags, timeout=600):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no 8 fake devices here
  env.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.accelerator",
      "--tiny",
      f"--out={out}",
      f"--compile_cache={cache}",
      *flags,
    ],
    cwd=str(helpers.REPO),
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _accounted(result):
  """Every row of the run order is in exactly one of rows / skipped / failed."""
  places = [
    set(result["rows"]),
    {s["row"] for s in result["skipped"]},
    {s["row"] for s in result["failed"]},
  ]
  for rid in result["order"]:
    assert sum(rid in p for p in places) == 1, rid
  assert set().union(*places) == set(result["order"])


# The module's one full run: --tiny at Q = 2 and 1, B = 4, with priors that make the Q = 1 pair
# never fit (10,000 s each) and every other row fit whatever this machine's speed (a budget no
# busy CI machine reaches). One run shows both every figure of every row kind (step and decode,
# ours and torch) and a budget that skips rows half way, with a later row running after them.
SKIPPED_BY_PRIORS = ("ours/step/1", "torch/step/1")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, bench_cache):
  """(process, out dir, accelerator.json, cache entries before) of the module's --tiny run, into
  an --out that holds an earlier run's file."""
  helpers.require("torch")
  helpers.require("peft")
  out = tmp_path_factory.mktemp("tiny_run") / "bench"
  out.mkdir()
  (out / "accelerator.json").write_text('{"earlier": true}')
  cached_before = set(os.listdir(bench_cache))
  proc = _bench(
    out,
    bench_cache,
    "--batches=4",
    "--hbm_tb_s=0.05",
    "--peak_tflops=0.5",
    "--budget_s=1500",
    "--row_estimates=" + ",".join(f"{r}=10000" for r in SKIPPED_BY_PRIORS),
    timeout=1600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc, out, json.loads((out / "accelerator.json").read_text()), cached_before


@pytest.mark.slow
def test_tiny_run_has_every_figure(tiny_run, bench_cache):
  proc, out, result, cached_before = tiny_run
  assert proc.stdout.startswith("[versions] ")  # versions first, whatever happens next
  assert result["order"] == [
    "ours/step/2",
    "torch/step/2",
    "ours/step/1",
    "torch/step/1",
    "ours/decode/4",
    "torch/decode/4",
  ]
  ran = [r for r in result["order"] if r not in SKIPPED_BY_PRIORS]
  assert list(result["rows"]) == ran, (result["skipped"], result["failed"])
  assert [s["row"] for s in result["skipped"]] == list(SKIPPED_BY_PRIORS)
  assert result["failed"] == []
  assert result["forbidden_modules"] == []
  dev = result["device"]
  assert (dev["kind"], dev["hbm_tb_s"], dev["peak_bf16_tflops"]) == ("cpu", 0.05, 0.5)
  assert dev["measured_copy_tb_s"] > 0 and dev["measured_matmul_bf16_tflops"] > 0
  assert result["versions"]["packages"]["jax"] and result["versions"]["torch"]["torch"]
  assert result["attention"]["used"] == ["einsum"]  # CPU: the preflight says why not cuDNN
  assert result["attention"]["hlo_agrees"] is True  # and the compiled programs call no cuDNN
  assert "cpu" in result["attention"]["reason"]
  kinds = set()
  for rid, row in result["rows"].items():
    side, kind, size = rid.split("/")
    kinds.add((side, kind))
    if kind == "decode":
      _numbers(row, DECODE_FIGURES + (OURS_DECODE if side == "ours" else ()), rid)
      assert row["batch"] == int(size)
    else:
      _numbers(row, STEP_FIGURES, rid)
      assert row["questions"] == int(size)
    assert row["peak_device_bytes"] is None  # CPU reports no device memory
    # Rewards are log-probs of a random tiny model: about -log(V) per token on both sides.
    assert kind == "decode" or -9 < row["reward"] < -4
  assert kinds == {(s, k) for s in ("ours", "torch") for k in ("step", "decode")}
  row = result["rows"]["ours/step/2"]
  assert row["compiles_in_timed_steps"] == 0  # nothing recompiles after the first step
  assert row["hlo_cudnn_fmha_calls"] == {"score": 0, "update": 0}
  # The peer runs each prompt once per CoT: its executed work exceeds the useful work.
  peer = result["rows"]["torch/step/2"]
  assert peer["update_executed_model_flops"] > peer["update_model_flops"]
  # Ours reads every slot of its cache (prompt bucketed to 64, + 32 new); torch the valid ones.
  assert result["rows"]["ours/decode/4"]["kernel_cache_slots"] == 64 + 32
  assert result["rows"]["torch/decode/4"]["kernel_cache_slots"] == 16 + 32 / 2
  assert result["torch_meta"]["weights_check"]["weight_sums_max_rel_diff"] < 1e-6
  assert result["torch_meta"]["weights_check"]["leaves"] == 12
  assert list(result["ratios"]) == ["step/2", "decode/4"]
  for key, ratio in result["ratios"].items():
    _numbers(ratio, ratio.keys(), key)
  assert (out / "table.txt").read_text().startswith("tiny on cpu")
  assert set(os.listdir(bench_cache)) - cached_before  # it wrote its persistent cache


@pytest.mark.slow
def test_budget_running_out_half_way_keeps_finished_rows_and_lists_skipped(tiny_run):
  """The module's run: priors that make the Q = 1 pair not fit, whatever this machine's speed.
  The rows before it are kept with their ratio, each skipped row says why, the decode pair
  after it still runs (a later row that fits is not skipped), the run exits 0, and an earlier
  run's files in the same --out are moved aside, not deleted."""
  proc, out, result, _ = tiny_run
  assert proc.returncode == 0
  _accounted(result)
  assert list(result["rows"]) == ["ours/step/2", "torch/step/2", "ours/decode/4", "torch/decode/4"]
  _numbers(result["rows"]["ours/step/2"], STEP_FIGURES, "step")
  _numbers(result["rows"]["torch/step/2"], STEP_FIGURES, "torch step")
  _numbers(result["ratios"]["step/2"], ("step_s", "sample_s", "score_s", "update_s"), "ratio")
  assert "step/1" not in result["ratios"]
  skipped = {s["row"]: s["reason"] for s in result["skipped"]}
  assert list(skipped) == list(SKIPPED_BY_PRIORS)
  assert all(r.startswith("budget: expected") for r in skipped.values()), skipped
  assert "skipped:" in (out / "table.txt").read_text()
  earlier = [d for d in out.iterdir() if d.name.startswith("earlier-")]
  assert len(earlier) == 1 and (earlier[0] / "accelerator.json").read_text() == '{"earlier": true}'


@pytest.mark.slow
def test_a_cut_driver_keeps_finished_rows_and_ends_its_worker(tmp_path, bench_cache):
  """SIGTERM (what `timeout` sends) after the first row: that row stays, the rest are listed
  as not reached, and the worker that was running is ended with the driver."""
  from benchmarks.accelerator import results

  out = tmp_path / "bench"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  driver = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "benchmarks.accelerator",
      "--tiny",
      f"--out={out}",
      "--skip_torch",
      f"--compile_cache={bench_cache}",
    ],
    cwd=str(helpers.REPO),
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 400
  while time.time() < deadline:
    data = results.read_json(out / "ours.json")
    if data and data.get("rows"):
      break
    assert driver.poll() is None, driver.stdout.read()[-3000:]
    time.sleep(0.5)
  # Each row has its own worker: wait for the next row's to be running, so that there is one
  # for the cut to end (read too early, the list is empty and the check below passes vacuously;
  # the first row's worker, still exiting, would end by itself).
  assert data and data.get("rows"), "no row finished in 400 s"
  finished, workers = set(data["rows"]), []
  while time.time() < deadline and not workers and driver.poll() is None:
    workers = [p for p in _worker_pids(out) if _is_running(p) and not _rows(p) & finished]
    time.sleep(0.1)
  assert workers, f"no worker of an unfinished row running after {sorted(finished)}"
  driver.send_signal(signal.SIGTERM)
  assert driver.wait(timeout=60) != 0
  result = json.loads((out / "accelerator.json").read_text())
  _accounted(result)
  assert "ours/step/2" in result["rows"]
  assert any(s["reason"].startswith("not reached") for s in result["skipped"])
  time.sleep(1)
  assert not [p for p in workers if os.path.exists(f"/proc/{p}") and _is_running(p)]


def test_a_worker_ends_itself_after_the_deadline(tmp_path):
  """The backstop for a driver killed outright: a worker past the run's deadline (plus 30 s of
  grace) ends itself by SIGALRM instead of holding the device."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu")
  t = time.time()
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.accelerator",
      "--worker=ours",
      "--rows=ours/step/2",
      "--tiny",
      f"--out={tmp_path}",
      f"--deadline={t - 29}",
      "--compile_cache=",
    ],
    cwd=str(helpers.REPO),
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == -signal.SIGALRM, proc.stderr[-2000:]
  assert time.time() - t < 60


def _worker_pids(out) -> list:
  """Processes running a worker of this run (found by their --out argument)."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
      continue
    if f"--out={out}".encode() in cmd and any(a.startswith(b"--worker=") for a in cmd):
      pids.append(int(pid))
  return pids


def _rows(pid) -> set:
  """The row ids a worker process was given (its --rows argument)."""
  try:
    cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
  except OSError:
    return set()
  return {r for a in cmd if a.startswith("--rows=") for r in a[len("--rows=") :].split(",")}


def _is_running(pid) -> bool:
  try:
    state = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0]
  except OSError:
    return False
  return state != "Z"


def test_budget_skips_what_does_not_fit_and_learns_from_finished_rows():
  from benchmarks.accelerator import results
  from benchmarks.accelerator import workload as wl

  w = wl.make_workload(True, estimates="ours/step/2=10,ours/step/1=30")
  budget = results.Budget(time.time() + 25, w)
  assert budget.why_not("ours/step/2") is None  # 10 s of 25
  assert budget.why_not("ours/step/1").startswith("budget: expected 30 s")
  budget.finished("ours/step/2", 5.0)  # half its estimate: later ours rows are expected faster
  assert budget.expected("ours/step/1") == pytest.approx(15.0)
  assert budget.why_not("ours/step/1") is None
  assert budget.expected("torch/step/2") == w.estimate("torch/step/2")  # the other side's own
  budget.finished("ours/step/1", 3000.0)  # far over: the scale is capped at 4
  assert budget.scale("ours/decode/1") == 4.0


def test_row_files_are_replaced_atomically_and_shared_by_processes(tmp_path):
  from benchmarks.accelerator import results

  path = tmp_path / "ours.json"
  a = results.RowFile(path, {"device": "x"})
  a.row("ours/step/8", {"step_s": 1.0})
  b = results.RowFile(path)  # a later process of the same side adds to the same file
  b.skip("ours/decode/1", "budget")
  b.fail("ours/decode/256", "timed out")
  data = json.loads(path.read_text())
  assert data == {
    "meta": {"device": "x"},
    "rows": {"ours/step/8": {"step_s": 1.0}},
    "skipped": {"ours/decode/1": "budget"},
    "failed": {"ours/decode/256": "timed out"},
  }
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.json"]  # no temporary left


def test_merge_accounts_for_every_row_with_each_kernels_own_floor():
  """Roofline and MFU figures against hand-computed Llama-3.1-8B numbers: 15.09 GB of weights a
  decode step reads (bf16, no embedding table, fp32 LoRA), 128 KiB of KV per slot and row."""
  from benchmarks.accelerator import results
  from benchmarks.accelerator import workload as wl

  w = wl.Workload("8b", wl.llama31_8b())
  weights = 2 * (8_030_261_248 - 128256 * 4096) + 4 * 20_971_520
  dev = {
    "kind": "NVIDIA H100",
    "platform": "gpu",
    "hbm_tb_s": 3.35,
    "peak_bf16_tflops": 989.4,
    "measured_copy_tb_s": 3.0,
    "measured_matmul_bf16_tflops": 800.0,
  }
  decode = {
    "batch": 256,
    "decode_steps_s": 50.0,
    "decode_tok_s": 12800.0,
    "prefill_tok_s": 1.0,
    "tok_s": 1.0,
  }
  step = {"questions": 8, "update_s": 2.0, "step_s": 5.0, "sample_s": 2.0, "score_s": 1.0}
  parts = {
    "ours": {
      "rows": {"ours/decode/256": decode, "ours/step/8": step},
      "failed": {"ours/step/1": "timed out"},
    },
    "torch": {
      "rows": {"torch/step/8": {**step, "update_s": 8.0, "step_s": 20.0}},
      "skipped": {"torch/decode/1": "budget"},
    },
  }
  order = w.rows("ours") + w.rows("torch")
  res = results.merge(w, parts, dev, order, {"ours/decode/12": "budget"})
  _accounted(res)
  assert [s["row"] for s in res["skipped"]][:1] == ["ours/decode/1"]  # never started
  assert res["skipped"][0]["reason"].startswith("not reached")
  row = res["rows"]["ours/decode/256"]
  own = weights + 256 * 356 * 128 * 1024  # every slot of a 256 + 100 cache
  ideal = weights + 256 * 306 * 128 * 1024  # the valid slots on average
  assert row["decode_step_bytes"] == own and row["ideal_step_bytes"] == ideal
  assert row["hbm_roofline_fraction"] == pytest.approx(50 * own / 3.35e12)
  assert row["measured_bw_roofline_fraction"] == pytest.approx(50 * own / 3.0e12)
  assert row["ideal_roofline_fraction"] == pytest.approx(50 * ideal / 3.35e12)
  ours, peer = res["rows"]["ours/step/8"], res["rows"]["torch/step/8"]
  assert ours["update_mfu"] == pytest.approx(wl.update_model_flops(w.config, w, 8) / 2 / 989.4e12)
  assert ours["update_mfu_vs_measured_matmul"] == pytest.approx(ours["update_mfu"] * 989.4 / 800)
  assert peer["update_mfu"] == pytest.approx(ours["update_mfu"] / 4)  # useful work, 4x slower
  assert res["ratios"]["step/8"]["step_s"] == pytest.approx(4.0)


def test_peer_stop_line_only_when_jax_has_the_gpu_and_torch_has_not():
  from benchmarks.accelerator import probes

  cpu_torch = {"torch": "2.13.0+cpu", "torch_cuda": None, "cuda_available": False}
  line = probes.peer_stop_line("gpu", cpu_torch)
  assert line.startswith("error: ") and "\n" not in line and "--skip_torch" in line
  assert "requirements-peers.txt" in line
  assert probes.peer_stop_line("gpu", {"error": "ImportError: no torch"}).startswith("error: ")
  assert probes.peer_stop_line("gpu", {**cpu_torch, "cuda_available": True}) is None
  assert probes.peer_stop_line("cpu", cpu_torch) is None  # --tiny on CPU: both on the CPU


def test_attention_choice_pins_cudnn_only_after_the_preflight():
  from benchmarks.accelerator import driver

  assert driver.attention_choice("auto", {"platform": "gpu", "attention": {"ok": True}}) == (
    "cudnn",
    "preflight passed",
  )
  impl, why = driver.attention_choice(
    "auto", {"platform": "gpu", "attention": {"ok": False, "reason": "cuDNN failed at x"}}
  )
  assert impl == "dot_product" and "cuDNN failed at x" in why
  assert driver.attention_choice("einsum", {"platform": "gpu"})[0] == "einsum"
  assert driver.attention_choice("auto", {"platform": "cpu", "attention": {}})[0] == "auto"


@pytest.mark.slow  # ~10-30 s of XLA:CPU compiles on 2 shared cores
def test_attention_preflight_runs_every_layout_and_reports_a_failing_kernel():
  """On CPU: XLA's kernel passes at the tiny run's three layouts (forward, and gradient for the
  update's prompt pass); cuDNN's, forced, fails at the first and says where."""
  from benchmarks.accelerator import probes
  from benchmarks.accelerator import workload as wl

  w = wl.make_workload(True)
  assert [(what, b, t, g) for what, b, t, g in probes.attention_layouts(w)] == [
    ("update prompt pass", 2, 16, True),
    ("score answer rows", 8, 14, False),
    ("sampler prefill", 4, 64, False),
  ]
  ok = probes.attention_preflight(w, kernel="xla", gpu_only=False)
  assert ok["ok"] and len(ok["layouts"]) == 3
  assert ok["layouts"][0]["max_abs_diff_vs_xla"] == 0.0
  assert ok["layouts"][0]["grad_max_rel_diff_vs_xla"] == 0.0
  bad = probes.attention_preflight(w, kernel="cudnn", gpu_only=False)
  assert not bad["ok"] and bad["reason"].startswith("cudnn failed at update prompt pass [2, 16]")
  assert probes.attention_preflight(w)["reason"] == "cpu backend: cuDNN attention is GPU only"


def test_cudnn_fmha_calls_are_counted_in_hlo_text():
  from benchmarks.accelerator import probes

  hlo = (
    '%a = custom-call(%q), custom_call_target="__cudnn$fmhaSoftmax"\n'
    '%b = custom-call(%g), custom_call_target="__cudnn$fmhaSoftmaxBackward"\n'
    '%c = custom-call(%x), custom_call_target="__cublas$gemm"'
  )
  assert probes.cudnn_fmha_calls(hlo) == 2


def test_importable_without_the_packages_the_gpu_image_lacks():
  """Every module of the benchmark, and every markovian_jax module it imports (anywhere in its
  code, found with ast), imports with ml_collections, tensorboardX and gguf made unimportable."""
  import ast
  import pathlib

  package = pathlib.Path(helpers.REPO) / "benchmarks" / "accelerator"
  imports = {
    ("benchmarks.accelerator", p.stem)
    for p in package.glob("*.py")
    if p.stem not in ("__main__", "__init__")
  }
  for path in package.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("markovian_jax"):
        imports.update((node.module, a.name) for a in node.names)
  assert ("markovian_jax.training", "train_step") in imports
  assert ("markovian_jax", "sampling") in imports
  code = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {BLOCKED!r}:
      raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
for module, name in {sorted(imports)!r}:  # `from module import name`: a submodule or an attribute
  m = importlib.import_module(module)
  if not hasattr(m, name):
    importlib.import_module(module + "." + name)
print(sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=str(helpers.REPO),
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]"


def test_8b_formulas():
  from benchmarks import accelerator as acc

  c = acc.llama31_8b()
  layer, head = acc.matmul_params(c)
  norms = (2 * c.num_layers + 1) * c.hidden_size
  assert c.num_layers * layer + head + norms + c.vocab_size * c.hidden_size == c.num_params
  assert c.num_params == 8_030_261_248
  # 20,971,520 LoRA parameters of rank 8 on all 7 projections (PEFT's count for Llama-3.1-8B).
  assert c.num_layers * acc.lora_layer_params(c, 8) == 20_971_520
  # A decode step reads 15.01 GB of bf16 weights (not the 1.05 GB embedding) + the fp32 LoRA.
  weights = 2 * (c.num_params - 128256 * 4096) + 4 * 20_971_520
  assert acc.weight_bytes_per_decode_step(c, 8) == weights
  assert acc.kv_bytes_per_slot(c) == 128 * 1024
  w = acc.Workload("8b", c)
  assert w.cache_slots == 356
  n, positions = 8 * 12, 8 * 192 + 8 * 12 * 100
  # policy forward + base forward + activation gradients (3 forwards; the LoRA's in two of
  # them), and the LoRA weight gradients (2 per LoRA parameter per position).
  expected = 3 * (
    2 * positions * c.num_layers * layer + 2 * n * 100 * head
  ) + 6 * positions * c.num_layers * acc.lora_layer_params(c, 8)
  assert acc.update_model_flops(c, w, 8) == pytest.approx(expected)
  # The PyTorch reference runs the prompt once per CoT: 96 prompts of 192, not 8.
  per_row = 3 * (2 * (n * 192 + n * 100) * c.num_layers * layer + 2 * n * 100 * head) + 6 * (
    n * 192 + n * 100
  ) * c.num_layers * acc.lora_layer_params(c, 8)
  assert acc.update_model_flops(c, w, 8, prompt_per_row=True) == pytest.approx(per_row)


def test_layer_scan_accounting_is_exact_on_a_scan_of_matmuls():
  """XLA counts a loop body once; `layer_scan_costs` recovers every layer."""
  import jax
  import jax.numpy as jnp

  from benchmarks import cost_model

  def costs(layers, unroll):
    def f(x, ws):
      return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    with cost_model.layer_unroll(layers, unroll):
      compiled = (
        jax.jit(f)
        .lower(
          jax.ShapeDtypeStruct((8, 64), jnp.float32),
          jax.ShapeDtypeStruct((layers, 64, 64), jnp.float32),
        )
        .compile()
      )
    return cost_model._costs(compiled)

  reported = costs(6, 1)[0]
  assert reported == pytest.approx(2 * 8 * 64 * 64, rel=1e-3)  # one layer: the loop body once
  flops, _ = cost_model.layer_scan_costs(lambda u: costs(6, u), 6)
  assert flops == pytest.approx(6 * 2 * 8 * 64 * 64, rel=1e-3)
  with pytest.raises(ValueError, match="even"):
    cost_model.layer_scan_costs(lambda u: costs(3, u), 3)


@pytest.mark.slow
def test_cost_model_rows_on_a_tiny_model():
  """The cost model's rows on a 2-layer model, one device: compiled FLOPs at least the model's
  (the update adds rematerialisation, so more than 1.33x), a decode step's bytes at least its
  weights and KV cache."""
  import dataclasses

  from benchmarks import accelerator as acc
  from benchmarks import cost_model

  c = acc.tiny("einsum")
  w = dataclasses.replace(
    acc.Workload("t", c),
    questions=(2,),
    group=2,
    cot=4,
    step_prompt=8,
    answer_prefix=2,
    answer_suffix=2,
    answer_span=1,
  )
  # The fp32 programs only: the figures asserted here are theirs (the bf16 compiles doubled the
  # test's time; their columns are read the same way).
  rows = cost_model.rows(c, w, [(4, 16)], [2], [1], log=lambda r: None, bf16=False)
  decode, update = rows
  assert decode["flops_ratio"] >= 1 and decode["bytes_ratio"] >= 1
  assert update["flops_ratio"] > 1.33
  assert update["bytes_ratio"] is None and update["h100_compute_ms"] > 0
  assert decode["bf16_flops_ratio"] is None and decode["bf16_bytes_ratio"] is None
  table = cost_model.markdown(rows)
  assert table.count("\n") == 3 and "decode step B=4, S=16" in table
  assert "bf16 on XLA:CPU -)" in table
