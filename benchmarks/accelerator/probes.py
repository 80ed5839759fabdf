"""What the run starts with, before any row: versions (printed first), the compilation cache, the
cuDNN attention preflight, the bandwidth and matmul peak measured on this device, and whether
torch can run its peer rows on the same accelerator."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import time
from typing import Optional

from benchmarks.accelerator import workload as wl

DISTRIBUTIONS = (
  "jax",
  "jaxlib",
  "jax-cuda12-plugin",
  "jax-cuda13-plugin",
  "jax-cuda12-pjrt",
  "jax-cuda13-pjrt",
  "nvidia-cudnn-cu12",
  "nvidia-cudnn-cu13",
  "flax",
  "optax",
  "torch",
  "transformers",
  "peft",
)


def package_versions() -> dict:
  """Installed versions (None: absent), read from the package metadata without importing."""
  out = {}
  for name in DISTRIBUTIONS:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def gpu_versions() -> dict:
  """GPU names, driver and the driver's CUDA version from nvidia-smi ({} without one)."""
  try:
    query = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      timeout=30,
    )
    header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return {}
  if query.returncode:
    return {}
  gpus = [
    dict(zip(("name", "driver", "memory"), (s.strip() for s in line.split(","))))
    for line in query.stdout.strip().splitlines()
  ]
  cuda = re.search(r"CUDA Version:\s*([\d.]+)", header.stdout)
  return {"gpus": gpus, "driver_cuda": cuda and cuda.group(1)}


def enable_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache in `path` (every program, however fast it compiled):
  a second run on the same machine loads its executables instead of compiling them."""
  import jax

  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def jax_versions() -> dict:
  """jax's view: its version, the device, and the CUDA / cuDNN it runs with (GPU only)."""
  import jax
  import jaxlib

  dev = jax.devices()[0]
  out = {
    "jax": jax.__version__,
    "jaxlib": getattr(jaxlib, "__version__", None),
    "platform": dev.platform,
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "platform_version": getattr(dev.client, "platform_version", None),
  }
  try:  # private, and present only in CUDA builds: versions are optional facts
    from jax._src.lib import cuda_versions

    if cuda_versions is not None:
      out.update(
        cudnn=cuda_versions.cudnn_get_version(),
        cuda_runtime=cuda_versions.cuda_runtime_get_version(),
        cuda_driver=cuda_versions.cuda_driver_get_version(),
      )
  except Exception as e:  # noqa: BLE001 - any failure means "unknown", recorded as such
    out["cuda_versions_error"] = repr(e)[:200]
  return out


def attention_layouts(w: wl.Workload) -> list:
  """(what, rows, length, with gradient) of every self-attention the rows run: the update's
  prompt pass (differentiated), the scorer's answer rows, the sampler's prefill."""
  prefill = -(-w.sampler_prompt // wl.SAMPLER_BUCKET) * wl.SAMPLER_BUCKET
  return [
    ("update prompt pass", max(w.questions), w.step_prompt, True),
    ("score answer rows", max(w.questions) * w.group, w.answer_len, False),
    ("sampler prefill", max(w.batches), prefill, False),
  ]


def attention_preflight(w: wl.Workload, kernel: str = "cudnn", gpu_only: bool = True) -> dict:
  """Compile and run `kernel`'s attention (cuDNN's; forward, and gradient where the step
  differentiates it) at each real layout, through the library's own call, against XLA's.
  Returns {"ok": bool, "layouts": [...], "reason"}; `gpu_only=False` lets a CPU test see the
  failure path."""
  import jax
  import jax.numpy as jnp

  from markovian_jax.models import decoder

  c = w.config
  if gpu_only and jax.default_backend() != "gpu":
    return {
      "ok": False,
      "layouts": [],
      "reason": f"{jax.default_backend()} backend: cuDNN attention is GPU only",
    }
  results = []
  for what, b, t, grad in attention_layouts(w):
    key = jax.random.split(jax.random.PRNGKey(t), 3)
    q = jax.random.normal(key[0], (b, t, c.num_heads, c.head_dim), jnp.bfloat16)
    k, v = (
      jax.random.normal(kk, (b, t, c.num_kv_heads, c.head_dim), jnp.bfloat16) for kk in key[1:]
    )
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

    def run(kernel):
      f = lambda q, k, v: decoder._dot_product_attention(kernel, q, k, v, mask)  # noqa: E731
      out = jax.jit(f)(q, k, v)
      g = (
        jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2), (0, 1, 2)))(q, k, v)
        if grad
        else ()
      )
      return jax.block_until_ready((out, g))

    entry = {"what": what, "rows": b, "length": t, "gradient": grad}
    t0 = time.perf_counter()
    try:
      out, g = run(kernel)
    except Exception as e:  # noqa: BLE001 - whatever cuDNN raises, the run falls back to XLA
      entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      results.append(entry)
      return {
        "ok": False,
        "layouts": results,
        "reason": f"{kernel} failed at {what} [{b}, {t}]: {entry['error']}",
      }
    entry["seconds"] = time.perf_counter() - t0
    ref, ref_g = (out, g) if kernel == "xla" else run("xla")
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    diff = lambda a, r: float(jnp.max(jnp.abs(f32(a) - f32(r))))  # noqa: E731
    entry["max_abs_diff_vs_xla"] = diff(out, ref)
    entry["grad_max_rel_diff_vs_xla"] = max(
      (diff(a, r) / max(float(jnp.max(jnp.abs(f32(r)))), 1e-6) for a, r in zip(g, ref_g)),
      default=None,
    )
    results.append(entry)
    # Outputs are means of N(0, 1) values: bf16 rounding is ~0.004; 0.1 means a wrong result.
    if entry["max_abs_diff_vs_xla"] > 0.1 or (entry["grad_max_rel_diff_vs_xla"] or 0) > 0.1:
      return {"ok": False, "layouts": results, "reason": f"{kernel} disagrees with XLA at {what}"}
  return {"ok": True, "layouts": results, "reason": None}


def copy_bandwidth_tb_s(nbytes: int, calls: int = 20) -> float:
  """Device-to-device bandwidth of an elementwise copy (read + write of `nbytes`), best of 3."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda x: x + jnp.bfloat16(1))
  jax.block_until_ready(f(x))
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(calls):  # one stream runs them in order: the last one done, all are
      y = f(x)  # each earlier output is freed once computed: one or two copies live, not 20
    jax.block_until_ready(y)
    best = min(best, (time.perf_counter() - t) / calls)
  return 2 * nbytes / best / 1e12


def matmul_tflops(n: int, calls: int = 20) -> float:
  """bf16 [n, n] @ [n, n] (fp32 accumulation, bf16 out) TFLOP/s, best of 3."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(calls):
      y = f(a, b)
    jax.block_until_ready(y)
    best = min(best, (time.perf_counter() - t) / calls)
  return 2 * n**3 / best / 1e12


def preflight(w: wl.Workload, tiny_run: bool) -> dict:
  """The preflight worker's figures: jax's versions, the attention preflight, the measured
  copy bandwidth and matmul peak (small sizes for --tiny)."""
  out = jax_versions()
  print(f"[preflight] {out}", flush=True)
  t = time.perf_counter()
  out["attention"] = attention_preflight(w)
  out["attention_s"] = time.perf_counter() - t
  # --tiny: 2 MiB, a code-path check (32 MiB took ~7 s of CPU on 2 cores, most of the preflight).
  out["copy_tb_s"] = copy_bandwidth_tb_s(2**21 if tiny_run else 2**31)
  out["matmul_tflops"] = matmul_tflops(256 if tiny_run else 8192)
  print(
    f"[preflight] attention ok={out['attention']['ok']} ({out['attention']['reason']}); "
    f"copy {out['copy_tb_s']:.3f} TB/s; bf16 matmul {out['matmul_tflops']:.1f} TFLOP/s",
    flush=True,
  )
  return out


def torch_probe() -> dict:
  """torch's versions and whether it sees a CUDA device (run in its own short process)."""
  import peft
  import torch
  import transformers

  ok = torch.cuda.is_available()
  return {
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if ok else None,
    "cuda_available": ok,
    "device": torch.cuda.get_device_name(0) if ok else "cpu",
    "transformers": transformers.__version__,
    "peft": peft.__version__,
  }


def peer_stop_line(jax_platform: Optional[str], probe: Optional[dict]) -> Optional[str]:
  """The one line that stops the run when JAX has the GPU and torch has not (its peer rows
  would run on the CPU for hours); None when the peer can run where JAX runs."""
  if jax_platform not in ("gpu", "cuda", "rocm"):
    return None
  if not probe or "error" in probe:
    why = (probe or {}).get("error", "no answer from the torch probe")
    return f"error: the PyTorch peer cannot start ({why}); pass --skip_torch to run ours only"
  if not probe.get("cuda_available"):
    return (
      f"error: JAX runs on the GPU but torch {probe.get('torch')} sees none (CUDA "
      f"{probe.get('torch_cuda')}): its rows would take hours on the CPU; install the "
      "torch build for this driver (benchmarks/requirements-peers.txt) or pass --skip_torch"
    )
  return None


def cudnn_fmha_calls(hlo_text: str) -> int:
  """cuDNN fused-attention custom calls in a compiled program's HLO: the kernel that runs."""
  return len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo_text))
