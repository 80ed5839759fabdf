"""The memory plan of Llama-3.1-8B against the compiler, per hardware preset, on fake CPU devices.

  HF_HUB_OFFLINE=1 python -m benchmarks.plan_8b [--presets=8xh100,v5e-8] [--phases=update]
      [--dtypes=bfloat16,float32] [--json=plan_8b.json]

For each preset (configs/presets/<name>.py: gsm8k, its mesh and questions_per_step; "fsdp-8" is
gsm8k on mesh (1, 8, 1) with Q=2, to exercise the sampler's decode layout), the step's three
programs (the sampler with its CoT' rows, the scorer, the update) are compiled ahead of time
(`markovian_jax.planning.compile`) on the real Llama-3.1-8B shapes (`jax.eval_shape`: nothing is
allocated) for a mesh of the preset's layout made of fake CPU devices (32 of them, so every preset
runs at its own size), and the compiler's per-device bytes (`memory_analysis()`) are printed next
to the plan's (`markovian_jax.planning.memory`):

  arguments     what the program is given: weights, LoRA (+ AdamW state for the update)
  temporaries   what it allocates on top (+ outputs that do not alias a donated argument)
  upcast        of the temporaries, the f32 copies XLA:CPU makes of bf16 arguments (it has no
                bf16 dot; GPUs and TPUs do not make them: `plan_compile.cpu_upcast_bytes`)

The runs' dtype is bfloat16; float32 compiles the same programs without the CPU's upcasts, which
checks the plan's activations at 8B scale. The CPU compiler stands in for the accelerators' (fusion
and buffer assignment differ); the layout, and so the arguments, are the same. Each 8B program
takes about a minute to compile on a small CPU.
"""

from __future__ import annotations

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=32"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[1]
_PRESETS = flags.DEFINE_list(
  "presets",
  ["1xh100", "8xh100", "2x8xh100", "v5e-8", "v5e-32", "v5p-8", "v5p-64", "fsdp-8"],
  "Presets to compile.",
)
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "model.dtype values to compile.")
_PHASES = flags.DEFINE_list("phases", ["sample", "score", "update"], "Programs to compile.")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")

GIB = 2**30


def _preset_config(name: str, dtype: str):
  sys.path.insert(0, str(_REPO))
  if name == "fsdp-8":
    from markovian_jax.configs import base

    c = base.get_config("gsm8k")
    c.mesh.shape, c.train.questions_per_step = (1, 8, 1), 2
  else:
    path = _REPO / "configs" / "presets" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"preset_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
  c.model.dtype = dtype
  return c


def measure(name: str, dtype: str, phases) -> dict:
  """{phase: {plan/compiler arguments and temporaries in bytes, compile seconds}} of a preset."""
  import jax

  from markovian_jax.planning import compile as plan_compile
  from markovian_jax.planning import plan
  from markovian_jax.runtime import sharding
  from markovian_jax.training import config_validation

  spec = config_validation.validate(_preset_config(name, dtype))
  p = plan.make_plan(spec, num_devices=jax.device_count())
  mesh = sharding.make_mesh(p.mesh, devices=jax.devices()[: math.prod(p.mesh)])
  m = p.memory
  out = {}
  for phase in phases:
    t0 = time.perf_counter()
    compiled = plan_compile.compile_phases(
      spec, p.model, mesh, p.workload, phases=(phase,), eos_ids=(128001, 128008, 128009)
    )[phase]
    got = plan_compile.compiler_bytes(compiled)
    out[phase] = {
      "plan_arguments": _persistent(m, phase),
      "plan_temporaries": m.total(phase),
      "compiler_arguments": got["arguments"],
      "compiler_temporaries": got["temporaries"] + got["outputs"] - got["aliased"],
      "cpu_upcast": plan_compile.cpu_upcast_bytes(compiled),
      "compile_s": time.perf_counter() - t0,
    }
    print(f"{name:9s} {dtype:8s} {phase:7s} " + _row(out[phase]), flush=True)
  out["_plan"] = {
    "peak": m.peak,
    "peak_phase": m.peak_phase,
    "mesh": list(p.mesh),
    "rows": p.workload.rows,
    "questions": p.workload.questions,
    "usable_gib": p.usable_gib,
    "fits": p.fits,
  }
  return out


def _persistent(m, phase: str) -> int:
  """The plan's arguments of a program: the base weights and LoRA (and AdamW state for the
  update); the rows are a few MiB at most and left out."""
  items = {i.name: i.bytes for i in m.items if i.phase == "persistent"}
  base = items["base weights"] + items["LoRA params (fp32)"]
  return base + (items["AdamW state (fp32)"] if phase == "update" else 0)


def _row(r: dict) -> str:
  ratio = r["plan_temporaries"] / max(r["compiler_temporaries"], 1)
  rest = r["compiler_temporaries"] - r["cpu_upcast"]
  return (
    f"args plan {r['plan_arguments'] / GIB:6.2f} compiler "
    f"{r['compiler_arguments'] / GIB:6.2f} GiB | "
    f"temps plan {r['plan_temporaries'] / GIB:6.2f} compiler "
    f"{r['compiler_temporaries'] / GIB:6.2f} (upcast {r['cpu_upcast'] / GIB:5.2f}, rest "
    f"{rest / GIB:5.2f}) GiB | plan/compiler {ratio:.2f}, /rest "
    f"{r['plan_temporaries'] / max(rest, 1):.2f} | compile {r['compile_s']:.0f} s"
  )


def main(argv):
  del argv
  results = {
    f"{name}/{dtype}": measure(name, dtype, _PHASES.value)
    for name in _PRESETS.value
    for dtype in _DTYPES.value
  }
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
