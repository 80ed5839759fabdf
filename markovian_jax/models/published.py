"""Published config.json shapes of the Llama 3.x and Qwen3 checkpoints, known without the network:
the offline memory plan (`planning.shapes`) and the `random:<name>` models (`random_models`) read
them from here."""

from __future__ import annotations

from typing import Optional

from markovian_jax.models.config import DecoderConfig, RopeScaling

_LLAMA3 = dict(
  vocab_size=128256,
  num_kv_heads=8,
  rope_theta=500000.0,
  max_position_embeddings=131072,
  bos_token_id=128000,
)
_SCALE8 = RopeScaling(8.0, 1.0, 4.0, 8192)
_SCALE32 = RopeScaling(32.0, 1.0, 4.0, 8192)
_SIZES = {
  "1B": dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    head_dim=64,
    tie_word_embeddings=True,
    rope_scaling=_SCALE32,
  ),
  "3B": dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_layers=28,
    num_heads=24,
    head_dim=128,
    tie_word_embeddings=True,
    rope_scaling=_SCALE32,
  ),
  "8B": dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    head_dim=128,
    rope_scaling=_SCALE8,
  ),
  "70B": dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_layers=80,
    num_heads=64,
    head_dim=128,
    rope_scaling=_SCALE8,
  ),
  "405B": dict(
    hidden_size=16384,
    intermediate_size=53248,
    num_layers=126,
    num_heads=128,
    head_dim=128,
    rope_scaling=_SCALE8,
  ),
}
# Published config.json shapes of Meta's Llama 3.x checkpoints (base and Instruct alike).
KNOWN_HUB_SHAPES = {
  **{f"meta-llama/Llama-3.2-{s}{v}": _SIZES[s] for s in ("1B", "3B") for v in ("", "-Instruct")},
  **{
    f"meta-llama/Llama-3.1-{s}{v}": _SIZES[s]
    for s in ("8B", "70B", "405B")
    for v in ("", "-Instruct")
  },
  **{
    f"meta-llama/Meta-Llama-3.1-{s}{v}": _SIZES[s]
    for s in ("8B", "70B", "405B")
    for v in ("", "-Instruct")
  },
  "meta-llama/Llama-3.3-70B-Instruct": _SIZES["70B"],
  **{
    f"meta-llama/Meta-Llama-3-{s}{v}": {
      **_SIZES[s],
      "rope_scaling": None,
      "max_position_embeddings": 8192,
    }
    for s in ("8B", "70B")
    for v in ("", "-Instruct")
  },
}

# Published config.json shapes of Qwen3 (model_type qwen3: per-head q/k RMSNorm, head_dim 128
# beside hidden sizes that are not 128 x heads); the base and post-trained uploads share them.
_QWEN3 = dict(
  vocab_size=151936,
  num_heads=32,
  num_kv_heads=8,
  head_dim=128,
  rope_theta=1e6,
  rms_norm_eps=1e-6,
  max_position_embeddings=40960,
  bos_token_id=151643,
  model_type="qwen3",
  qk_norm=True,
)
_QWEN3_SIZES = {
  "4B": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, tie_word_embeddings=True),
  "8B": dict(hidden_size=4096, intermediate_size=12288, num_layers=36),
}
KNOWN_QWEN3_SHAPES = {
  f"Qwen/Qwen3-{s}{v}": _QWEN3_SIZES[s] for s in _QWEN3_SIZES for v in ("", "-Base")
}


def hub_config(repo: str, dtype: str = "bfloat16", **overrides) -> Optional[DecoderConfig]:
  """The published shapes of hub id `repo` as a DecoderConfig with param / compute dtype `dtype`
  (None when the id is not one of the known ones)."""
  if repo in KNOWN_HUB_SHAPES:
    return DecoderConfig(
      **{**_LLAMA3, **KNOWN_HUB_SHAPES[repo], **overrides}, param_dtype=dtype, dtype=dtype
    )
  if repo in KNOWN_QWEN3_SHAPES:
    return DecoderConfig(
      **{**_QWEN3, **KNOWN_QWEN3_SHAPES[repo], **overrides}, param_dtype=dtype, dtype=dtype
    )
  return None


def known_ids() -> int:
  return len(KNOWN_HUB_SHAPES) + len(KNOWN_QWEN3_SHAPES)
