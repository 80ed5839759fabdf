"""Per-device bytes of one training step, phase by phase, from shapes alone (no weights or devices).

    persistent  base weights (train layout), LoRA params, AdamW state, a frozen reference adapter,
                NOVER's EMA-lagged adapter copy (its scorer and KL reference)
    sample      the decode-layout weight copy (fsdp > 1), the KV cache of the padded rows, the
                prefill, the token selection's logits            (`sampling`)
    score       one layer's forward over the answer rows and the CoT' rows, the window's logits
    update      activations the backward keeps (by remat mode), the chunked logits, LoRA
                gradients, FSDP-gathered layer weights             (`train_step`, `logprobs`)

Every size follows the programs' own layouts: `sharding`'s rules on the given mesh (train rules,
or `DECODE_RULES` in the sampler), the sampler's padded rows, `logprobs`' chunking and its
`SAVED_LOGITS_BYTES` switch. The peak is the persistent state plus the largest phase. What the
compiler adds on top (fusion temporaries, collective buffers, scheduling) is the margin that
tests/planning/test_plan.py checks against `compiled.memory_analysis()`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from markovian_jax.models import lora as lora_lib
from markovian_jax.models.config import REMAT_MODES, DecoderConfig
from markovian_jax.models.decoder import init_params
from markovian_jax.models.logprobs import SAVED_LOGITS_BYTES
from markovian_jax.runtime import sharding

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Workload:
  """The shapes one step handles (`plan.workload` reads them from a RunSpec)."""

  questions: int  # Q
  group: int  # G
  cot: int  # K, CoT tokens
  prompt: int  # P, the CoT prompt bucket
  answer: int  # A, answer-row length (answer prompt + CoT + answer)
  window: int  # scored trailing positions of an answer row
  reference_rows: bool = True  # the base model's greedy CoT' rides in the sampler
  base_rows: bool = True  # the CoT' answer rows are scored
  kl_full: bool = True  # the update runs the reference forward for the exact KL
  reward_grad: bool = False  # the update re-scores the answer rows with gradient
  minibatches: int = 1
  chunk: int = 64  # logprob chunk (train_step.StepSettings.logprob_chunk)
  remat: str = "full"
  lora_rank: int = 8
  lora_targets: tuple = lora_lib.ALL_LINEAR
  ref_adapter: bool = False  # lora.reference='initial_adapter': a frozen adapter copy
  ema_adapter: bool = False  # a method whose scorer is 'ema' (nover): the EMA adapter copy

  @property
  def rows(self) -> int:
    return self.questions * self.group


@dataclasses.dataclass(frozen=True)
class Item:
  phase: str  # persistent | sample | score | update
  name: str
  bytes: int
  note: str = ""


@dataclasses.dataclass
class MemoryPlan:
  items: list
  activations_by_remat: dict  # remat mode -> update activation bytes

  def total(self, phase: str) -> int:
    return sum(i.bytes for i in self.items if i.phase == phase)

  @property
  def persistent(self) -> int:
    return self.total("persistent")

  @property
  def peak_phase(self) -> str:
    return max(("sample", "score", "update"), key=self.total)

  @property
  def peak(self) -> int:
    return self.persistent + self.total(self.peak_phase)


# ------------------------------------------------------------------ trees


@functools.lru_cache(maxsize=8)
def param_shapes(c: DecoderConfig):
  """The base params tree as ShapeDtypeStructs (nothing allocated)."""
  return jax.eval_shape(lambda: init_params(c, jax.random.PRNGKey(0)))


def lora_shapes(c: DecoderConfig, rank: int, targets) -> lora_lib.LoraAdapter:
  return jax.eval_shape(
    lambda: lora_lib.init_lora(c, jax.random.PRNGKey(0), rank=rank, targets=tuple(targets))
  )


def leaf_bytes(tree, mesh, rules=sharding.DEFAULT_RULES) -> list:
  """Per-device bytes of each leaf of a params / LoRA / optimizer-state tree (scalars
  replicated), laid out as `train_step.tree_shardings` and `sharding.param_shardings` place it."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = tuple(leaf.shape)
    if shape:
      axes = sharding.param_logical_axes(sharding.path_str(path), len(shape))
      shape = sharding.shard_shape(axes, shape, mesh, rules)
    out.append(math.prod(shape) * jnp.dtype(leaf.dtype).itemsize)
  return out


def tree_bytes(tree, mesh, rules=sharding.DEFAULT_RULES) -> int:
  """Per-device bytes of a whole tree (`leaf_bytes`)."""
  return sum(leaf_bytes(tree, mesh, rules))


# ------------------------------------------------------------------ activations


@dataclasses.dataclass(frozen=True)
class _Dims:
  """Per-device widths of one layer's activations in a layout."""

  d: int  # model dim (activations keep it whole)
  q: int  # query width Hq * Dh / split
  kv: int  # key (= value) width
  f: int  # mlp width
  heads: int  # query heads
  kv_heads: int
  vocab: int

  @classmethod
  def of(cls, c: DecoderConfig, mesh, rules) -> "_Dims":
    def split(axis: str, n: int) -> int:
      return sharding.shard_shape((axis,), (n,), mesh, rules)[0]

    return cls(
      d=c.hidden_size,
      q=split("q_heads", c.num_heads) * c.head_dim,
      kv=split("kv_heads", c.num_kv_heads) * c.head_dim,
      f=split("mlp", c.intermediate_size),
      heads=split("q_heads", c.num_heads),
      kv_heads=split("kv_heads", c.num_kv_heads),
      vocab=split("vocab", c.vocab_size),
    )


def _every_activation(dims: _Dims, wb: int, rows: int, t: int, keys: int) -> int:
  """Every activation of one decoder layer's forward (residual, norm, q/k/v before and after
  RoPE, attention output, o, gate/up/silu, down; fp32 scores and probabilities over `keys` keys):
  what remat='none' keeps for the backward."""
  per_token = wb * (5 * dims.d + 3 * dims.q + 3 * dims.kv + 3 * dims.f)
  return rows * t * (per_token + dims.heads * keys * (8 + wb))


def _layer_peak(dims: _Dims, wb: int, rows: int, t: int, keys: int) -> int:
  """What one layer's forward holds at its peak once XLA has fused it: about the residual and
  2.5 fp32 [heads, keys] score arrays per token (fitted to the compiler:
  tests/planning/test_plan.py)."""
  return rows * t * (wb * dims.d + 10 * dims.heads * keys)


def _saved_per_layer(remat: str, dims: _Dims, wb: int, rows: int, t: int, keys: int) -> int:
  """Bytes per layer the backward keeps: the layer input (scan carry) always; `dots` adds the
  projections' outputs (dots without batch dims); `none` every activation and the softmax."""
  carry = rows * t * dims.d * wb
  if remat == "full":
    return carry
  if remat == "dots":
    return carry + rows * t * wb * (dims.q + 2 * dims.kv + 2 * dims.d + 2 * dims.f)
  return carry + _every_activation(dims, wb, rows, t, keys)


def _rows_on(n: int, split: int) -> int:
  """Rows per device of the work on n rows over `split` batch shards. The batch axes divide the
  Q x G rows; an array of Q rows (prompts, CoT' rows) that they do not divide is placed whole,
  but XLA splits its work gcd(n, split) ways, replicating the rest (seen in the compiled update
  of every preset: benchmarks/plan_8b.py)."""
  return n // math.gcd(n, split)


# ------------------------------------------------------------------ phases


def plan(c: DecoderConfig, w: Workload, mesh, optimizer_state=None) -> MemoryPlan:
  """The per-device memory plan of workload `w` for model `c` on `mesh` (a Mesh, {axis: size} or
  (data, fsdp, tensor)). `optimizer_state`: an abstract AdamW state of the LoRA (default: two fp32
  moments of it)."""
  sizes = sharding.axis_sizes(mesh)
  wb = jnp.dtype(c.dtype).itemsize
  lay = c.num_layers
  items: list[Item] = []
  add = lambda *a: items.append(Item(*a))  # noqa: E731

  # persistent ------------------------------------------------------------------
  params = param_shapes(c)
  weights = tree_bytes(params, sizes)
  lora = lora_shapes(c, w.lora_rank, w.lora_targets)
  lora_b = tree_bytes(lora.params, sizes)
  opt_b = tree_bytes(optimizer_state, sizes) if optimizer_state is not None else 2 * lora_b
  add("persistent", "base weights", weights, _layout_note(params, sizes))
  add(
    "persistent",
    "LoRA params (fp32)",
    lora_b,
    f"rank {w.lora_rank}, {lora_lib.num_params(lora.params):,} params",
  )
  add("persistent", "AdamW state (fp32)", opt_b, "2 moments")
  if w.ref_adapter:
    add("persistent", "reference adapter", lora_b, "lora.reference=initial_adapter")
  if w.ema_adapter:
    # The LoRA params only: it runs on the shared base weights. Its sync donates the old copy.
    add("persistent", "EMA scorer adapter", lora_b, "objective.method nover: scorer, KL reference")

  # A scanned layer's weights are sliced out of the [L, ...] stacks (FSDP: all-gathered) per layer.
  layers = {"layers": params["layers"]}
  train_slice = tree_bytes(layers, {**sizes, "fsdp": 1}) // lay
  td = _Dims.of(c, sizes, sharding.DEFAULT_RULES)
  # FSDP: the projections all-gather the head ([D, V] split on D) over fsdp.
  head = td.d * td.vocab * jnp.dtype(c.param_dtype).itemsize if sizes["fsdp"] > 1 else 0
  dec = sharding.DECODE_RULES

  # sample (sampler._generate, decode layout) -----------------------------------
  dd = _Dims.of(c, sizes, dec)
  real = w.rows + (w.questions if w.reference_rows else 0)
  rows = sharding.pad_rows(real, sizes, dec)
  r_dev = rows // sharding.batch_split(sizes, dec)
  slots = w.prompt + w.cot
  prompts = 2 * w.questions if w.reference_rows else w.questions
  prefill_rows = sharding.pad_rows(prompts, sizes, dec) // sharding.batch_split(sizes, dec)
  if sizes["fsdp"] > 1:
    add(
      "sample",
      "weights in decode layout",
      tree_bytes(params, sizes, dec),
      "fsdp joins tensor: resharded once per call",
    )
  cache = 2 * lay * r_dev * dd.kv * slots * wb
  add("sample", "KV cache", cache, f"{rows} rows ({real} real) x {slots} slots, {r_dev} per device")
  # Three stages, one after the other: the prefill, its cache copied to every row, the decode.
  # (The prefill is split over data; copying it to the rows gathers it whole.)
  dec_slice = tree_bytes(layers, sizes, dec) // lay
  prefill_cache = 2 * lay * prefill_rows * dd.kv * w.prompt * wb
  stages = {
    "prefill": prefill_cache
    + dec_slice
    + 2 * prefill_rows * w.prompt * dd.d * wb
    + _layer_peak(dd, wb, prefill_rows, w.prompt, w.prompt),
    "cache copy": 2 * lay * prompts * dd.kv * w.prompt * wb + cache * w.prompt // slots + cache,
    "decode step": cache + dec_slice + 4 * r_dev * c.vocab_size * 4,
  }
  if sizes["fsdp"] > 1:  # the reshard is an all-to-all: a stacked leaf's pieces in and out
    stages["reshard"] = 2 * max(leaf_bytes(params, sizes))
  stage = max(stages, key=stages.get)
  add(
    "sample",
    f"{stage} beyond the cache",
    stages[stage] - cache,
    "stages: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in stages.items()),
  )

  # score (train_step.score) ---------------------------------------------------
  split = sharding.batch_split(sizes)
  n_dev = _rows_on(w.rows, split)
  q_dev = _rows_on(w.questions, split)
  ans_rows = n_dev + (q_dev if w.base_rows else 0)
  add(
    "score",
    "hidden states",
    2 * ans_rows * w.answer * td.d * wb,
    f"{n_dev} answer rows + {q_dev if w.base_rows else 0} CoT' rows x {w.answer}",
  )
  layer = train_slice + _layer_peak(td, wb, max(n_dev, q_dev), w.answer, w.answer)
  window = 3 * ans_rows * w.window * td.vocab * 4
  add(
    "score",
    "one layer" if layer >= window else "window logits (fp32)",
    max(layer, window),
    f"weights + activations {layer / GIB:.2f}, then the window's logits {window / GIB:.2f}",
  )

  # update (train_step.update) -------------------------------------------------
  mb_rows = w.rows // w.minibatches
  n_dev = _rows_on(mb_rows, split)
  prompts = w.questions if w.group % w.minibatches == 0 else mb_rows
  p_dev = _rows_on(prompts, split)
  keys = w.prompt + w.cot
  by_remat = {}
  for mode in REMAT_MODES:
    saved = lay * (
      _saved_per_layer(mode, td, wb, n_dev, w.cot, keys)
      + _saved_per_layer(mode, td, wb, p_dev, w.prompt, w.prompt)
    )
    if w.reward_grad:
      saved += lay * _saved_per_layer(mode, td, wb, n_dev, w.answer, w.answer)
    by_remat[mode] = saved
  add(
    "update",
    f"saved activations (remat={w.remat})",
    by_remat[w.remat],
    f"{n_dev} CoT rows x {w.cot} + {p_dev} prompts x {w.prompt} per device",
  )
  add("update", "prompt keys/values + gradients", 4 * lay * p_dev * w.prompt * td.kv * wb)
  hidden = (2 if w.kl_full else 1) * n_dev * w.cot * td.d * wb
  add("update", "policy + reference hidden states", 2 * hidden)
  add("update", "LoRA gradients + updates", 2 * lora_b)
  # The layers' backward and the chunked projection run one after the other: the larger counts.
  backward = train_slice + 6 * _layer_peak(td, wb, n_dev, w.cot, keys)
  logits = _logits_bytes(c, w, td, n_dev) + head
  if logits >= backward:
    add(
      "update", "logits chunks (fp32)", logits, f"> a layer's backward ({backward / GIB:.2f} GiB)"
    )
  else:
    add("update", "one layer's backward", backward, f"> the logits ({logits / GIB:.2f} GiB)")
  return MemoryPlan(items, by_remat)


def _logits_bytes(c: DecoderConfig, w: Workload, td: _Dims, n_dev: int) -> int:
  """`logprobs._project_chunks`: chunks of `chunk` positions, each [rows, chunk, V] in fp32.
  A chunk over SAVED_LOGITS_BYTES (global) is recomputed in the backward (one chunk live);
  below it every chunk's residuals stay for the backward."""
  chunk = max(1, min(w.chunk, w.cot))
  nets = 2 if w.kl_full else 1
  one = n_dev * chunk * td.vocab * 4
  # About three [rows, chunk, V] arrays per network (logits, log-softmax, probabilities) live at
  # once, per chunk when they are kept for the backward (fitted: tests/planning/test_plan.py).
  global_live = nets * (w.rows // w.minibatches) * chunk * c.vocab_size * 4
  chunks = 1 if global_live > SAVED_LOGITS_BYTES else -(-w.cot // chunk)
  return chunks * 3 * nets * one


def _layout_note(params, sizes) -> str:
  f, t = sizes["fsdp"], sizes["tensor"]
  if f * t == 1:
    return f"replicated over data={sizes['data']}" if sizes["data"] > 1 else "one device"
  return f"split over fsdp={f} x tensor={t}"
