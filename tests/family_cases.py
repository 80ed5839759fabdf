"""Tiny random transformers checkpoints of each model family, written by transformers itself (no
download), for the tests that compare a family against transformers' implementation or step it
against the float64 reference: 2 layers, d=64, 4 heads over 2 KV heads, V=160 unless overridden.
"""

import numpy as np

from tests import helpers

FAMILIES = ("qwen3", "qwen2", "gpt2", "mistral", "phi3", "llama")
_COMMON = dict(
  vocab_size=160,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=128,
  initializer_range=0.08,
  bos_token_id=1,
  eos_token_id=2,
  rope_theta=10000.0,
)


def _hf_config(family: str, **overrides):
  config = _family_config(family)
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _family_config(family: str):
  transformers = helpers.require("transformers")
  rng = np.random.RandomState(7)
  if family == "qwen3":  # head_dim (24) independent of hidden / heads (16); tied embeddings
    return transformers.Qwen3Config(
      **_COMMON, head_dim=24, tie_word_embeddings=True, rms_norm_eps=1e-6
    )
  if family == "qwen2":
    return transformers.Qwen2Config(**_COMMON, tie_word_embeddings=False, rms_norm_eps=1e-6)
  if family == "mistral":
    return transformers.MistralConfig(**_COMMON, sliding_window=8, tie_word_embeddings=False)
  if family == "phi3":
    half = _COMMON["hidden_size"] // _COMMON["num_attention_heads"] // 2
    common = {k: v for k, v in _COMMON.items() if k != "rope_theta"}
    return transformers.Phi3Config(
      **common,
      rope_theta=10000.0,
      original_max_position_embeddings=32,
      pad_token_id=0,
      rope_scaling=dict(
        type="longrope",
        short_factor=list(1 + rng.rand(half)),
        long_factor=list(2 + 3 * rng.rand(half)),
      ),
      tie_word_embeddings=False,
    )
  if family == "gpt2":
    return transformers.GPT2Config(
      vocab_size=160,
      n_embd=64,
      n_layer=2,
      n_head=4,
      n_positions=128,
      initializer_range=0.08,
      bos_token_id=1,
      eos_token_id=2,
    )
  if family == "llama":
    return transformers.LlamaConfig(**_COMMON, tie_word_embeddings=False)
  raise ValueError(family)


def torch_model(family: str, path: str, **overrides):
  """A random transformers model of `family` (config fields `overrides`, e.g. vocab_size) with
  random biases and norms, saved to `path`."""
  torch = helpers.require("torch")
  transformers = helpers.require("transformers")
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
    _hf_config(family, **overrides), attn_implementation="eager"
  ).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim == 1:  # norm weights
        p.copy_(1 + 0.2 * torch.randn_like(p))
  model.save_pretrained(path)
  return model
