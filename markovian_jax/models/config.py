"""Llama 3.x model configuration, read from either HF `config.json` layout.

Published Llama 3.1 checkpoints keep `rope_theta` at the top level and the llama3 frequency
scaling under `rope_scaling`; transformers 5 writes both under `rope_parameters`. Reading only one
layout silently drops the scaling, which gives a model that is right up to the original context and
wrong beyond it, so `LlamaConfig.from_hf` accepts both and rejects rope types it does not implement.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Tuple


# Weight/matmul dtypes a run may choose (config.model.dtype).
DTYPES = ("float32", "bfloat16", "float16")
# Per-layer rematerialisation in the backward pass (config.model.remat): "none" keeps every
# activation, "full" recomputes the layer, "dots" keeps matmul outputs without batch dims.
REMAT_MODES = ("none", "full", "dots")


class ConfigError(ValueError):
  """A model config that cannot describe a Llama model we can run."""


# How attention is computed (`LlamaConfig.attention_impl`; resolved per call by
# `llama.attention_kernel`):
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
  """llama3 frequency scaling (Llama 3.1+): long wavelengths divided by `factor`, smooth ramp between."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static architecture description. Frozen and hashable so it can be a static jit argument."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: Optional[RopeScaling] = None
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

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for rotate-half RoPE")
    if self.remat not in REMAT_MODES:
      raise ConfigError(f"remat={self.remat!r}: expected one of {list(REMAT_MODES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl={self.attention_impl!r}: expected one of "
                        f"{list(ATTENTION_IMPLS)}")

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  @property
  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    return v * d + self.num_layers * per_layer + d + (0 if self.tie_word_embeddings else d * v)

  # ---------------------------------------------------------------- HF interop
  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "LlamaConfig":
    """Builds a config from a parsed HF `config.json` dict (either rope layout)."""
    arch = hf.get("model_type")
    archs = hf.get("architectures") or []
    if arch not in (None, "llama") or (archs and not any("Llama" in a for a in archs)):
      raise ConfigError(
          f"config.json describes model_type={arch!r} architectures={archs}; only Llama "
          "(model_type 'llama', LlamaForCausalLM) checkpoints are supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
      raise ConfigError(f"config.json is missing required keys {missing}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ConfigError("attention_bias/mlp_bias Llama variants are not supported")
    heads = hf["num_attention_heads"]
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    params = {**scaling, **rope}
    if rope_type == "default":
      rope_scaling = None
    elif rope_type == "llama3":
      try:
        rope_scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
      except KeyError as e:
        raise ConfigError(f"llama3 rope scaling is missing {e.args[0]!r}") from None
    else:
      raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default' and 'llama3')")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    kw = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 131072),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_json_file(cls, path: str, **overrides) -> "LlamaConfig":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no config.json at {path}")
    with open(path) as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return cls.from_hf(hf, **overrides)

  def to_hf(self) -> dict[str, Any]:
    """The published-Llama-3.1 layout (top-level rope_theta + rope_scaling); transformers reads it."""
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": self.param_dtype,
    }
    if self.rope_scaling is not None:
      hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
    if self.bos_token_id is not None:
      hf["bos_token_id"] = self.bos_token_id
    if self.eos_token_ids:
      hf["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
    return hf
