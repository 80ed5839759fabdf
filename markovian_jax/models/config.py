"""Decoder model configuration for the supported families, read from HF `config.json`.

One model implementation (`decoder.py`) runs every family; what sets a family apart is a handful of
named fields of `DecoderConfig` (`FAMILIES` lists each family's values):

    family   model_type  fields that differ from Llama
    Llama    llama       (attention_bias / mlp_bias when the checkpoint sets them)
    Mistral  mistral     sliding_window (a mask) when the checkpoint sets it
    Qwen2    qwen2       qkv_bias
    Qwen3    qwen3       qk_norm (per-head RMSNorm on q and k); head_dim independent of hidden size
    Phi-3    phi3        fused_qkv, fused_gate_up (one qkv / gate_up kernel); longrope scaling
    GPT-2    gpt2        learned positions, LayerNorm with bias, tanh-GELU MLP, biases everywhere,
                         fused_qkv (c_attn), tied embeddings

Published Llama 3.1 checkpoints keep `rope_theta` at the top level and the llama3 frequency
scaling under `rope_scaling`; transformers 5 writes both under `rope_parameters`. Reading only one
layout silently drops the scaling, which gives a model that is right up to the original context and
wrong beyond it, so `DecoderConfig.from_hf` accepts both and rejects rope types it does not
implement.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Tuple, Union

from markovian_jax.runtime import files
from markovian_jax.runtime.errors import UserError

# Weight/matmul dtypes a run may choose (config.model.dtype).
DTYPES = ("float32", "bfloat16", "float16")
# Per-layer rematerialisation in the backward pass (config.model.remat): "none" keeps every
# activation, "full" recomputes the layer, "dots" keeps matmul outputs without batch dims.
REMAT_MODES = ("none", "full", "dots")


class ConfigError(UserError, ValueError):
  """A model config that cannot describe a model we can run (the CLIs print it as one line)."""


# Layer norm kinds (`DecoderConfig.norm_kind`): RMSNorm with a scale, or LayerNorm with scale and
# bias.
NORM_KINDS = ("rms", "layer")
# Position encodings (`position_kind`): rotary on q/k, or a learned table added to the embeddings.
POSITION_KINDS = ("rope", "learned")
# MLPs (`mlp_kind`): down(silu(gate(x)) * up(x)), or down(gelu_tanh(up(x))) (GPT-2's c_fc/c_proj).
MLP_KINDS = ("gated_silu", "gelu_tanh")

# config.json model_type -> the named fields of that family (the rest default to Llama's).
FAMILIES = {
  "llama": {},
  "mistral": {},
  "qwen2": dict(qkv_bias=True),
  "qwen3": dict(qk_norm=True),
  "phi3": dict(fused_qkv=True, fused_gate_up=True),
  "gpt2": dict(
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    norm_kind="layer",
    position_kind="learned",
    mlp_kind="gelu_tanh",
    fused_qkv=True,
    tie_word_embeddings=True,
  ),
}
MODEL_TYPES = tuple(FAMILIES)
# Each family's HF class (what `to_hf` writes and transformers instantiates).
HF_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "phi3": "Phi3ForCausalLM",
  "gpt2": "GPT2LMHeadModel",
}


# How attention is computed (`DecoderConfig.attention_impl`; resolved per call by
# `decoder.attention_kernel`):
#   auto         the einsum path on CPU; jax.nn.dot_product_attention on accelerators, with cuDNN
#                flash attention on GPU where cuDNN can run it (bf16/fp16) and XLA's otherwise;
#   einsum       always the einsum path (the reference implementation; CPU's fastest);
#   dot_product  jax.nn.dot_product_attention, XLA implementation (any backend);
#   cudnn        jax.nn.dot_product_attention, cuDNN implementation (GPU only; fails elsewhere).
# Whatever the choice, the KV-cache decode and the shared-prefix attention run the einsum path:
# dot_product_attention cannot read the cache's layouts or attend to a prefix shared by G rows.
ATTENTION_IMPLS = ("auto", "einsum", "dot_product", "cudnn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """llama3 frequency scaling (Llama 3.1+): long wavelengths divided by `factor`, a smooth ramp
  between."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LongRopeScaling:
  """longrope (Phi-3 / Phi-3.5): per-frequency divisors, `short_factor` while every position of
  the call is inside the original context and `long_factor` once one is past it, and cos/sin
  multiplied by `attention_factor`."""

  short_factor: Tuple[float, ...]
  long_factor: Tuple[float, ...]
  original_max_position_embeddings: int
  attention_factor: float


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Static architecture description. Frozen and hashable so it can be a static jit argument.

  The fields after `attention_impl` name what sets a family apart (`FAMILIES`); their defaults
  are Llama's."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: Optional[Union[RopeScaling, LongRopeScaling]] = None
  max_position_embeddings: int = 131072
  tie_word_embeddings: bool = False
  bos_token_id: Optional[int] = None
  eos_token_ids: Tuple[int, ...] = ()
  # Storage dtype of the weights and dtype of the matmuls. Softmax, RoPE tables and log-probs are
  # always fp32.
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Rematerialise each decoder layer in the backward pass ("none", "full", "dots": keep matmul
  # outputs without batch dims).
  remat: str = "full"
  # Attention kernel: one of ATTENTION_IMPLS (see there). Softmax is fp32 in every kernel.
  attention_impl: str = "auto"
  # Ids at or above it get a logit of `decoder.MASKED_LOGIT` (never sampled, ~0 probability in every
  # log-prob): a model whose tokenizer covers fewer ids than its embedding, as the `random:<name>`
  # models with a smaller tokenizer (`random_models`). None = every id.
  usable_vocab: Optional[int] = None
  # ---- family fields (FAMILIES)
  model_type: str = "llama"
  qkv_bias: bool = False  # bias on the q, k, v projections (Qwen2, GPT-2)
  out_bias: bool = False  # bias on the attention output projection (GPT-2)
  mlp_bias: bool = False  # bias on the MLP projections (GPT-2)
  qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
  norm_kind: str = "rms"  # NORM_KINDS
  position_kind: str = "rope"  # POSITION_KINDS
  mlp_kind: str = "gated_silu"  # MLP_KINDS
  fused_qkv: bool = False  # one q|k|v kernel (Phi-3 qkv_proj, GPT-2 c_attn), LoRA on it whole
  fused_gate_up: bool = False  # one gate|up kernel (Phi-3 gate_up_proj), LoRA on it whole
  sliding_window: Optional[int] = None  # a query sees only the last `sliding_window` keys (Mistral)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for rotate-half RoPE")
    if self.remat not in REMAT_MODES:
      raise ConfigError(f"remat={self.remat!r}: expected one of {list(REMAT_MODES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(
        f"attention_impl={self.attention_impl!r}: expected one of {list(ATTENTION_IMPLS)}"
      )
    for name, choices in (
      ("model_type", MODEL_TYPES),
      ("norm_kind", NORM_KINDS),
      ("position_kind", POSITION_KINDS),
      ("mlp_kind", MLP_KINDS),
    ):
      if getattr(self, name) not in choices:
        raise ConfigError(f"{name}={getattr(self, name)!r}: expected one of {list(choices)}")
    if self.fused_gate_up and self.mlp_kind != "gated_silu":
      raise ConfigError("fused_gate_up needs mlp_kind='gated_silu' (there is no gate otherwise)")
    if self.usable_vocab is not None and not 0 < self.usable_vocab <= self.vocab_size:
      raise ConfigError(f"usable_vocab={self.usable_vocab} must be in [1, {self.vocab_size}]")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ConfigError(f"sliding_window={self.sliding_window} must be positive")

  def replace(self, **kw) -> "DecoderConfig":
    return dataclasses.replace(self, **kw)

  @property
  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    norm = d * (2 if self.norm_kind == "layer" else 1)
    mlp_mats = 3 if self.mlp_kind == "gated_silu" else 2
    per_layer = (
      d * q
      + 2 * d * kv
      + q * d
      + mlp_mats * d * f
      + 2 * norm
      + (q + 2 * kv if self.qkv_bias else 0)
      + (d if self.out_bias else 0)
      + ((mlp_mats - 1) * f + d if self.mlp_bias else 0)
      + (2 * self.head_dim if self.qk_norm else 0)
    )
    positions = self.max_position_embeddings * d if self.position_kind == "learned" else 0
    return (
      v * d
      + positions
      + self.num_layers * per_layer
      + norm
      + (0 if self.tie_word_embeddings else d * v)
    )

  # ---------------------------------------------------------------- HF interop
  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "DecoderConfig":
    """Builds a config from a parsed HF `config.json` dict (either rope layout) of any family in
    `FAMILIES`; anything else is a ConfigError naming the supported model types."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type is None and (not archs or any("Llama" in a for a in archs)):
      model_type = "llama"  # early Llama exports omit model_type
    if model_type not in FAMILIES:
      raise ConfigError(
        f"config.json describes model_type={model_type!r} (architectures {archs}), which is "
        f"not supported; supported model types: {', '.join(MODEL_TYPES)}"
      )
    if model_type == "gpt2":
      hf = _gpt2_as_decoder(hf)
    missing = [
      k
      for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
      )
      if k not in hf
    ]
    if missing:
      raise ConfigError(f"config.json is missing required keys {missing}")
    family = dict(FAMILIES[model_type])
    if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
      family.update(qkv_bias=True, out_bias=True)
    if model_type == "llama" and hf.get("mlp_bias"):
      family["mlp_bias"] = True
    if model_type in ("mistral", "phi3") and hf.get("sliding_window") is not None:
      family["sliding_window"] = int(hf["sliding_window"])
    if model_type in ("qwen2", "qwen3") and (
      hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ())
    ):
      raise ConfigError(
        f"{model_type} with sliding-window layers (use_sliding_window) is not supported"
      )
    if model_type == "phi3" and float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
      raise ConfigError("phi3 with partial_rotary_factor != 1 is not supported")
    act = hf.get("hidden_act", "silu")
    if model_type != "gpt2" and act != "silu":
      raise ConfigError(f"hidden_act={act!r} is not supported for {model_type} (only 'silu')")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = (
      rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    )
    params = {**scaling, **rope}
    if model_type == "gpt2" or rope_type == "default":
      rope_scaling = None
    elif rope_type == "llama3":
      try:
        rope_scaling = RopeScaling(
          factor=float(params["factor"]),
          low_freq_factor=float(params["low_freq_factor"]),
          high_freq_factor=float(params["high_freq_factor"]),
          original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
      except KeyError as e:
        raise ConfigError(f"llama3 rope scaling is missing {e.args[0]!r}") from None
    elif rope_type in ("longrope", "su"):
      rope_scaling = _longrope(params, hf, head_dim)
    else:
      raise ConfigError(
        f"rope type {rope_type!r} is not supported (only 'default', 'llama3' and 'longrope')"
      )
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    kw = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=head_dim,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
      rope_theta=float(theta),
      rope_scaling=rope_scaling,
      max_position_embeddings=hf.get("max_position_embeddings", 131072),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=eos_ids,
      model_type=model_type,
    )
    kw.update(family)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_json_file(cls, path: str, **overrides) -> "DecoderConfig":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no config.json at {path}")
    hf = files.read_json(path)
    try:
      return cls.from_hf(hf, **overrides)
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from None

  def to_hf(self) -> dict[str, Any]:
    """This family's config.json (Llama in the published-3.1 layout: top-level rope_theta +
    rope_scaling); transformers reads it into the family's class."""
    if self.model_type == "gpt2":
      hf = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": self.vocab_size,
        "n_embd": self.hidden_size,
        "n_inner": self.intermediate_size,
        "n_layer": self.num_layers,
        "n_head": self.num_heads,
        "n_positions": self.max_position_embeddings,
        "layer_norm_epsilon": self.rms_norm_eps,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "torch_dtype": self.param_dtype,
      }
    else:
      hf = {
        "architectures": [HF_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": self.param_dtype,
      }
      if self.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = self.qkv_bias
      if self.model_type == "llama":
        hf["mlp_bias"] = self.mlp_bias
      if self.model_type in ("mistral", "phi3"):
        hf["sliding_window"] = self.sliding_window
      # Phi-3's class defaults pad_token_id to 32000, an embedding row a small vocabulary lacks.
      hf["pad_token_id"] = None
      s = self.rope_scaling
      if isinstance(s, RopeScaling):
        hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(s)}
      elif isinstance(s, LongRopeScaling):
        hf["rope_scaling"] = {
          "rope_type": "longrope",
          "short_factor": list(s.short_factor),
          "long_factor": list(s.long_factor),
          "attention_factor": s.attention_factor,
          "original_max_position_embeddings": s.original_max_position_embeddings,
        }
        hf["original_max_position_embeddings"] = s.original_max_position_embeddings
    if self.bos_token_id is not None:
      hf["bos_token_id"] = self.bos_token_id
    if self.eos_token_ids:
      hf["eos_token_id"] = (
        list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
      )
    return hf


def _gpt2_as_decoder(hf: dict) -> dict:
  """GPT-2's config.json keys under the decoder names `from_hf` reads."""
  act = hf.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ConfigError(
      f"gpt2 activation_function={act!r} is not supported (only the tanh GELU, 'gelu_new')"
    )
  if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
    raise ConfigError(
      "gpt2 with scale_attn_by_inverse_layer_idx or without scale_attn_weights is not supported"
    )
  d = hf.get("n_embd", hf.get("hidden_size"))
  out = dict(hf)
  out.update(
    hidden_size=d,
    num_hidden_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
    num_attention_heads=hf.get("n_head", hf.get("num_attention_heads")),
    intermediate_size=hf.get("n_inner") or (4 * d if d else None),
    max_position_embeddings=hf.get("n_positions", 1024),
    rms_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    tie_word_embeddings=True,
  )
  for k in ("num_key_value_heads", "head_dim"):
    out.pop(k, None)
  return {k: v for k, v in out.items() if v is not None or k in ("bos_token_id", "eos_token_id")}


def _longrope(params: dict, hf: dict, head_dim: int) -> LongRopeScaling:
  """LongRopeScaling from the rope parameters (and the top-level original context, where Phi-3's
  published configs keep it). The attention factor defaults as in the LongRoPE paper."""
  original = params.get(
    "original_max_position_embeddings", hf.get("original_max_position_embeddings")
  )
  if original is None or "short_factor" not in params or "long_factor" not in params:
    raise ConfigError(
      "longrope scaling needs short_factor, long_factor and original_max_position_embeddings"
    )
  short, long = tuple(map(float, params["short_factor"])), tuple(map(float, params["long_factor"]))
  if len(short) != head_dim // 2 or len(long) != head_dim // 2:
    raise ConfigError(
      f"longrope short_factor/long_factor have {len(short)}/{len(long)} entries; "
      f"head_dim {head_dim} needs {head_dim // 2}"
    )
  factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
  attention_factor = params.get("attention_factor")
  if attention_factor is None:
    attention_factor = (
      1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    )
  return LongRopeScaling(short, long, int(original), float(attention_factor))
