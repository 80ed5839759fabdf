"""An 8B cost model without the hardware: XLA's cost analysis of our compiled 8B programs.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python -m benchmarks.cost_model [--out cost_model.json] [--model qwen3-4b|qwen3-8b]

(the two variables are set by the script itself when absent). On the CPU backend, from
`jax.eval_shape` weights (nothing is allocated), it AOT-lowers and compiles, for Llama-3.1-8B
(or, with --model, the paper's other policy Qwen3-4B, or Qwen3-8B, from their published shapes)
in bf16 with a rank-8 LoRA on every linear layer:

  * one sampler decode step (`decoder.forward` of one token per row against the KV cache, then
    the vocabulary projection: the body of the sampler's loop without the token draw) at the
    Markovian step's batch (Q = 8 questions x G = 12 CoTs + 8 reference rows = 104 rows, a
    192-token prompt + K = 100 slots) and at the sampler benchmark's largest batch (256 rows,
    256 + 100 slots);
  * the update (`train_step.Programs.update`, via `benchmarks.accelerator.step_api`) at Q = 1
    and Q = 8 (G = 12, K = 100, P = 192; remat "full", as the 8B configs run it),

each on one device and on 8 devices (mesh (8, 1, 1): the batch split, the 16 GB base replicated,
as the 8xh100 preset), and reads `compiled.cost_analysis()`:

  * compiled FLOPs (per device, times the devices) against the model FLOPs of the program
    (`accelerator.forward_flops` / `update_model_flops`: 2 per matmul parameter per position,
    2 D V per projected position, the LoRA's backward), so redundant work shows as a ratio above
    1 (rematerialisation, padding, attention, work replicated across devices);
  * bytes accessed per device against the weights + KV bytes the program must read (every
    weight but the embedding table once, the fp32 LoRA, and the whole cache of S slots);
  * the time these imply on an H100 (989.4 TFLOP/s dense bf16, 3.35 TB/s): max(FLOPs / peak,
    bytes / bandwidth) per device.

XLA's cost analysis counts the body of a while loop once, whatever its trip count, and the
layer scan is a loop. So each program is compiled twice, with the layer scan unrolled once and
twice (`jax.lax.scan` is patched while lowering; the short log-prob chunk scans are unrolled
fully): the first report is rest + layer, the second rest + 2 layer, and the program's cost is
report(1) + (L - 1) * (report(2) - report(1)) (`layer_scan_costs`; exact on a scan of matmuls,
`tests/benchmarks/test_accelerator_benchmark.py`). The figures are those of XLA:CPU's optimised
HLO: FLOPs do not depend on the backend, bytes accessed depend on its fusion decisions (a GPU fuses
differently), so read them as the traffic of this HLO as XLA:CPU fuses it. LLVM's optimisation
is turned off (`--xla_backend_optimization_level=0`): it does not change the HLO or its cost
analysis, only the compile time.
"""

from __future__ import annotations

import os

for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import accelerator as acc  # noqa: E402

H100_TFLOPS = 989.4
H100_TB_S = 3.35


@contextlib.contextmanager
def layer_unroll(layers: int, unroll: int):
  """Inside, every `jax.lax.scan` of length `layers` (the decoder's layer scan, which flax's
  nn.scan runs through it) is unrolled `unroll` times, and every other scan (the log-prob
  chunks) fully, so that its iterations are all counted."""
  original = jax.lax.scan

  def scan(f, init=None, xs=None, length=None, reverse=False, **kw):
    kw.pop("unroll", None)
    n = length if length is not None else jax.tree.leaves(xs)[0].shape[0]
    return original(
      f, init, xs, length=length, reverse=reverse, unroll=unroll if n == layers else True, **kw
    )

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = original


def _mesh(devices: int):
  from markovian_jax.runtime import sharding

  if devices == 1:
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  return sharding.make_mesh((devices, 1, 1), devices=jax.devices()[:devices])


def _abstract(tree, shardings):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def _weights(config, w, mesh):
  """(params, lora) as sharded ShapeDtypeStructs."""
  from markovian_jax.models import init_params
  from markovian_jax.runtime import sharding
  from markovian_jax.training import train_step

  params = jax.eval_shape(lambda key: init_params(config, key), jax.random.PRNGKey(0))
  lora = jax.eval_shape(lambda: acc.init_adapter(config, w))
  return (
    _abstract(params, sharding.param_shardings(params, mesh)),
    _abstract(lora, train_step.tree_shardings(lora, mesh)),
  )


def _costs(compiled) -> tuple:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def decode_step_cost(config, w, batch: int, slots: int, devices: int, unroll: int = 1) -> tuple:
  """(flops, bytes accessed) per device, as XLA reports them, of one decode step's compiled
  program with the layer scan unrolled `unroll` times."""
  from markovian_jax.models import decoder
  from markovian_jax.runtime import sharding

  mesh = _mesh(devices)
  params, lora = _weights(config, w, mesh)
  dtype = jnp.dtype(config.dtype)
  k_shape, v_shape = decoder.cache_shape(config, batch, slots)
  cache = (
    jax.ShapeDtypeStruct(k_shape, dtype, sharding=sharding.cache_sharding(mesh, k_shape)),
    jax.ShapeDtypeStruct(
      v_shape, dtype, sharding=sharding.cache_sharding(mesh, v_shape, values=True)
    ),
  )
  row = lambda shape, dt: jax.ShapeDtypeStruct(  # noqa: E731
    shape, dt, sharding=sharding.batch_sharding(mesh, shape)
  )

  def step(params, lora, tok, pos, cache, slot_mask, index):
    h, cache = decoder.forward(
      config,
      params,
      tok[:, None],
      positions=pos[:, None],
      lora=lora,
      cache=cache,
      cache_index=index,
      cache_mask=slot_mask,
    )
    return decoder.project(config, params, h[:, 0]), cache

  fn = jax.jit(step, donate_argnums=(4,))
  with layer_unroll(config.num_layers, unroll):
    lowered = fn.lower(
      params,
      lora,
      row((batch,), jnp.int32),
      row((batch,), jnp.int32),
      cache,
      row((batch, slots), jnp.bool_),
      jax.ShapeDtypeStruct((), jnp.int32),
    )
  return _costs(lowered.compile())


def update_cost(config, w, q: int, devices: int, unroll: int = 1) -> tuple:
  """(flops, bytes accessed) per device, as XLA reports them, of the update program for Q
  questions with the layer scans unrolled `unroll` times."""
  mesh = _mesh(devices)
  params, lora = _weights(config, w, mesh)
  api = acc.step_api(config, w, mesh, lora)
  opt = _abstract(jax.eval_shape(api.tx.init, lora), api.opt_shardings)
  batch, targets = api.abstract_batch(q)
  a = api.update_args(params, lora, opt, batch, targets, jax.ShapeDtypeStruct((2,), jnp.uint32))
  with layer_unroll(config.num_layers, unroll):
    lowered = api.programs.update.lower(*a.args, **a.static)
  return _costs(lowered.compile())


def layer_scan_costs(fn, layers: int) -> tuple:
  """fn(unroll) -> XLA's (flops, bytes) of a program whose layer scan is unrolled `unroll` times.

  XLA counts a loop body once: with the layer scan unrolled once the report is rest + layer,
  twice rest + 2 layer. So the program's cost is report(1) + (layers - 1) * (report(2) -
  report(1)): the scanned program itself, each layer counted."""
  if layers < 2 or layers % 2:
    raise ValueError(f"the layer count must be even and >= 2, got {layers}")
  one, two = np.array(fn(1)), np.array(fn(2))
  return tuple(float(x) for x in one + (layers - 1) * (two - one))


def rows(config, w, decode_shapes, questions, device_counts, log=print, bf16=True) -> list:
  """Every program x layout: model and compiled costs, and the implied H100 time.

  Each program is compiled twice: as it runs (bf16 weights and matmuls) and in fp32. XLA:CPU
  has no bf16 matmuls: it converts the bf16 weights and the whole KV cache to fp32 inside the
  program, which adds FLOPs (converts count) and traffic a GPU does not have. The fp32 program
  has the same structure without those converts; its bytes / 2 estimate the bf16 program's
  traffic with this HLO's fusions. `bf16=False` compiles only the fp32 program (every figure
  but the bf16_* columns, which are then None)."""
  out = []
  layers = config.num_layers
  f32 = config.replace(dtype="float32", param_dtype="float32")
  kv_slot = acc.kv_bytes_per_slot(config)
  weights = acc.weight_bytes_per_decode_step(config, w.lora_rank)
  programs = []
  for batch, slots in decode_shapes:
    programs.append(
      (
        f"decode step B={batch}, S={slots}",
        acc.forward_flops(config, batch, batch, w.lora_rank),
        lambda c, d, u, b=batch, s=slots: decode_step_cost(c, w, b, s, d, u),
        lambda d, b=batch, s=slots: weights + b * s * kv_slot / d,
      )
    )
  for q in questions:
    programs.append(
      (
        f"update Q={q}, G={w.group}, K={w.cot}, P={w.step_prompt}",
        acc.update_model_flops(config, w, q),
        lambda c, d, u, q=q: update_cost(c, w, q, d, u),
        None,
      )
    )
  for name, model_flops, cost, floor in programs:
    for d in device_counts:
      t = time.perf_counter()
      as_run = layer_scan_costs(lambda u: cost(config, d, u), layers) if bf16 else None
      fp32 = layer_scan_costs(lambda u: cost(f32, d, u), layers)
      out.append(
        _row(name, d, model_flops, as_run, fp32, floor and floor(d), time.perf_counter() - t)
      )
      log(out[-1])
  return out


def scanned_matmul_bytes_ratio(batch=104, d=4096, f=14336, layers=32) -> float:
  """XLA:CPU's bytes accessed for x [B, d] through `layers` scanned [d, f] fp32 matmuls, over
  the weights' bytes: what its cost analysis charges for reading stacked weights in a scan
  (the layer's slice is copied out of the stack, then read by the matmul)."""

  def fn(u):
    def f_(x, ws):
      return jax.lax.scan(lambda h, w_: (h + jnp.tanh(h @ w_)[:, :d], None), x, ws)[0]

    with layer_unroll(layers, u):
      compiled = (
        jax.jit(f_)
        .lower(
          jax.ShapeDtypeStruct((batch, d), jnp.float32),
          jax.ShapeDtypeStruct((layers, d, f), jnp.float32),
        )
        .compile()
      )
    return _costs(compiled)

  return layer_scan_costs(fn, layers)[1] / (layers * d * f * 4)


def _row(program, devices, model_flops, bf16, fp32, floor_bytes, seconds) -> dict:
  """bf16 (None: not compiled), fp32: (flops, bytes accessed) per device; floor_bytes: weights +
  KV per device."""
  bf16_flops, bf16_bytes = bf16 or (None, None)
  row = {
    "program": program,
    "devices": devices,
    "model_tflop": model_flops / 1e12,
    "tflop_per_device": fp32[0] / 1e12,
    "flops_ratio": fp32[0] * devices / model_flops,
    "bf16_tflop_per_device": _scaled(bf16_flops, 1e-12),
    "bf16_flops_ratio": _scaled(bf16_flops, devices / model_flops),
    "bytes_gb_per_device": fp32[1] / 2 / 1e9,
    "bf16_bytes_gb_per_device": _scaled(bf16_bytes, 1e-9),
    "floor_gb_per_device": None,
    "bytes_ratio": None,
    "bf16_bytes_ratio": None,
    "h100_compute_ms": fp32[0] / (H100_TFLOPS * 1e12) * 1e3,
    "h100_floor_memory_ms": None,
    "h100_hlo_memory_ms": fp32[1] / 2 / (H100_TB_S * 1e9),
    "compile_s": seconds,
  }
  if floor_bytes:
    row.update(
      floor_gb_per_device=floor_bytes / 1e9,
      bytes_ratio=fp32[1] / 2 / floor_bytes,
      bf16_bytes_ratio=_scaled(bf16_bytes, 1 / floor_bytes),
      h100_floor_memory_ms=floor_bytes / (H100_TB_S * 1e9),
    )
  return row


def _scaled(x, by):
  return None if x is None else x * by


def markdown(result: list) -> str:
  f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
  lines = [
    "| program | devices | model TFLOP | compiled TFLOP per device (x devices / model) "
    "| weights + KV per device | bytes accessed per device (/ weights + KV) | "
    "H100 ms per device: compute / memory at weights + KV / memory at the HLO's bytes |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in result:
    lines.append(
      f"| {r['program']} | {r['devices']} | {r['model_tflop']:.3f} | "
      f"{r['tflop_per_device']:.3f} (**{r['flops_ratio']:.2f}**; bf16 on XLA:CPU "
      f"{f(r['bf16_flops_ratio'], '.2f')}) | {f(r['floor_gb_per_device'], '.1f')} GB | "
      f"{r['bytes_gb_per_device']:.1f} GB (**{f(r['bytes_ratio'], '.2f')}**; bf16 on XLA:CPU "
      f"{f(r['bf16_bytes_gb_per_device'], '.0f')} GB) | {r['h100_compute_ms']:.1f} / "
      f"{f(r['h100_floor_memory_ms'], '.1f')} / {r['h100_hlo_memory_ms']:.1f} |"
    )
  return "\n".join(lines)


# --model: name -> hub id whose published shapes `planning.shapes` knows offline.
MODELS = {
  "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
  "qwen3-4b": "Qwen/Qwen3-4B",
  "qwen3-8b": "Qwen/Qwen3-8B",
}


def model_config(name: str):
  """The bf16 config of `name` (MODELS) with the einsum attention (XLA:CPU's cost analysis)."""
  if name == "llama-3.1-8b":
    return acc.llama31_8b(attention_impl="einsum")
  from markovian_jax.planning import shapes

  config, _ = shapes.model_config(MODELS[name], "bfloat16")
  return config.replace(attention_impl="einsum")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="write the rows as JSON here")
  parser.add_argument("--devices", default="1,8", help="layouts (device counts)")
  parser.add_argument(
    "--layers",
    type=int,
    default=None,
    help="extrapolate to this many layers (default: the model's)",
  )
  parser.add_argument("--only", choices=("decode", "update"), help="one program kind")
  parser.add_argument(
    "--model",
    default="llama-3.1-8b",
    choices=sorted(MODELS),
    help="whose published shapes (Qwen3: the paper's other policy)",
  )
  args = parser.parse_args(argv)
  config = model_config(args.model)
  config = config.replace(num_layers=args.layers or config.num_layers)
  w = acc.Workload(args.model, config)
  decode = (
    []
    if args.only == "update"
    else [(8 * w.group + 8, w.step_prompt + w.cot), (256, w.sampler_prompt + w.sampler_new)]
  )
  questions = [] if args.only == "decode" else list(w.questions)
  devices = [int(d) for d in args.devices.split(",")]
  t = time.perf_counter()
  result = rows(
    config, w, decode, questions, devices, log=lambda r: print(json.dumps(r), flush=True)
  )
  calibration = scanned_matmul_bytes_ratio()
  text = markdown(result) + (
    f"\n\nCalibration: XLA:CPU charges a scan of 32 [4096, 14336] fp32 matmuls at batch 104 "
    f"{calibration:.2f}x the weights' bytes."
  )
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  print(
    f"\n{text}\n\njax {jax.__version__}, {jax.devices()[0].platform}, {stamp}, "
    f"{time.perf_counter() - t:.0f} s"
  )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(
        {
          "rows": result,
          "scanned_matmul_bytes_ratio": calibration,
          "jax": jax.__version__,
          "date": stamp,
        },
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
