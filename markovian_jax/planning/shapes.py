"""A model's architecture without its weights, offline: what the memory plan needs to know.

    model.path                 read
    local directory            its config.json
    .gguf file / package://    the GGUF header (metadata and tensor infos; no tensor is read)
    hub id                     config.json from the local HF cache, else the published shapes of
                               the Llama 3.x and Qwen3 sizes below, so that the default
                               meta-llama/Llama-3.1-8B-Instruct and the paper's Qwen3-4B plan on a
                               machine with no network
"""

from __future__ import annotations

import os

from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.models.config import LlamaConfig, RopeScaling

_LLAMA3 = dict(vocab_size=128256, num_kv_heads=8, rope_theta=500000.0,
               max_position_embeddings=131072, bos_token_id=128000)
_SCALE8 = RopeScaling(8.0, 1.0, 4.0, 8192)
_SCALE32 = RopeScaling(32.0, 1.0, 4.0, 8192)
_SIZES = {
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, head_dim=64,
               tie_word_embeddings=True, rope_scaling=_SCALE32),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
               head_dim=128, tie_word_embeddings=True, rope_scaling=_SCALE32),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               head_dim=128, rope_scaling=_SCALE8),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                head_dim=128, rope_scaling=_SCALE8),
    "405B": dict(hidden_size=16384, intermediate_size=53248, num_layers=126, num_heads=128,
                 head_dim=128, rope_scaling=_SCALE8),
}
# Published config.json shapes of Meta's Llama 3.x checkpoints (base and Instruct alike).
KNOWN_HUB_SHAPES = {
    **{f"meta-llama/Llama-3.2-{s}{v}": _SIZES[s] for s in ("1B", "3B") for v in ("", "-Instruct")},
    **{f"meta-llama/Llama-3.1-{s}{v}": _SIZES[s] for s in ("8B", "70B", "405B")
       for v in ("", "-Instruct")},
    **{f"meta-llama/Meta-Llama-3.1-{s}{v}": _SIZES[s] for s in ("8B", "70B", "405B")
       for v in ("", "-Instruct")},
    "meta-llama/Llama-3.3-70B-Instruct": _SIZES["70B"],
    **{f"meta-llama/Meta-Llama-3-{s}{v}": {**_SIZES[s], "rope_scaling": None,
                                           "max_position_embeddings": 8192}
       for s in ("8B", "70B") for v in ("", "-Instruct")},
}

# Published config.json shapes of Qwen3 (model_type qwen3: per-head q/k RMSNorm, head_dim 128
# beside hidden sizes that are not 128 x heads); the base and post-trained uploads share them.
_QWEN3 = dict(vocab_size=151936, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
              rms_norm_eps=1e-6, max_position_embeddings=40960, bos_token_id=151643,
              model_type="qwen3", qk_norm=True)
_QWEN3_SIZES = {
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_layers=36),
}
KNOWN_QWEN3_SHAPES = {f"Qwen/Qwen3-{s}{v}": _QWEN3_SIZES[s] for s in _QWEN3_SIZES
                      for v in ("", "-Base")}


def _is_hub_id(path: str) -> bool:
  return (not os.path.exists(path) and not path.startswith((".", "/", "~", "package://"))
          and path.count("/") == 1)


def _from_gguf(path: str, dtype: str) -> LlamaConfig:
  from markovian_jax.models import gguf
  # The loader's own header reading (metadata and tensor infos; the tensors stay unread).
  reader = gguf._open(path)  # noqa: SLF001
  meta = gguf._Metadata(reader, path)  # noqa: SLF001
  return gguf._config(meta, {t.name: t for t in reader.tensors}, dtype, dtype)  # noqa: SLF001


def _cached_config_json(repo: str):
  try:
    from huggingface_hub import try_to_load_from_cache
    hit = try_to_load_from_cache(repo, "config.json")
  except Exception:  # noqa: BLE001 - no cache, no huggingface_hub: fall back to known shapes
    return None
  return hit if isinstance(hit, str) and os.path.isfile(hit) else None


def model_config(path: str, dtype: str = "bfloat16") -> tuple[LlamaConfig, str]:
  """(LlamaConfig with param/compute dtype `dtype`, where the shapes came from) for
  `config.model.path`, without reading weights or the network. Raises InvalidConfig naming
  config.model.path when none of the sources above has the model."""
  path = os.fspath(path)
  if _is_hub_id(path):
    cached = _cached_config_json(path)
    if cached:
      return LlamaConfig.from_json_file(cached, param_dtype=dtype, dtype=dtype), cached
    if path in KNOWN_HUB_SHAPES:
      return (LlamaConfig(**_LLAMA3, **KNOWN_HUB_SHAPES[path], param_dtype=dtype, dtype=dtype),
              f"published shapes of {path}")
    if path in KNOWN_QWEN3_SHAPES:
      return (LlamaConfig(**_QWEN3, **KNOWN_QWEN3_SHAPES[path], param_dtype=dtype, dtype=dtype),
              f"published shapes of {path}")
    raise InvalidConfig(
        f"config.model.path: {path} is a hub id that is neither in the local HF cache nor one of "
        f"the known Llama 3.x and Qwen3 sizes ({len(KNOWN_HUB_SHAPES) + len(KNOWN_QWEN3_SHAPES)} "
        "ids, e.g. meta-llama/Llama-3.1-8B-Instruct, Qwen/Qwen3-4B); give a local directory with "
        "config.json or a .gguf")
  from markovian_jax.models.loading import resolve_model_path
  local = resolve_model_path(path)
  if os.path.isfile(local) and local.endswith(".gguf"):
    return _from_gguf(local, dtype), f"GGUF header of {local}"
  config_json = os.path.join(local, "config.json")
  if os.path.isfile(config_json):
    return LlamaConfig.from_json_file(config_json, param_dtype=dtype, dtype=dtype), config_json
  raise InvalidConfig(f"config.model.path: {path}: no config.json or .gguf file there to plan "
                      "from")
