"""A model's architecture without its weights, offline: what the memory plan needs to know.

model.path                 read
local directory            its config.json
.gguf file / package://    the GGUF header (metadata and tensor infos; no tensor is read)
hub id                     config.json from the local HF cache, else the published shapes of
                           the Llama 3.x and Qwen3 sizes (`models.published`), so that the
                           default meta-llama/Llama-3.1-8B-Instruct and the paper's Qwen3-4B
                           plan on a machine with no network
random:<name>              the shapes that name stands for (`models.random_models`)
"""

from __future__ import annotations

import os

from markovian_jax.models import published, random_models
from markovian_jax.models.config import DecoderConfig
from markovian_jax.runtime.errors import InvalidConfig


def _is_hub_id(path: str) -> bool:
  return (
    not os.path.exists(path)
    and not path.startswith((".", "/", "~", "package://"))
    and path.count("/") == 1
  )


def _from_gguf(path: str, dtype: str) -> DecoderConfig:
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


def model_config(path: str, dtype: str = "bfloat16") -> tuple[DecoderConfig, str]:
  """(DecoderConfig with param/compute dtype `dtype`, where the shapes came from) for
  `config.model.path`, without reading weights or the network. Raises InvalidConfig naming
  config.model.path when none of the sources above has the model."""
  path = os.fspath(path)
  if random_models.is_random(path):
    return random_models.random_config(path, dtype), random_models.describe(path)
  if _is_hub_id(path):
    cached = _cached_config_json(path)
    if cached:
      return DecoderConfig.from_json_file(cached, param_dtype=dtype, dtype=dtype), cached
    known = published.hub_config(path, dtype)
    if known is not None:
      return known, f"published shapes of {path}"
    raise InvalidConfig(
      f"config.model.path: {path} is a hub id that is neither in the local HF cache nor one of "
      f"the known Llama 3.x and Qwen3 sizes ({published.known_ids()} "
      "ids, e.g. meta-llama/Llama-3.1-8B-Instruct, Qwen/Qwen3-4B); give a local directory with "
      "config.json or a .gguf"
    )
  from markovian_jax.models.loading import resolve_model_path

  local = resolve_model_path(path)
  if os.path.isfile(local) and local.endswith(".gguf"):
    return _from_gguf(local, dtype), f"GGUF header of {local}"
  config_json = os.path.join(local, "config.json")
  if os.path.isfile(config_json):
    return DecoderConfig.from_json_file(config_json, param_dtype=dtype, dtype=dtype), config_json
  raise InvalidConfig(f"config.model.path: {path}: no config.json or .gguf file there to plan from")
