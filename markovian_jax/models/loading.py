"""`load_checkpoint` / `load_tokenizer`: one entry point for HF directories and GGUF files."""

from __future__ import annotations

import os
from typing import Optional

from markovian_jax.models.config import LlamaConfig


def _kind(path: str) -> str:
  path = os.fspath(path)
  if os.path.isfile(path) and path.endswith(".gguf"):
    return "gguf"
  if os.path.isdir(path):
    return "hf"
  if not os.path.exists(path):
    raise FileNotFoundError(f"model path does not exist: {path}")
  raise ValueError(f"{path} is neither an HF model directory (config.json + *.safetensors) "
                   "nor a .gguf file")


def load_checkpoint(path, dtype: str = "float32", *, mesh=None, rules=None,
                    compute_dtype: Optional[str] = None) -> tuple[LlamaConfig, dict]:
  """Loads `(config, params)` from an HF Llama directory or a `.gguf` file.

  Weights are cast to `dtype` (also the compute dtype unless `compute_dtype` is given). With a
  `mesh`, each tensor is placed straight onto its `NamedSharding` from the sharding rules.
  """
  kind = _kind(path)
  if kind == "gguf":
    from markovian_jax.models import gguf
    return gguf.load_gguf(path, dtype=dtype, mesh=mesh, rules=rules, compute_dtype=compute_dtype)
  from markovian_jax.models import hf
  return hf.load_hf(path, dtype=dtype, mesh=mesh, rules=rules, compute_dtype=compute_dtype)


def load_tokenizer(path):
  """The matching tokenizer: `tokenizer.json` of an HF directory, or one built from GGUF fields.
  Returns a `transformers.PreTrainedTokenizerFast`."""
  kind = _kind(path)
  if kind == "gguf":
    from markovian_jax.models import gguf
    return gguf.load_gguf_tokenizer(path)
  from markovian_jax.models import hf
  return hf.load_hf_tokenizer(path)
