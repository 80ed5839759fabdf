"""The decoder of every supported family (Llama, Mistral, Qwen2/3, Phi-3, GPT-2: named fields of
`DecoderConfig`, `config.FAMILIES`), weights loading/export, LoRA and teacher-forced log-probs.

Public contracts:
  load_checkpoint(path, dtype="float32") -> (config, params)
  logits(config, params, token_ids, lora=None) -> float32 [B, T, V]

May import: runtime.
"""

from markovian_jax.models.config import ConfigError, DecoderConfig, RopeScaling
from markovian_jax.models.decoder import (
  forward,
  head_weight,
  init_params,
  logits,
  positions_from_mask,
  project,
)
from markovian_jax.models.hf import (
  CheckpointError,
  load_peft_adapter,
  save_hf,
  save_merged_hf,
  save_peft_adapter,
)
from markovian_jax.models.loading import (
  eos_ids,
  load_checkpoint,
  load_tokenizer,
  resolve_model_path,
)
from markovian_jax.models.lora import LoraAdapter, init_lora, merge

__all__ = [
  "ConfigError",
  "DecoderConfig",
  "RopeScaling",
  "forward",
  "head_weight",
  "init_params",
  "logits",
  "positions_from_mask",
  "project",
  "LoraAdapter",
  "init_lora",
  "merge",
  "load_checkpoint",
  "load_tokenizer",
  "resolve_model_path",
  "eos_ids",
  "CheckpointError",
  "load_peft_adapter",
  "save_hf",
  "save_merged_hf",
  "save_peft_adapter",
]
