"""Functional LoRA: the adapter is its own pytree, beside (never inside) the frozen base weights.

    base params                             LoRA adapter (`LoraAdapter.params`)
    {'layers': {'attn': {'q': {'kernel':     {'layers': {'attn': {'q': {'a': [L, D, r],
                              [L, D, Hq*Dh]}},                        'b': [L, r, Hq*Dh]}}, ...},
               'mlp':  {...}}, ...}                      'mlp':  {...}}}

The forward adds `(alpha / r) * dropout(x) @ a @ b` to every targeted projection. Gradients are
taken with respect to the adapter tree only, so the base is frozen by construction and optax needs
no masking. `a` is Kaiming-uniform and `b` zero (as PEFT), so a fresh adapter is exactly the base
model, and `lora=None` *is* the base model: the policy, the answer scorer and the KL reference share
one copy of the weights.
"""

from __future__ import annotations

from typing import Sequence

from flax import struct
import jax
import jax.numpy as jnp

from markovian_jax.models.config import DecoderConfig

ATTN_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
ALL_LINEAR = ATTN_TARGETS + MLP_TARGETS  # every linear layer except the LM head (PEFT "all-linear")
# Where a family keeps fused kernels, the adapter sits on the fused module whole (as PEFT puts
# one LoRA on Phi-3's qkv_proj / gate_up_proj and GPT-2's c_attn): a target names its part.
FUSED_TARGETS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


@struct.dataclass
class LoraAdapter:
  """LoRA weights (a pytree of `a`/`b` leaves) plus the static hyper-parameters that shape them."""

  params: dict
  rank: int = struct.field(pytree_node=False)
  alpha: float = struct.field(pytree_node=False)
  dropout: float = struct.field(pytree_node=False, default=0.0)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def targets(self) -> tuple[str, ...]:
    return tuple(t for group in self.params["layers"].values() for t in group)


def module_table(config: DecoderConfig) -> dict:
  """{name: (module, in_features, out_features)} of the linear layers this family has."""
  d, f = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  table = {"o": ("attn", q, d), "down": ("mlp", f, d)}
  if config.fused_qkv:
    table["qkv"] = ("attn", d, q + 2 * kv)
  else:
    table.update(q=("attn", d, q), k=("attn", d, kv), v=("attn", d, kv))
  if config.mlp_kind != "gated_silu":
    table["up"] = ("mlp", d, f)
  elif config.fused_gate_up:
    table["gate_up"] = ("mlp", d, 2 * f)
  else:
    table.update(gate=("mlp", d, f), up=("mlp", d, f))
  return table


def target_shapes(config: DecoderConfig, targets: Sequence[str] = ALL_LINEAR) -> dict:
  """{(module, name): (in_features, out_features)} for each targeted projection of this family.

  A target names one of `ALL_LINEAR` or a fused module of `FUSED_TARGETS`; a part of a fused
  kernel targets the whole kernel (q -> qkv on Phi-3 and GPT-2), and `gate` targets nothing where
  the MLP has no gate (GPT-2)."""
  table = module_table(config)
  known = set(ALL_LINEAR) | set(FUSED_TARGETS)
  unknown = sorted(set(targets) - known)
  if unknown or not targets:
    raise ValueError(
      f"unknown LoRA targets {unknown or list(targets)}; choose from {list(ALL_LINEAR)}"
    )
  names = set()
  for t in targets:
    fused = next((f for f, parts in FUSED_TARGETS.items() if t in parts and f in table), None)
    if t in table or fused:
      names.add(t if t in table else fused)
    elif t in FUSED_TARGETS:  # a fused name on a family that keeps the parts apart
      names.update(p for p in FUSED_TARGETS[t] if p in table)
  if not names:
    raise ValueError(
      f"LoRA targets {list(targets)} name no linear layer of this "
      f"{config.model_type} model (it has {sorted(table)})"
    )
  return {(table[n][0], n): table[n][1:] for n in sorted(names)}


def init_lora(
  config: DecoderConfig,
  rng: jax.Array,
  *,
  rank: int = 8,
  alpha: float = 16.0,
  dropout: float = 0.1,
  targets: Sequence[str] = ALL_LINEAR,
  dtype=jnp.float32,
) -> LoraAdapter:
  """A fresh adapter: `a` ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))),
  `b` = 0."""
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
  layers: dict = {}
  shapes = target_shapes(config, targets)
  for key, ((module, name), (n_in, n_out)) in zip(
    jax.random.split(rng, len(shapes)), sorted(shapes.items())
  ):
    bound = n_in**-0.5
    a = jax.random.uniform(key, (config.num_layers, n_in, rank), dtype, -bound, bound)
    b = jnp.zeros((config.num_layers, rank, n_out), dtype)
    layers.setdefault(module, {})[name] = {"a": a, "b": b}
  return LoraAdapter({"layers": layers}, rank=rank, alpha=float(alpha), dropout=float(dropout))


def delta(lora: LoraAdapter, module: str, name: str) -> jnp.ndarray:
  """float32 [L, in, out]: the dense weight update `scale * a @ b` of one target."""
  p = lora.params["layers"][module][name]
  return (
    jnp.einsum("lir,lro->lio", p["a"].astype(jnp.float32), p["b"].astype(jnp.float32)) * lora.scale
  )


def merge(params: dict, lora: LoraAdapter) -> dict:
  """Base params with the adapter folded into the kernels (same dtype as the base)."""
  layers = dict(params["layers"])
  for module, group in lora.params["layers"].items():
    layers[module] = dict(layers[module])
    for name in group:
      kernel = layers[module][name]["kernel"]
      merged = kernel.astype(jnp.float32) + delta(lora, module, name)
      layers[module][name] = {**layers[module][name], "kernel": merged.astype(kernel.dtype)}
  return {**params, "layers": layers}


def num_params(tree) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(x.size) for x in jax.tree.leaves(tree))
