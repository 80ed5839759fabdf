"""One-command accelerator benchmark: our sampler and Markovian step against the PyTorch stack.

  python -m benchmarks.accelerator --out DIR           # Llama-3.1-8B shapes on the visible GPU
  python -m benchmarks.accelerator --out DIR --tiny    # the same code, a tiny model, on CPU (CI)

Llama-3.1-8B shapes in bf16 with random weights made on the device by `init_params` under
`jax.jit` (nothing is downloaded; 16.06 GB), and a LoRA of rank 8 (alpha 16, dropout 0.1) on every
linear layer but the head. In one command it measures:

  * sampler rows (B = 1, 12, 64, 256; a 256-token prompt, exactly 100 new tokens, T = 1, with the
    LoRA): ours is `sampling.generate`, the peer transformers' `generate` on a peft model. Each
    call is timed with N = 100 and with N = 1 (the prefill and one token), so
        decode tokens/s  = B * (N - 1) / (t[N] - t[1])
        prefill tokens/s = B * P / t[1]
    and the decode rate is given as a fraction of the HBM roofline
        bytes per decode step = W + B * (P + N / 2) * 2 * L * Hkv * Dh * 2
        roofline steps/s      = HBM bandwidth / bytes per step
    with W every weight a step reads once (all but the embedding table, which is gathered; the
    fp32 LoRA included) and the KV cache read at its mean valid length P + N / 2;
  * Markovian step rows at the GSM8K settings (Q = 1 and Q = 8 questions, G = 12 CoTs of K = 100
    tokens, a 192-token prompt): ours is the library's step (`sampling.generate_with_reference`,
    then `train_step.Programs`: score, targets, update), the peer the reference's work in
    transformers + peft (`TorchStep`). Each is split into sample / score / update, with tokens/s,
    the update's MFU (model FLOPs `update_model_flops` over the device's dense bf16 peak), peak
    device memory and, for ours, the compile time of each program;
  * the ratios ours / torch.

Each side runs in its own worker process (so each gets the whole device) with the same random
weights: both build them with the same jitted `init_params` and PRNG key, and the torch worker
copies them into `LlamaForCausalLM` tensor by tensor through DLPack (checksums of every weight are
compared). Ours runs first; the steps run before the sampler rows so that the steps' peak memory
is their own (JAX's peak is per process and only grows). The driver prints one table and writes
`DIR/accelerator.json` with every figure (and each worker's JSON).

Only the device image's packages are needed (jax, flax, optax, chex, transformers, peft, torch,
safetensors): nothing here imports ml_collections, tensorboardX or gguf, and the JSON records
that (`forbidden_modules`).

The step's use of `markovian_jax.train_step` / `objectives` / `optimizer` is all in `step_api`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
import types
from typing import Optional

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN_MODULES = ("ml_collections", "tensorboardX", "gguf")

# HBM bandwidth in TB/s by jax/torch device name prefix, most specific first.
HBM_TB_S = (("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9), ("NVIDIA H100", 3.35),
            ("NVIDIA H200", 4.8), ("NVIDIA GH200", 4.0), ("NVIDIA A100-SXM4-80GB", 2.039),
            ("NVIDIA A100 80GB PCIe", 1.935), ("NVIDIA A100", 1.555), ("TPU v5 lite", 0.819),
            ("TPU v5p", 2.765), ("TPU v6", 1.64))
# Dense bf16 peak in TFLOP/s, same matching.
PEAK_TFLOPS = (("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100", 989.4), ("NVIDIA H200", 989.4),
               ("NVIDIA GH200", 989.4), ("NVIDIA A100", 312.0), ("TPU v5 lite", 197.0),
               ("TPU v5p", 459.0), ("TPU v6", 918.0))


# ------------------------------------------------------------------ workloads

def llama31_8b(attention_impl: str = "auto", layers: int = 32):
  from markovian_jax.models import LlamaConfig, RopeScaling
  return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_layers=layers, num_heads=32, num_kv_heads=8, head_dim=128,
                     rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
                     max_position_embeddings=131072, bos_token_id=128000,
                     eos_token_ids=(128001, 128008, 128009), param_dtype="bfloat16",
                     dtype="bfloat16", remat="full", attention_impl=attention_impl)


def tiny(attention_impl: str = "auto"):
  from markovian_jax.models import LlamaConfig
  return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                     max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,),
                     param_dtype="bfloat16", dtype="bfloat16", remat="full",
                     attention_impl=attention_impl)


@dataclasses.dataclass(frozen=True)
class Workload:
  """Sizes of one benchmark run. Answer rows are [answer prompt, CoT, answer suffix] with the
  last `answer_span` suffix tokens scored (the reference's "<Redacted> ... Reasoning:{CoT}
  Answer: {a}"), built from token ids on both sides."""
  name: str
  config: object  # LlamaConfig
  batches: tuple = (1, 12, 64, 256)
  sampler_prompt: int = 256
  sampler_new: int = 100
  questions: tuple = (1, 8)
  group: int = 12
  cot: int = 100
  step_prompt: int = 192
  answer_prefix: int = 24
  answer_suffix: int = 8
  answer_span: int = 4
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.1
  kl_penalty: float = 0.1
  lr: float = 1e-4
  repeats: int = 2

  @property
  def answer_len(self) -> int:
    return self.answer_prefix + self.cot + self.answer_suffix


def workload(args) -> Workload:
  if args.tiny:
    w = Workload("tiny", tiny(args.attention_impl), batches=(1, 4), sampler_prompt=16,
                 sampler_new=32, questions=(1, 2), group=4, cot=8, step_prompt=16,
                 answer_prefix=4, answer_suffix=2, answer_span=1, repeats=1)
  else:
    w = Workload("llama-3.1-8b", llama31_8b(args.attention_impl))
  kw = {}
  if args.batches:
    kw["batches"] = tuple(int(b) for b in args.batches.split(","))
  if args.questions:
    kw["questions"] = tuple(int(q) for q in args.questions.split(","))
  if args.repeats:
    kw["repeats"] = args.repeats
  return dataclasses.replace(w, **kw)


def prompts(w: Workload, rows: int, length: int, seed: int) -> np.ndarray:
  """int32 [rows, length] random token ids (the same on both sides), avoiding the EOS ids."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, w.config.vocab_size, (rows, length)).astype(np.int32)
  return np.where(np.isin(ids, w.config.eos_token_ids), 3, ids).astype(np.int32)


def answer_rows(w: Workload, cots: np.ndarray):
  """(tokens int32 [n, A], mask bool [n, A], span bool [n, A]) for CoTs int [n, K]."""
  fixed = prompts(w, 1, w.answer_prefix + w.answer_suffix, seed=7)[0]
  n = cots.shape[0]
  tokens = np.concatenate([np.tile(fixed[:w.answer_prefix], (n, 1)), cots.astype(np.int32),
                           np.tile(fixed[w.answer_prefix:], (n, 1))], axis=1)
  span = np.zeros(tokens.shape, bool)
  span[:, -w.answer_span:] = True
  return tokens, np.ones(tokens.shape, bool), span


# ------------------------------------------------------------------ FLOP and byte models

def matmul_params(c) -> tuple:
  """(matmul parameters of one decoder layer, of the head)."""
  d, f = c.hidden_size, c.intermediate_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  return d * q + 2 * d * kv + q * d + 3 * d * f, d * c.vocab_size


def lora_layer_params(c, rank: int) -> int:
  """LoRA parameters of one layer, all 7 linear layers (a: in x r, b: r x out)."""
  d, f = c.hidden_size, c.intermediate_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  return rank * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))


def forward_flops(c, positions: int, projected: int, lora_rank: int = 0) -> float:
  """Model FLOPs of a forward pass: 2 per matmul parameter per position through the layers (the
  LoRA's too), and 2 * D * V per position projected onto the vocabulary. Attention's own
  products (QK^T, PV) are left out, as in the usual 2N-per-token count."""
  layer, head = matmul_params(c)
  return 2.0 * positions * c.num_layers * (layer + lora_layer_params(c, lora_rank)) + \
      2.0 * projected * head


def update_model_flops(c, w: Workload, q: int) -> float:
  """Model FLOPs of the update of Q questions: the policy's forward (each prompt once, the G CoTs
  of K tokens after it, log-probs on the CoT positions), the base model's forward for the exact
  KL on the same positions, and the policy's backward: activation gradients (the forward's FLOPs
  again: no base-weight gradients) plus the LoRA weight gradients (2 per LoRA parameter per
  position). Rematerialisation is not counted (it is redundant work)."""
  n = q * w.group
  positions, projected = q * w.step_prompt + n * w.cot, n * w.cot
  policy = forward_flops(c, positions, projected, w.lora_rank)
  base = forward_flops(c, positions, projected)
  lora_grads = 2.0 * positions * c.num_layers * lora_layer_params(c, w.lora_rank)
  return 2 * policy + base + lora_grads


def weight_bytes_per_decode_step(c, lora_rank: int) -> int:
  """Bytes of weights one decode step reads: every matmul weight and norm once (not the
  embedding table: a step gathers B rows of it), plus the fp32 LoRA."""
  layer, head = matmul_params(c)
  itemsize = np.dtype(_np_dtype(c.param_dtype)).itemsize
  norms = (2 * c.num_layers + 1) * c.hidden_size
  return itemsize * (c.num_layers * layer + head + norms) + \
      4 * c.num_layers * lora_layer_params(c, lora_rank)


def kv_bytes_per_slot(c) -> int:
  """Bytes of keys and values of one cache slot of one row (all layers)."""
  return 2 * c.num_layers * c.num_kv_heads * c.head_dim * np.dtype(_np_dtype(c.dtype)).itemsize


def decode_step_bytes(c, batch: int, context: float, lora_rank: int) -> float:
  """Weights + KV bytes of one decode step at a mean context of `context` valid slots."""
  return weight_bytes_per_decode_step(c, lora_rank) + batch * context * kv_bytes_per_slot(c)


def _np_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.dtype(name)


def _lookup(table, name: str) -> Optional[float]:
  for prefix, value in table:
    if name.startswith(prefix):
      return value
  return None


# ------------------------------------------------------------------ the step adapter

def step_api(config, w: Workload, mesh, lora):
  """Every use of `markovian_jax.train_step`, `objectives` and `optimizer` in the benchmarks, so
  that a change of those APIs is re-pointed here only.

  Returns a namespace:
    programs   train_step.Programs (jitted score / targets / update; for AOT lowering)
    tx         the optimizer (clip -> AdamW, constant learning rate w.lr)
    score(params, lora, answer rows, base rows) -> (answer log-probs [N, A], r [N], b [Q])
    targets(r, b) -> objectives.Targets (group baseline of R = r - b)
    batch(prompt_tokens, prompt_mask, cot_tokens, behaviour, answer rows, answer_lp, b) ->
      train_step.PolicyBatch
    update(params, lora, opt_state, batch, targets, key) -> (lora, opt_state, metrics)
    update_args(params, lora, opt_state, batch, targets, key): the positional arguments of
      `programs.update` (and its static keyword arguments as `.static`)
    place(lora) -> (lora, opt_state) laid out as `update` returns them, so that no program is
      compiled twice (once for fresh arrays, once for the update's outputs)
    opt_shardings: the optimizer state's shardings
    abstract_batch(q) -> (PolicyBatch, Targets) of sharded ShapeDtypeStructs, for AOT lowering
  Row arrays are placed batch-sharded on `mesh`.
  """
  import jax
  import jax.numpy as jnp

  from markovian_jax import objectives as obj
  from markovian_jax.training import optimizer
  from markovian_jax.runtime import sharding
  from markovian_jax.training import train_step

  settings = train_step.StepSettings(
      model=config, objective=obj.ObjectiveConfig(group_size=w.group, kl_penalty=w.kl_penalty),
      temperature=1.0)
  optim = types.SimpleNamespace(lr=w.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                                grad_clip=1.0, accumulation_steps=1, schedule="constant",
                                warmup_steps=0)
  tx = optimizer.make_optimizer(optim)
  lora_sh = train_step.tree_shardings(lora, mesh)
  opt_sh = train_step.tree_shardings(jax.eval_shape(tx.init, lora), mesh)
  programs = train_step.Programs(settings, tx, mesh, lora_sh, opt_sh)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, np.shape(x)))  # noqa: E731
  lr = np.float32(w.lr)

  def score(params, lora_, ans, base):
    window = train_step.answer_window(ans[2], base[2])
    return programs.score(params, lora_, None, *map(put, ans), *map(put, base), last_n=window)

  def targets(r, b):
    tg, _, _ = programs.targets(r, put(jnp.repeat(b, w.group)), obj.BaselineState.init())
    return tg

  def batch(p_tokens, p_mask, cot, behaviour, ans, ans_lp, b):
    return train_step.PolicyBatch(
        prompt_tokens=put(p_tokens), prompt_mask=put(p_mask), cot_tokens=put(cot),
        cot_mask=put(np.ones(cot.shape, bool)), behaviour_logprobs=put(behaviour),
        answer_tokens=put(ans[0]), answer_mask=put(ans[1]), answer_span=put(ans[2]),
        answer_logprobs=ans_lp, baseline_scores=put(jnp.repeat(b, w.group)))

  def update_args(params, lora_, opt_state, batch_, tg, key):
    args = (params, lora_, opt_state, batch_, tg, key, None, lr)
    return types.SimpleNamespace(args=args, static=dict(answer_last_n=None))

  def update(params, lora_, opt_state, batch_, tg, key):
    a = update_args(params, lora_, opt_state, batch_, tg, key)
    return programs.update(*a.args, **a.static)

  def place(lora_):
    lora_ = jax.device_put(lora_, lora_sh)
    return lora_, jax.device_put(tx.init(lora_), opt_sh)

  def abstract_batch(q):
    n, k, a, p = q * w.group, w.cot, w.answer_len, w.step_prompt
    sds = lambda shape, dt: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dt, sharding=sharding.batch_sharding(mesh, shape))
    i32, f32, bool_ = jnp.int32, jnp.float32, jnp.bool_
    batch_ = train_step.PolicyBatch(
        prompt_tokens=sds((q, p), i32), prompt_mask=sds((q, p), bool_),
        cot_tokens=sds((n, k), i32), cot_mask=sds((n, k), bool_),
        behaviour_logprobs=sds((n, k), f32), answer_tokens=sds((n, a), i32),
        answer_mask=sds((n, a), bool_), answer_span=sds((n, a), bool_),
        answer_logprobs=sds((n, a), f32), baseline_scores=sds((n,), f32))
    tg = jax.eval_shape(lambda r, b: programs.targets(r, b, obj.BaselineState.init())[0],
                        sds((n,), f32), sds((n,), f32))
    return batch_, jax.tree.map(lambda x: sds(x.shape, x.dtype), tg)

  return types.SimpleNamespace(programs=programs, tx=tx, score=score, targets=targets,
                               batch=batch, update=update, update_args=update_args, place=place,
                               opt_shardings=opt_sh, abstract_batch=abstract_batch)


# ------------------------------------------------------------------ ours

class CompileClock:
  """Seconds spent tracing, lowering and compiling (jax.monitoring), and backend compilations."""

  def __init__(self):
    import jax
    self.seconds, self.count = 0.0, 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kwargs):
    del kwargs
    if event.startswith("/jax/core/compile/"):
      self.seconds += duration
      self.count += event.endswith("backend_compile_duration")

  def read(self):
    return self.seconds, self.count


def _now():
  return time.perf_counter()


def _peak_device_bytes(device) -> Optional[int]:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def init_params_on_device(config, seed: int = 0):
  """Random weights built on the default device by one jitted program (never on the host)."""
  import jax

  from markovian_jax.models import init_params
  return jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(seed))


def init_adapter(config, w: Workload):
  import jax

  from markovian_jax.models import init_lora
  return init_lora(config, jax.random.PRNGKey(1), rank=w.lora_rank, alpha=w.lora_alpha,
                   dropout=w.lora_dropout)


def leaf_sums(params) -> dict:
  """{path: float64 sum of the leaf in fp32}: the weights' fingerprint, compared across workers."""
  import jax
  import jax.numpy as jnp

  from markovian_jax.runtime import sharding
  sums = jax.jit(lambda p: jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32)), p))(params)
  return {sharding.path_str(path): float(v)
          for path, v in jax.tree_util.tree_leaves_with_path(sums)}


def ours_worker(w: Workload) -> dict:
  import jax

  from markovian_jax import sampling
  from markovian_jax.runtime import sharding

  clock = CompileClock()
  device = jax.devices()[0]
  c = w.config
  t = _now()
  params = init_params_on_device(c)
  jax.block_until_ready(params)
  init_s = _now() - t
  lora = init_adapter(c, w)
  mesh = sharding.make_mesh((1, 1, 1), devices=[device])
  api = step_api(c, w, mesh, lora)
  lora, opt_state = api.place(lora)
  out = {"device_kind": device.device_kind, "platform": device.platform,
         "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "init_s": init_s, "weight_sums": leaf_sums(params),
         "attention_kernel": _attention_kernels(c), "step": [], "sampler": []}

  # The steps first: their peak memory is then their own.
  for q in w.questions:
    p_tokens = prompts(w, q, w.step_prompt, seed=100 + q)
    p_mask = np.ones(p_tokens.shape, bool)
    runs = []
    for i in range(1 + w.repeats):
      r, lora, opt_state = _our_step(w, api, params, lora, opt_state, p_tokens, p_mask, i, clock)
      runs.append(r)
    row = _summarise_step(w, q, runs)
    row["compile_s"] = {k: runs[0][k + "_compile_s"] for k in ("sample", "score", "update")}
    row["compiles_in_timed_steps"] = sum(r["compiles"] for r in runs[1:])
    row["peak_device_bytes"] = _peak_device_bytes(device)
    out["step"].append(row)
    print(f"[ours] step Q={q}: {row['step_s']:.3f} s (sample {row['sample_s']:.3f}, score "
          f"{row['score_s']:.3f}, update {row['update_s']:.3f})", flush=True)

  for b in w.batches:
    tokens = prompts(w, b, w.sampler_prompt, seed=b)
    mask = np.ones(tokens.shape, bool)

    def run(n, seed):
      o = sampling.generate(c, params, tokens, prompt_mask=mask, lora=lora, max_new_tokens=n,
                            min_new_tokens=n, temperature=1.0, rng=seed, eos_ids=c.eos_token_ids)
      return np.asarray(o.tokens)

    row = {"batch": b}
    for n, key in ((w.sampler_new, "full"), (1, "prefill")):
      c0 = clock.read()
      t = _now()
      assert run(n, 0).shape == (b, n)
      first = _now() - t
      row[key + "_compile_s"] = clock.read()[0] - c0[0]
      times = []
      for i in range(w.repeats):
        t = _now()
        run(n, 1 + i)
        times.append(_now() - t)
      row[key + "_s"] = float(np.mean(times))
      row[key + "_times"] = times
      row[key + "_first_call_s"] = first
    row.update(_sampler_figures(w, b, row["full_s"], row["prefill_s"]))
    row["peak_device_bytes"] = _peak_device_bytes(device)  # cumulative over the process
    out["sampler"].append(row)
    print(f"[ours] sampler B={b}: decode {row['decode_tok_s']:.1f} tok/s, prefill "
          f"{row['prefill_tok_s']:.1f} tok/s", flush=True)
  return out


def _attention_kernels(c) -> dict:
  from markovian_jax.models import llama
  return {"attention_impl": c.attention_impl, "self_attention_kernel":
          llama.attention_kernel(c, 256), "decode_and_prefix_kernel": "einsum"}


def _our_step(w, api, params, lora, opt_state, p_tokens, p_mask, seed, clock):
  """One Markovian step; returns (timings dict, lora, opt_state)."""
  import jax

  from markovian_jax import sampling
  c = w.config
  marks = [(_now(), clock.read())]
  out, ref = sampling.generate_with_reference(
      c, params, p_tokens, prompt_mask=p_mask, lora=lora, max_new_tokens=w.cot,
      min_new_tokens=w.cot, num_samples=w.group, temperature=1.0, rng=seed,
      eos_ids=c.eos_token_ids)
  cot, behaviour = np.asarray(out.tokens), np.asarray(out.logprobs)
  base = np.asarray(ref.tokens)
  marks.append((_now(), clock.read()))
  ans, base_rows = answer_rows(w, cot), answer_rows(w, base)
  ans_lp, r, b = api.score(params, lora, ans, base_rows)
  tg = api.targets(r, b)
  jax.block_until_ready(tg)
  marks.append((_now(), clock.read()))
  batch = api.batch(p_tokens, p_mask, cot, behaviour, ans, ans_lp, b)
  lora, opt_state, metrics = api.update(params, lora, opt_state, batch, tg,
                                        jax.random.PRNGKey(seed))
  metrics = {k: float(v) for k, v in metrics.items()}
  marks.append((_now(), clock.read()))
  res = {"reward": float(np.mean(np.asarray(r))), "loss": metrics.get("loss", math.nan),
         "compiles": marks[-1][1][1] - marks[0][1][1]}
  for name, (t0, c0), (t1, c1) in zip(("sample", "score", "update"), marks, marks[1:]):
    res[name + "_s"] = t1 - t0
    res[name + "_compile_s"] = c1[0] - c0[0]
  res["step_s"] = marks[-1][0] - marks[0][0]
  return res, lora, opt_state


def _summarise_step(w: Workload, q: int, runs: list) -> dict:
  """The mean of the timed runs (all but the first) with the step's throughput figures."""
  timed = runs[1:] or runs
  mean = lambda k: float(np.mean([r[k] for r in timed]))  # noqa: E731
  n = q * w.group
  row = {"questions": q, "group": w.group, "cot": w.cot, "prompt": w.step_prompt,
         "first_step_s": runs[0]["step_s"], "reward": mean("reward")}
  for k in ("step_s", "sample_s", "score_s", "update_s"):
    row[k] = mean(k)
    row[k[:-2] + "_times"] = [r[k] for r in timed]
  row["cot_tok_s"] = n * w.cot / row["step_s"]
  row["sample_tok_s"] = n * w.cot / row["sample_s"]
  row["score_tok_s"] = (n + q) * w.answer_len / row["score_s"]
  row["update_tok_s"] = (q * w.step_prompt + n * w.cot) / row["update_s"]
  row["update_model_flops"] = update_model_flops(w.config, w, q)
  row["update_tflop_s"] = row["update_model_flops"] / row["update_s"] / 1e12
  return row


def _sampler_figures(w: Workload, b: int, full_s: float, prefill_s: float) -> dict:
  n, p = w.sampler_new, w.sampler_prompt
  decode_s = max(full_s - prefill_s, 1e-9)
  steps_s = (n - 1) / decode_s
  step_bytes = decode_step_bytes(w.config, b, p + n / 2, w.lora_rank)
  return {"new_tokens": n, "prompt": p, "tok_s": b * n / full_s,
          "decode_tok_s": b * (n - 1) / decode_s, "decode_steps_s": steps_s,
          "prefill_tok_s": b * p / prefill_s, "decode_step_bytes": step_bytes}


# ------------------------------------------------------------------ torch

def torch_worker(w: Workload, ours_sums: Optional[dict]) -> dict:
  """transformers + peft on the same weights: `generate` rows and the reference's step."""
  import torch
  import transformers

  import peft
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  t = _now()
  model, check = _torch_model(w, dev, ours_sums)
  load_s = _now() - t
  out = {"torch": torch.__version__, "transformers": transformers.__version__,
         "peft": peft.__version__, "device": torch.cuda.get_device_name(dev)
         if dev.type == "cuda" else "cpu", "load_s": load_s, "weights_check": check,
         "attn_implementation": model.config._attn_implementation, "step": [], "sampler": []}
  step = TorchStep(model, w, dev)
  for q in w.questions:
    p_tokens = prompts(w, q, w.step_prompt, seed=100 + q)
    _reset_peak(dev)
    try:
      runs = [step.run(p_tokens, seed=i) for i in range(1 + w.repeats)]
    except torch.OutOfMemoryError as e:  # recorded, and the other rows still run
      out["step"].append({"questions": q, "error": f"out of memory: {str(e)[:200]}"})
      torch.cuda.empty_cache()
      continue
    row = _summarise_step(w, q, runs)
    row["peak_device_bytes"] = _torch_peak(dev)
    row["gradient_checkpointing"] = step.checkpointing
    out["step"].append(row)
    print(f"[torch] step Q={q}: {row['step_s']:.3f} s (sample {row['sample_s']:.3f}, score "
          f"{row['score_s']:.3f}, update {row['update_s']:.3f})", flush=True)

  model.eval()
  for b in w.batches:
    tokens = torch.as_tensor(prompts(w, b, w.sampler_prompt, seed=b), device=dev)
    _reset_peak(dev)
    row = {"batch": b}
    try:
      for n, key in ((w.sampler_new, "full"), (1, "prefill")):
        t = _now()
        _torch_generate(model, tokens, n, w, seed=0, sample=True)
        row[key + "_first_call_s"] = _now() - t
        times = []
        for i in range(w.repeats):
          t = _now()
          _torch_generate(model, tokens, n, w, seed=1 + i, sample=True)
          times.append(_now() - t)
        row[key + "_s"], row[key + "_times"] = float(np.mean(times)), times
    except torch.OutOfMemoryError as e:
      out["sampler"].append({"batch": b, "error": f"out of memory: {str(e)[:200]}"})
      torch.cuda.empty_cache()
      continue
    row.update(_sampler_figures(w, b, row["full_s"], row["prefill_s"]))
    row["peak_device_bytes"] = _torch_peak(dev)
    out["sampler"].append(row)
    print(f"[torch] sampler B={b}: decode {row['decode_tok_s']:.1f} tok/s, prefill "
          f"{row['prefill_tok_s']:.1f} tok/s", flush=True)
  return out


def _sync(dev):
  import torch
  if dev.type == "cuda":
    torch.cuda.synchronize(dev)


def _reset_peak(dev):
  import torch
  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev)


def _torch_peak(dev) -> Optional[int]:
  import torch
  return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None


def _torch_model(w: Workload, dev, ours_sums: Optional[dict]):
  """peft(LlamaForCausalLM) in bf16 on `dev` holding our random weights and adapter.

  The weights are made by the same jitted `init_params` as in our worker (same key, same
  program: the same numbers), then copied into torch one stacked leaf at a time through DLPack,
  each JAX leaf freed after its copy (this worker runs JAX with the platform allocator, so a
  freed buffer goes back to the device)."""
  import torch
  import transformers

  import peft
  c = w.config
  hf = {k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type",
                                                         "torch_dtype")}
  hf_config = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)
  try:
    with torch.device(dev):
      model = transformers.LlamaForCausalLM(hf_config)
  finally:
    torch.set_default_dtype(default)
  model.requires_grad_(False)
  params = init_params_on_device(c)
  ours = leaf_sums(params) if ours_sums is None else ours_sums
  targets = _hf_targets(model, c)
  mine = {}
  for path, leaf in _named_leaves(params):
    src = _to_torch(leaf, dev)
    total = 0.0
    for param, index, transpose in targets[path]:
      x = src if index is None else src[index]
      with torch.no_grad():
        param.copy_(x.T if transpose else x)
      total += float(param.float().sum())
    mine[path] = total
    del src
    leaf.delete()
  del params
  rel = max(abs(mine[k] - ours[k]) / max(abs(ours[k]), 1.0) for k in ours)

  lora = init_adapter(c, w)
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=w.lora_rank, lora_alpha=w.lora_alpha, lora_dropout=w.lora_dropout,
      target_modules="all-linear", task_type="CAUSAL_LM"))
  _copy_lora(model, lora, dev)
  return model, {"weight_sums_max_rel_diff": rel, "leaves": len(mine)}


def _named_leaves(params):
  import jax

  from markovian_jax.runtime import sharding
  return [(sharding.path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]


def _to_torch(x, dev):
  import torch
  t = torch.from_dlpack(x)
  return t if t.device == dev else t.to(dev)


_HF_LAYER = {"attn_norm/scale": ("input_layernorm", False),
             "mlp_norm/scale": ("post_attention_layernorm", False),
             "attn/q/kernel": ("self_attn.q_proj", True),
             "attn/k/kernel": ("self_attn.k_proj", True),
             "attn/v/kernel": ("self_attn.v_proj", True),
             "attn/o/kernel": ("self_attn.o_proj", True),
             "mlp/gate/kernel": ("mlp.gate_proj", True), "mlp/up/kernel": ("mlp.up_proj", True),
             "mlp/down/kernel": ("mlp.down_proj", True)}


def _hf_targets(model, c) -> dict:
  """{our leaf path: [(torch parameter, layer index or None, transpose)]}."""
  m = model.model
  out = {"embed/embedding": [(m.embed_tokens.weight, None, False)],
         "final_norm/scale": [(m.norm.weight, None, False)],
         "lm_head/kernel": [(model.lm_head.weight, None, True)]}
  for leaf, (name, transpose) in _HF_LAYER.items():
    module = lambda i, n=name: m.layers[i].get_submodule(n)  # noqa: E731
    out["layers/" + leaf] = [(module(i).weight, i, transpose) for i in range(c.num_layers)]
  return out


def _copy_lora(model, lora, dev):
  """Our adapter into peft's: lora_A.weight [r, in] = a[l].T, lora_B.weight [out, r] = b[l].T."""
  import torch
  layers = lora.params["layers"]
  pattern = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj$")
  copied = 0
  for name, module in model.named_modules():
    match = pattern.search(name)
    if not match or not hasattr(module, "lora_A"):
      continue
    i, group, proj = int(match.group(1)), match.group(2), match.group(3)
    ab = layers["attn" if group == "self_attn" else "mlp"][proj]
    with torch.no_grad():
      for key, mod in (("a", module.lora_A["default"]), ("b", module.lora_B["default"])):
        src = torch.from_numpy(np.array(ab[key][i], np.float32)).to(dev)
        mod.weight.copy_(src.T)
    copied += 1
  if copied != 7 * len(layers["attn"]["q"]["a"]):
    raise RuntimeError(f"copied {copied} LoRA pairs into peft, expected 7 per layer")


def _torch_generate(model, tokens, n: int, w: Workload, seed: int, sample: bool):
  import torch
  torch.manual_seed(seed)
  eos = list(w.config.eos_token_ids)
  kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else \
      dict(do_sample=False)
  with torch.no_grad():  # not inference_mode: the update differentiates through these tokens
    out = model.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                         max_new_tokens=n, min_new_tokens=n, eos_token_id=eos,
                         pad_token_id=eos[0], **kw)
  _sync(tokens.device)
  assert out.shape[1] == tokens.shape[1] + n, out.shape
  return out


def _checkpointing(model, on: bool):
  """Non-reentrant activation checkpointing of every decoder layer on / off (transformers 5
  renamed gradient_checkpointing_* to activation_checkpointing_*)."""
  if hasattr(model, "activation_checkpointing_enable"):
    if on:
      model.activation_checkpointing_enable(
          activation_checkpointing_kwargs={"use_reentrant": False})
    else:
      model.activation_checkpointing_disable()
  elif on:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  else:
    model.gradient_checkpointing_disable()


class TorchStep:
  """The reference's Markovian step in transformers + peft, on token ids (no tokenizer):

    sample   the policy (train mode: LoRA dropout on) `generate`s G CoTs per question (T = 1,
             exactly K tokens); the base model (adapter disabled) greedily generates one CoT'
    score    answer rows [answer prompt, CoT, answer] through the policy without gradient, the
             CoT' rows through the base; r, b = mean answer-token log-probs; R = r - b;
             advantages standardised within each question's group
    update   teacher-forced [prompt; CoT] through the policy (with gradient) and the base
             (without); log-probs / T and the exact full-vocabulary KL on the CoT positions;
             loss = mean(-lp * A + kl_penalty * KL); backward, clip_grad_norm(1.0), AdamW.

  Logits are computed only where they are used (`logits_to_keep`), which spares torch the
  prompt positions' vocabulary projection (ours skips them too). With our remat on (8B), the
  update runs with gradient checkpointing (non-reentrant), switched off again for `generate`,
  where it would disable the KV cache."""

  def __init__(self, model, w: Workload, dev):
    import torch
    self.torch, self.model, self.w, self.dev = torch, model, w, dev
    self.trainable = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.trainable, lr=w.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.01)
    self.checkpointing = w.config.remat != "none"

  def _answer_logprob(self, rows):
    torch, k = self.torch, self.w.answer_span
    tokens = torch.as_tensor(rows, device=self.dev)
    logits = self.model(input_ids=tokens, logits_to_keep=k + 1).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens[:, -k:, None])[..., 0].mean(-1)

  def run(self, p_tokens: np.ndarray, seed: int) -> dict:
    torch, w, model = self.torch, self.w, self.model
    g, k = w.group, w.cot
    torch.manual_seed(seed)
    model.train()
    prompt = torch.as_tensor(p_tokens, device=self.dev)
    t0 = _now()
    with torch.no_grad():
      seqs = _torch_generate(model, prompt.repeat_interleave(g, 0), k, w, seed, sample=True)
      with model.disable_adapter():
        base = _torch_generate(model, prompt, k, w, seed, sample=False)
    t1 = _now()
    p = prompt.shape[1]
    ans, _, _ = answer_rows(w, seqs[:, p:].cpu().numpy())
    base_ans, _, _ = answer_rows(w, base[:, p:].cpu().numpy())
    with torch.no_grad():
      r = self._answer_logprob(ans)
      with model.disable_adapter():
        b = self._answer_logprob(base_ans)
    big_r = (r - b.repeat_interleave(g)).view(-1, g)
    adv = ((big_r - big_r.mean(-1, keepdim=True)) / (big_r.std(-1, keepdim=True) + 1e-8)).view(-1)
    _sync(self.dev)
    t2 = _now()
    _checkpointing(model.base_model.model, self.checkpointing)
    try:
      kw = dict(logits_to_keep=k + 1, use_cache=False)
      logits = model(input_ids=seqs, **kw).logits[:, :-1]
      with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=seqs, **kw).logits[:, :-1]
      logp = torch.log_softmax(logits.float(), dim=-1)
      ref = torch.log_softmax(ref_logits.float(), dim=-1)
      lp = logp.gather(-1, seqs[:, -k:, None])[..., 0].mean(-1)
      kl = (logp.exp() * (logp - ref)).sum(-1).mean(-1)
      loss = (-lp * adv.detach() + w.kl_penalty * kl).mean()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
      _sync(self.dev)
    finally:
      _checkpointing(model.base_model.model, False)
    t3 = _now()
    return {"sample_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0,
            "reward": float(r.mean()), "loss": float(loss)}


# ------------------------------------------------------------------ driver

def _ratio(num, den):
  return None if num is None or den is None or not den else num / den


def merge(w: Workload, ours: dict, theirs: Optional[dict], hbm_tb_s: Optional[float],
          peak_tflops: Optional[float]) -> dict:
  """Every figure, with the roofline fractions, MFU and ratios filled in."""
  kind = ours["device_kind"]
  hbm = hbm_tb_s if hbm_tb_s is not None else _lookup(HBM_TB_S, kind)
  peak = peak_tflops if peak_tflops is not None else _lookup(PEAK_TFLOPS, kind)
  for side in filter(None, (ours, theirs)):
    for row in side["sampler"]:
      if "error" in row:
        continue
      roof = None if hbm is None else hbm * 1e12 / row["decode_step_bytes"]
      row["roofline_steps_s"] = roof
      row["hbm_roofline_fraction"] = _ratio(row["decode_steps_s"], roof)
    for row in side["step"]:
      if "error" not in row:
        row["update_mfu"] = None if peak is None else row["update_tflop_s"] / peak
  ratios = {"sampler": [], "step": []}
  if theirs:
    for o, t in zip(ours["sampler"], theirs["sampler"]):
      ok = "error" not in t
      ratios["sampler"].append({"batch": o["batch"], **{
          k: _ratio(o[k], t[k]) if ok else None
          for k in ("decode_tok_s", "prefill_tok_s", "tok_s")}})
    for o, t in zip(ours["step"], theirs["step"]):
      ok = "error" not in t
      ratios["step"].append({"questions": o["questions"], **{
          k: _ratio(t[k], o[k]) if ok else None
          for k in ("step_s", "sample_s", "score_s", "update_s")}})
  c = w.config
  formula = ("bytes/step = W + B * (P + N/2) * 2*L*Hkv*Dh*2 bytes; W = "
             f"{weight_bytes_per_decode_step(c, w.lora_rank) / 1e9:.3f} GB (weights a decode "
             "step reads: all but the embedding table, + fp32 LoRA), KV = "
             f"{kv_bytes_per_slot(c) / 2**10:.0f} KiB per slot and row; roofline steps/s = "
             f"HBM {hbm} TB/s / bytes per step")
  return {"workload": {k: v for k, v in dataclasses.asdict(w).items() if k != "config"},
          "model": {**dataclasses.asdict(c), "num_params": c.num_params},
          "device": {"kind": kind, "hbm_tb_s": hbm, "peak_bf16_tflops": peak},
          "hbm_roofline_formula": formula,
          "definitions": {
              "decode_tok_s": "B * (N - 1) / (t[N new tokens] - t[1 new token])",
              "prefill_tok_s": "B * P / t[1 new token]",
              "tok_s": "B * N / t[N new tokens]",
              "cot_tok_s": "Q * G * K sampled CoT tokens / step time",
              "sample_tok_s": "Q * G * K / sample time",
              "score_tok_s": "(Q * G + Q) answer rows * A tokens / score time",
              "update_tok_s": "(Q * P + Q * G * K) positions / update time",
              "update_mfu": "update_model_flops / update time / dense bf16 peak",
              "ratios.sampler": "ours / torch throughput", "ratios.step": "torch / ours time"},
          "ours": ours, "torch": theirs, "ratios": ratios}


def _fmt(x, spec=".1f", none="-"):
  return none if x is None else format(x, spec)


def table(result: dict) -> str:
  ours, theirs, ratios = result["ours"], result["torch"], result["ratios"]
  lines = [f"{result['workload']['name']} on {result['device']['kind']} "
           f"(HBM {result['device']['hbm_tb_s']} TB/s, peak {result['device']['peak_bf16_tflops']}"
           " TFLOP/s bf16)", result["hbm_roofline_formula"], "",
           "sampler  B | ours decode tok/s (% HBM roofline) | ours prefill tok/s | compile s | "
           "torch decode tok/s | torch prefill tok/s | decode x | prefill x"]
  for i, o in enumerate(ours["sampler"]):
    t = theirs["sampler"][i] if theirs else {}
    rt = ratios["sampler"][i] if theirs else {}
    frac = o.get("hbm_roofline_fraction")
    lines.append(
        f"  {o['batch']:>8} | {o['decode_tok_s']:>10.1f} ({_fmt(frac and 100 * frac)}%) | "
        f"{o['prefill_tok_s']:>10.1f} | {o['full_compile_s'] + o['prefill_compile_s']:>6.1f} | "
        f"{_fmt(t.get('decode_tok_s')):>10} | {_fmt(t.get('prefill_tok_s')):>10} | "
        f"{_fmt(rt.get('decode_tok_s'), '.2f')}x | {_fmt(rt.get('prefill_tok_s'), '.2f')}x"
        + (f"  torch: {t['error']}" if "error" in t else ""))
  lines += ["", "step    Q | side  | step s | sample s | score s | update s | CoT tok/s | "
            "update MFU | peak GB | compile s (sample/score/update)"]
  for i, o in enumerate(ours["step"]):
    for name, row in (("ours", o), ("torch", theirs["step"][i] if theirs else None)):
      if row is None:
        continue
      if "error" in row:
        lines.append(f"  {o['questions']:>6} | torch | {row['error']}")
        continue
      peak = row.get("peak_device_bytes")
      comp = row.get("compile_s")
      lines.append(
          f"  {o['questions']:>6} | {name:<5} | {row['step_s']:6.3f} | {row['sample_s']:8.3f} | "
          f"{row['score_s']:7.3f} | {row['update_s']:8.3f} | {row['cot_tok_s']:9.1f} | "
          f"{_fmt(row.get('update_mfu'), '.3f'):>10} | {_fmt(peak and peak / 1e9, '.2f'):>7} | "
          + ("/".join(f"{comp[k]:.1f}" for k in ("sample", "score", "update")) if comp else "-"))
    if theirs:
      r = ratios["step"][i]
      lines.append(f"  {'':>6} | torch/ours: step {_fmt(r['step_s'], '.2f')}x, sample "
                   f"{_fmt(r['sample_s'], '.2f')}x, score {_fmt(r['score_s'], '.2f')}x, update "
                   f"{_fmt(r['update_s'], '.2f')}x")
  return "\n".join(lines)


def _forbidden_loaded() -> list:
  return sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN_MODULES)


def _worker_cmd(args, name: str) -> list:
  cmd = [sys.executable, "-m", "benchmarks.accelerator", f"--worker={name}", f"--out={args.out}",
         f"--attention_impl={args.attention_impl}"]
  for flag in ("batches", "questions", "repeats"):
    if getattr(args, flag):
      cmd.append(f"--{flag}={getattr(args, flag)}")
  if args.tiny:
    cmd.append("--tiny")
  return cmd


def _run_worker(args, name: str, env: dict) -> dict:
  path = pathlib.Path(args.out) / f"{name}.json"
  path.unlink(missing_ok=True)
  t = _now()
  proc = subprocess.run(_worker_cmd(args, name), cwd=str(REPO), env={**os.environ, **env})
  if proc.returncode or not path.exists():
    raise RuntimeError(f"the {name} worker failed (exit {proc.returncode}); its log is above")
  data = json.loads(path.read_text())
  data["worker_wall_s"] = _now() - t
  return data


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="directory for the JSON files")
  parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU, CI)")
  parser.add_argument("--skip_torch", action="store_true", help="only our side")
  parser.add_argument("--batches", help="sampler batch sizes, e.g. 1,12,64,256")
  parser.add_argument("--questions", help="questions per step, e.g. 1,8")
  parser.add_argument("--repeats", type=int, help="timed calls per row after the first")
  parser.add_argument("--attention_impl", default="auto",
                      choices=("auto", "einsum", "dot_product", "cudnn"))
  parser.add_argument("--hbm_tb_s", type=float, help="HBM bandwidth (default: by device name)")
  parser.add_argument("--peak_tflops", type=float, help="dense bf16 peak (default: by device)")
  parser.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.tiny:
    # The tiny model checks the code paths, not the speed: XLA:CPU's LLVM optimisation would
    # triple the compile time of the programs (the update's from ~6 s to ~17 s on 2 cores).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                 + " --xla_backend_optimization_level=0").strip()
  w = workload(args)

  if args.worker:
    if args.worker == "ours":
      data = ours_worker(w)
    else:
      ours_file = out / "ours.json"
      sums = json.loads(ours_file.read_text())["weight_sums"] if ours_file.exists() else None
      data = torch_worker(w, sums)
    data["forbidden_modules"] = _forbidden_loaded()
    (out / f"{args.worker}.json").write_text(json.dumps(data, indent=1))
    return

  t = _now()
  ours = _run_worker(args, "ours", {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get(
      "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")})
  theirs = None
  if not args.skip_torch:
    # JAX only makes the weights here: no preallocation, and freed buffers go back to the device.
    theirs = _run_worker(args, "torch", {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                                         "XLA_PYTHON_CLIENT_ALLOCATOR": "platform"})
  result = merge(w, ours, theirs, args.hbm_tb_s, args.peak_tflops)
  result["wall_s"] = _now() - t
  result["forbidden_modules"] = sorted(set(_forbidden_loaded() + ours["forbidden_modules"] + (
      theirs["forbidden_modules"] if theirs else [])))
  text = table(result)
  (out / "accelerator.json").write_text(json.dumps(result, indent=1))
  (out / "table.txt").write_text(text + "\n")
  print("\n" + text + f"\n\nwall {result['wall_s']:.0f} s; every figure in "
        f"{out / 'accelerator.json'}")


if __name__ == "__main__":
  main()
