"""What the accelerator benchmark measures: the model, the rows in their order, their inputs, and
the FLOP / byte models its roofline and MFU figures divide by. numpy only at import time."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

# Datasheet HBM bandwidth in TB/s by jax/torch device name prefix, most specific first.
HBM_TB_S = (
  ("NVIDIA H100 PCIe", 2.0),
  ("NVIDIA H100 NVL", 3.9),
  ("NVIDIA H100", 3.35),
  ("NVIDIA H200", 4.8),
  ("NVIDIA GH200", 4.0),
  ("NVIDIA A100-SXM4-80GB", 2.039),
  ("NVIDIA A100 80GB PCIe", 1.935),
  ("NVIDIA A100", 1.555),
  ("TPU v5 lite", 0.819),
  ("TPU v5p", 2.765),
  ("TPU v6", 1.64),
)
# Datasheet dense bf16 peak in TFLOP/s, same matching.
PEAK_TFLOPS = (
  ("NVIDIA H100 PCIe", 756.0),
  ("NVIDIA H100", 989.4),
  ("NVIDIA H200", 989.4),
  ("NVIDIA GH200", 989.4),
  ("NVIDIA A100", 312.0),
  ("TPU v5 lite", 197.0),
  ("TPU v5p", 459.0),
  ("TPU v6", 918.0),
)
SAMPLER_BUCKET = 64  # `sampling.generate`'s default prompt bucket: the cache has P' + N slots


def llama31_8b(attention_impl: str = "auto", layers: int = 32):
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
    remat="full",
    attention_impl=attention_impl,
  )


def tiny(attention_impl: str = "auto"):
  from markovian_jax.models import DecoderConfig

  return DecoderConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_ids=(2,),
    param_dtype="bfloat16",
    dtype="bfloat16",
    remat="full",
    attention_impl=attention_impl,
  )


# Seconds each row is expected to take on one H100 with an empty compilation cache (estimates,
# from the cost model's compute / memory times, ~20 s per 8B program compile and the torch
# peer's CPU-side speed; the driver scales them by what the finished rows took). A row id is
# "<side>/<kind>/<size>"; "torch/load" is the peer worker's start (weights made and copied).
# The first pair fits the default budget (480 s) with a margin: preflight + ours/step/8 +
# torch/load + torch/step/8 = 345 s (tests/benchmarks/test_gpu_first_run.py checks the sum).
ESTIMATES_8B = {
  "preflight": 45.0,
  "ours/step/8": 150.0,
  "ours/step/1": 100.0,
  "ours/decode/1": 55.0,
  "ours/decode/256": 80.0,
  "ours/decode/64": 60.0,
  "ours/decode/12": 55.0,
  "torch/load": 60.0,
  "torch/step/8": 90.0,
  "torch/step/1": 35.0,
  "torch/decode/1": 20.0,
  "torch/decode/256": 45.0,
  "torch/decode/64": 25.0,
  "torch/decode/12": 20.0,
}
# The same on 2 busy CPU cores for --tiny (measured there, rounded up).
ESTIMATES_TINY = {
  "preflight": 10.0,
  "ours/step/2": 40.0,
  "ours/step/1": 30.0,
  "ours/decode/1": 12.0,
  "ours/decode/4": 12.0,
  "torch/load": 15.0,
  "torch/step/2": 10.0,
  "torch/step/1": 8.0,
  "torch/decode/1": 4.0,
  "torch/decode/4": 4.0,
}


@dataclasses.dataclass(frozen=True)
class Workload:
  """Sizes of one benchmark run. Answer rows are [answer prompt, CoT, answer suffix] with the
  last `answer_span` suffix tokens scored (the reference's "<Redacted> ... Reasoning:{CoT}
  Answer: {a}"), built from token ids on both sides. `questions` and `batches` are in run
  order: the rows that matter most first."""

  name: str
  config: object  # DecoderConfig
  batches: tuple = (1, 256, 64, 12)
  sampler_prompt: int = 256
  sampler_new: int = 100
  questions: tuple = (8, 1)
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
  estimates: tuple = tuple(ESTIMATES_8B.items())

  @property
  def answer_len(self) -> int:
    return self.answer_prefix + self.cot + self.answer_suffix

  @property
  def cache_slots(self) -> int:
    """Slots of the sampler's KV cache: the bucketed prompt and the new tokens."""
    return -(-self.sampler_prompt // SAMPLER_BUCKET) * SAMPLER_BUCKET + self.sampler_new

  def as_dict(self) -> dict:
    """The sizes and the model config, for the JSON (the priors are left out)."""
    d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("config", "estimates")}
    return {**d, "model": {**dataclasses.asdict(self.config), "num_params": self.config.num_params}}

  def rows(self, side: str) -> list:
    """Row ids of one side in run order: the steps (Q as given), then decode (B as given)."""
    return [f"{side}/step/{q}" for q in self.questions] + [
      f"{side}/decode/{b}" for b in self.batches
    ]

  def order(self) -> list:
    """Every row in run order, ratios first: ours' step then torch's at the same Q, Q as
    given, then the decode pairs, B as given; a run cut anywhere keeps whole pairs."""
    return [
      f"{side}/{kind}/{n}"
      for kind, sizes in (("step", self.questions), ("decode", self.batches))
      for n in sizes
      for side in ("ours", "torch")
    ]

  def estimate(self, row: str) -> float:
    """Prior seconds of a row (a size not in the table: the nearest listed size's)."""
    table = dict(self.estimates)
    if row in table:
      return table[row]
    side, kind, _ = (row.split("/") + ["", ""])[:3]
    near = [v for k, v in table.items() if k.startswith(f"{side}/{kind}/")]
    return max(near) if near else 60.0


def make_workload(
  tiny_run: bool,
  attention_impl: str = "auto",
  batches: Optional[str] = None,
  questions: Optional[str] = None,
  repeats: Optional[int] = None,
  estimates: Optional[str] = None,
) -> Workload:
  """The 8B workload (or --tiny's), with the command line's row sizes, repeats and row
  estimates ("ours/step/8=40,torch/load=90": seconds that replace the priors)."""
  if tiny_run:
    w = Workload(
      "tiny",
      tiny(attention_impl),
      batches=(1, 4),
      sampler_prompt=16,
      sampler_new=32,
      questions=(2, 1),
      group=4,
      cot=8,
      step_prompt=16,
      answer_prefix=4,
      answer_suffix=2,
      answer_span=1,
      repeats=1,
      estimates=tuple(ESTIMATES_TINY.items()),
    )
  else:
    w = Workload("llama-3.1-8b", llama31_8b(attention_impl))
  kw = {}
  if batches:
    kw["batches"] = tuple(int(b) for b in batches.split(","))
  if questions:
    kw["questions"] = tuple(int(q) for q in questions.split(","))
  if repeats:
    kw["repeats"] = repeats
  if estimates:
    table = dict(w.estimates)
    for item in estimates.split(","):
      row, _, seconds = item.partition("=")
      table[row.strip()] = float(seconds)
    kw["estimates"] = tuple(table.items())
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
  tokens = np.concatenate(
    [
      np.tile(fixed[: w.answer_prefix], (n, 1)),
      cots.astype(np.int32),
      np.tile(fixed[w.answer_prefix :], (n, 1)),
    ],
    axis=1,
  )
  span = np.zeros(tokens.shape, bool)
  span[:, -w.answer_span :] = True
  return tokens, np.ones(tokens.shape, bool), span


# ------------------------------------------------------------------ FLOP and byte models


def matmul_params(c) -> tuple:
  """(matmul parameters of one decoder layer, of the head), from the family's linear layers
  (`lora.module_table`: q, k, v, o, gate, up, down, or their fused forms)."""
  from markovian_jax.models import lora as lora_lib

  layer = sum(n_in * n_out for _, n_in, n_out in lora_lib.module_table(c).values())
  return layer, c.hidden_size * c.vocab_size


def lora_layer_params(c, rank: int) -> int:
  """LoRA parameters of one layer on every linear layer of the family (a: in x r, b: r x out)."""
  from markovian_jax.models import lora as lora_lib

  return rank * sum(n_in + n_out for _, n_in, n_out in lora_lib.module_table(c).values())


def forward_flops(c, positions: int, projected: int, lora_rank: int = 0) -> float:
  """Model FLOPs of a forward pass: 2 per matmul parameter per position through the layers (the
  LoRA's too), and 2 * D * V per position projected onto the vocabulary. Attention's own
  products (QK^T, PV) are left out, as in the usual 2N-per-token count."""
  layer, head = matmul_params(c)
  return (
    2.0 * positions * c.num_layers * (layer + lora_layer_params(c, lora_rank))
    + 2.0 * projected * head
  )


def update_model_flops(c, w: Workload, q: int, prompt_per_row: bool = False) -> float:
  """Model FLOPs of the update of Q questions: the policy's forward (each prompt once, the G CoTs
  of K tokens after it, log-probs on the CoT positions), the base model's forward for the exact
  KL on the same positions, and the policy's backward: activation gradients (the forward's FLOPs
  again: no base-weight gradients) plus the LoRA weight gradients (2 per LoRA parameter per
  position). Rematerialisation is not counted (it is redundant work). With `prompt_per_row`,
  the prompt is counted once per CoT (Q * G times), as the PyTorch reference runs it."""
  n = q * w.group
  positions = (n if prompt_per_row else q) * w.step_prompt + n * w.cot
  projected = n * w.cot
  policy = forward_flops(c, positions, projected, w.lora_rank)
  base = forward_flops(c, positions, projected)
  lora_grads = 2.0 * positions * c.num_layers * lora_layer_params(c, w.lora_rank)
  return 2 * policy + base + lora_grads


def weight_bytes_per_decode_step(c, lora_rank: int) -> int:
  """Bytes of weights one decode step reads: every matmul weight and norm once (not the
  embedding table: a step gathers B rows of it), plus the fp32 LoRA."""
  layer, head = matmul_params(c)
  itemsize = np.dtype(np_dtype(c.param_dtype)).itemsize
  norms = (2 * c.num_layers + 1) * c.hidden_size + (
    2 * c.num_layers * c.head_dim if c.qk_norm else 0
  )
  return itemsize * (c.num_layers * layer + head + norms) + 4 * c.num_layers * lora_layer_params(
    c, lora_rank
  )


def kv_bytes_per_slot(c) -> int:
  """Bytes of keys and values of one cache slot of one row (all layers)."""
  return 2 * c.num_layers * c.num_kv_heads * c.head_dim * np.dtype(np_dtype(c.dtype)).itemsize


def decode_step_bytes(c, batch: int, context: float, lora_rank: int) -> float:
  """Weights + KV bytes of one decode step reading `context` cache slots per row."""
  return weight_bytes_per_decode_step(c, lora_rank) + batch * context * kv_bytes_per_slot(c)


def np_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes

    return ml_dtypes.bfloat16
  return np.dtype(name)


def lookup(table, name: str) -> Optional[float]:
  for prefix, value in table:
    if name.startswith(prefix):
      return value
  return None


# ------------------------------------------------------------------ row figures (both sides)


def summarise_step(w: Workload, q: int, runs: list) -> dict:
  """The mean of the timed runs (all but the first) with the step's throughput figures."""
  timed = runs[1:] or runs
  mean = lambda k: float(np.mean([r[k] for r in timed]))  # noqa: E731
  n = q * w.group
  row = {
    "questions": q,
    "group": w.group,
    "cot": w.cot,
    "prompt": w.step_prompt,
    "first_step_s": runs[0]["step_s"],
    "reward": mean("reward"),
  }
  for k in ("step_s", "sample_s", "score_s", "update_s"):
    row[k] = mean(k)
    row[k[:-2] + "_times"] = [r[k] for r in timed]
  row["cot_tok_s"] = n * w.cot / row["step_s"]
  row["sample_tok_s"] = n * w.cot / row["sample_s"]
  row["score_tok_s"] = (n + q) * w.answer_len / row["score_s"]
  row["update_tok_s"] = (q * w.step_prompt + n * w.cot) / row["update_s"]
  return row


def sampler_figures(w: Workload, b: int, full_s: float, prefill_s: float) -> dict:
  """Throughput of a decode row from the mean times of N new tokens and of 1."""
  n, p = w.sampler_new, w.sampler_prompt
  decode_s = max(full_s - prefill_s, 1e-9)
  return {
    "batch": b,
    "new_tokens": n,
    "prompt": p,
    "tok_s": b * n / full_s,
    "decode_tok_s": b * (n - 1) / decode_s,
    "decode_steps_s": (n - 1) / decode_s,
    "prefill_tok_s": b * p / prefill_s,
  }
