"""Llama weights and tokenizer from a llama.cpp `.gguf` file.

The metadata is the config (llama.cpp key names); the tensors are dequantised to fp32 with
`gguf.quants.dequantize`, cast to the storage dtype and placed one stacked leaf at a time, so host
memory peaks at one `[L, in, out]` leaf rather than the whole model.

Two llama.cpp conventions are undone here:
  * numpy views of GGUF tensors are `[out, in]`; our kernels are `[in, out]`.
  * llama.cpp's converter permutes the q/k rows of each head from HF's rotate-half layout to the
    interleaved-pair layout: row `h*Dh + 2*j + s` holds HF row `h*Dh + s*Dh/2 + j`. We invert it
    while transposing, in one copy.

Llama 3.1-style frequency scaling is stored by llama.cpp as a `rope_freqs.weight` tensor of
per-frequency divisors rather than as metadata; we accept it when it equals llama3 scaling with
Meta's published band (low 1, high 4, original context 8192 unless the file states another).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from markovian_jax.models import rope
from markovian_jax.models.config import ConfigError, DecoderConfig, RopeScaling
from markovian_jax.models.decoder import init_params

_MAGIC = b"GGUF"
_ARCH = "llama"
_REQUIRED = object()

# Our per-layer leaf path (under 'layers') -> llama.cpp tensor name `blk.{i}.{name}.weight`.
_LAYER_TENSORS = {
  ("attn_norm", "scale"): "attn_norm",
  ("attn", "q", "kernel"): "attn_q",
  ("attn", "k", "kernel"): "attn_k",
  ("attn", "v", "kernel"): "attn_v",
  ("attn", "o", "kernel"): "attn_output",
  ("mlp_norm", "scale"): "ffn_norm",
  ("mlp", "gate", "kernel"): "ffn_gate",
  ("mlp", "up", "kernel"): "ffn_up",
  ("mlp", "down", "kernel"): "ffn_down",
}
_GLOBAL_TENSORS = {
  ("embed", "embedding"): "token_embd.weight",
  ("final_norm", "scale"): "output_norm.weight",
  ("lm_head", "kernel"): "output.weight",
}
_ROPE_FREQS = "rope_freqs.weight"

# llama.cpp `tokenizer.ggml.token_type` values.
_CONTROL, _USER_DEFINED = 3, 4

# GPT-2's split pattern, which `ByteLevel(use_regex=True)` applies.
_PRE_GPT2 = "gpt2"
# StarCoder-family vocabularies (SmolLM, SmolLM2) split every digit off first, then apply GPT-2's
# pattern; llama.cpp groups these pre-tokenizer names under one rule.
_PRE_DIGITS_GPT2 = "digits+gpt2"
# Llama 3's tiktoken pattern (digits in groups of up to three).
_PRE_LLAMA3 = "llama3"
_PRE_TOKENIZERS = {
  "default": _PRE_GPT2,
  "gpt2": _PRE_GPT2,
  "smollm": _PRE_DIGITS_GPT2,
  "starcoder": _PRE_DIGITS_GPT2,
  "refact": _PRE_DIGITS_GPT2,
  "codeshell": _PRE_DIGITS_GPT2,
  "llama-bpe": _PRE_LLAMA3,
  "llama3": _PRE_LLAMA3,
  "llama-v3": _PRE_LLAMA3,
}
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFError(ValueError):
  """A file that is not a GGUF we can load, named with the reason."""


# ------------------------------------------------------------------ reading


def _open(path):
  """A `gguf.GGUFReader` over `path` (memory-mapped), after checking the magic bytes."""
  import gguf

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _MAGIC:
    raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, expected {_MAGIC!r}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises bare ValueError/IndexError on truncated files
    raise GGUFError(f"{path}: malformed GGUF file ({type(e).__name__}: {e})") from e


class _Metadata:
  """Typed access to a reader's key/value fields, with errors that name the file and key."""

  def __init__(self, reader, path: str):
    self.reader, self.path = reader, path

  def __contains__(self, key: str) -> bool:
    return key in self.reader.fields

  def get(self, key: str, default: Any = _REQUIRED) -> Any:
    field = self.reader.fields.get(key)
    if field is None:
      if default is _REQUIRED:
        raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
      return default
    return field.contents()

  def count(self, key: str) -> Optional[int]:
    """Length of an array field without decoding it (the token list is 100k+ strings)."""
    field = self.reader.fields.get(key)
    return None if field is None else len(field.data)


def _f32(x) -> float:
  """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.9999997e-06),
  which is the value the source config stated."""
  return float(str(np.float32(x)))


def _check_architecture(meta: _Metadata):
  arch = meta.get("general.architecture")
  if arch != _ARCH:
    raise GGUFError(
      f"{meta.path}: architecture {arch!r} is not supported; only {_ARCH!r} "
      "(Llama-family) GGUF files can be loaded"
    )


# ------------------------------------------------------------------ config


def _llama3_scaling_from_freqs(
  meta: _Metadata, base: DecoderConfig, divisors: np.ndarray
) -> RopeScaling:
  """The llama3 `RopeScaling` whose per-frequency divisors equal the `rope_freqs` tensor."""
  if divisors.shape != (base.head_dim // 2,):
    raise GGUFError(
      f"{meta.path}: tensor {_ROPE_FREQS!r} has shape {divisors.shape}, "
      f"expected ({base.head_dim // 2},)"
    )
  original = int(meta.get(f"{_ARCH}.rope.scaling.original_context_length", 8192))
  candidate = RopeScaling(
    factor=float(divisors.max()),
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=original,
  )
  implied = rope.inverse_frequencies(base) / rope.inverse_frequencies(
    base.replace(rope_scaling=candidate)
  )
  if not np.allclose(implied, divisors, rtol=1e-4, atol=0):
    raise ConfigError(
      f"{meta.path}: tensor {_ROPE_FREQS!r} is not llama3 frequency scaling with factor "
      f"{candidate.factor}, low_freq_factor 1, high_freq_factor 4 and original context "
      f"{original} (max divisor error {np.abs(implied - divisors).max():.3g}); other rope "
      "scalings are not supported"
    )
  return candidate


def _config(meta: _Metadata, tensors: dict, param_dtype: str, compute_dtype: str) -> DecoderConfig:
  _check_architecture(meta)
  key = lambda name, default=_REQUIRED: meta.get(f"{_ARCH}.{name}", default)  # noqa: E731
  if key("expert_count", 0):
    raise GGUFError(
      f"{meta.path}: mixture-of-experts Llama files (llama.expert_count="
      f"{key('expert_count')}) are not supported"
    )
  hidden = int(key("embedding_length"))
  heads = int(key("attention.head_count"))
  head_dim = int(key("attention.key_length", hidden // heads))
  if int(key("attention.value_length", head_dim)) != head_dim:
    raise GGUFError(f"{meta.path}: attention.value_length differs from key_length; not supported")
  rotary = int(key("rope.dimension_count", head_dim))
  if rotary != head_dim:
    raise GGUFError(
      f"{meta.path}: partial rotary embeddings (rope.dimension_count={rotary}, "
      f"head_dim={head_dim}) are not supported"
    )
  scaling_type = key("rope.scaling.type", "none")
  if scaling_type != "none":
    raise ConfigError(
      f"{meta.path}: rope scaling type {scaling_type!r} is not supported "
      "(llama3 scaling is read from the rope_freqs tensor)"
    )
  vocab = key("vocab_size", None) or meta.count("tokenizer.ggml.tokens")
  if vocab is None:
    if "token_embd.weight" not in tensors:
      raise GGUFError(f"{meta.path}: tensor 'token_embd.weight' is missing")
    vocab = int(tensors["token_embd.weight"].shape[-1])
  eos_ids = []
  for name in ("eos_token_id", "eot_token_id", "eom_token_id"):
    token = meta.get(f"tokenizer.ggml.{name}", None)
    if token is not None and int(token) not in eos_ids:
      eos_ids.append(int(token))
  bos = meta.get("tokenizer.ggml.bos_token_id", None)
  config = DecoderConfig(
    vocab_size=int(vocab),
    hidden_size=hidden,
    intermediate_size=int(key("feed_forward_length")),
    num_layers=int(key("block_count")),
    num_heads=heads,
    num_kv_heads=int(key("attention.head_count_kv", heads)),
    head_dim=head_dim,
    rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
    rope_theta=_f32(key("rope.freq_base", 10000.0)),
    max_position_embeddings=int(key("context_length", 131072)),
    tie_word_embeddings="output.weight" not in tensors,
    bos_token_id=None if bos is None else int(bos),
    eos_token_ids=tuple(eos_ids),
    param_dtype=param_dtype,
    dtype=compute_dtype,
  )
  if _ROPE_FREQS in tensors:
    divisors = _dequantized(tensors[_ROPE_FREQS], meta.path).astype(np.float64)
    config = config.replace(rope_scaling=_llama3_scaling_from_freqs(meta, config, divisors))
  return config


# ------------------------------------------------------------------ tensors


def _dequantized(tensor, path: str) -> np.ndarray:
  """float32 numpy array in numpy order (`[out, in]` for matrices), a view for F32 tensors."""
  import gguf

  numpy_shape = tuple(int(s) for s in reversed(tensor.shape))
  try:
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as e:
    raise GGUFError(
      f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which "
      f"gguf cannot dequantize ({e})"
    ) from e
  return w.reshape(numpy_shape)


def _tensor(tensors: dict, name: str, path: str):
  try:
    return tensors[name]
  except KeyError:
    raise GGUFError(f"{path}: tensor {name!r} is missing") from None


def _check_shape(name: str, w: np.ndarray, expected: tuple, path: str):
  if w.shape != tuple(expected):
    raise GGUFError(
      f"{path}: tensor {name!r} has shape {w.shape} (numpy order), but the config "
      f"needs {tuple(expected)}"
    )


def _fill_layer(out: np.ndarray, w: np.ndarray, kind: str, config: DecoderConfig):
  """Writes one layer's GGUF weight `w` (numpy `[out, in]`, or `[D]` for norms) into `out`."""
  if kind in ("attn_q", "attn_k"):
    heads = config.num_heads if kind == "attn_q" else config.num_kv_heads
    half = config.head_dim // 2
    # out[c, h, s, j] = w[h, j, s, c]: undo llama.cpp's interleaving and transpose in one copy.
    out.reshape(out.shape[0], heads, 2, half)[...] = w.reshape(
      heads, half, 2, w.shape[-1]
    ).transpose(3, 0, 2, 1)
  elif out.ndim == 2:
    out[...] = w.T
  else:
    out[...] = w


def _layer_leaf(
  config: DecoderConfig, tensors: dict, path: str, sub: tuple, shape: tuple, dtype
) -> np.ndarray:
  """One stacked `[L, ...]` leaf, filled layer by layer (one host copy in the storage dtype)."""
  kind = _LAYER_TENSORS[sub]
  out = np.empty(shape, dtype)
  for i in range(config.num_layers):
    name = f"blk.{i}.{kind}.weight"
    w = _dequantized(_tensor(tensors, name, path), path)
    expected = shape[1:] if len(shape) == 2 else shape[1:][::-1]
    _check_shape(name, w, expected, path)
    _fill_layer(out[i], w, kind, config)
  return out


def _global_leaf(tensors: dict, path: str, sub: tuple, shape: tuple, dtype) -> np.ndarray:
  name = _GLOBAL_TENSORS[sub]
  w = _dequantized(_tensor(tensors, name, path), path)
  # The output head is stored [V, D] like the embedding; our lm_head kernel is [D, V].
  transpose = sub == ("lm_head", "kernel")
  _check_shape(name, w, shape[::-1] if transpose else shape, path)
  return np.ascontiguousarray(w.T if transpose else w, dtype=dtype)


def _check_no_unused(tensors: dict, config: DecoderConfig, path: str):
  used = {_ROPE_FREQS, *(_GLOBAL_TENSORS.values())}
  used.update(
    f"blk.{i}.{kind}.weight" for i in range(config.num_layers) for kind in _LAYER_TENSORS.values()
  )
  unused = sorted(set(tensors) - used)
  if unused:
    # Silently dropping a bias or an extra layer would give a different model.
    more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
    raise GGUFError(f"{path}: tensors this Llama loader does not use: {unused[:5]}{more}")


def load_gguf(
  path, dtype: str = "float32", mesh=None, rules=None, compute_dtype: Optional[str] = None
) -> tuple[DecoderConfig, dict]:
  """Loads `(config, params)` from a llama-architecture `.gguf` file.

  Args:
    path: the `.gguf` file.
    dtype: storage dtype of every parameter leaf (weights are dequantised to fp32 first).
    mesh: optional ('data', 'fsdp', 'tensor') mesh; each leaf is placed on its `NamedSharding`
      from `markovian_jax.runtime.sharding.param_shardings`. Without one, leaves go to the default
      device.
    rules: logical-axis rules for the mesh (default `sharding.DEFAULT_RULES`).
    compute_dtype: matmul dtype (default: `dtype`).
  Returns:
    (DecoderConfig, params) with params laid out as documented in `markovian_jax.models.decoder`.
  """
  path = os.fspath(path)
  reader = _open(path)
  meta = _Metadata(reader, path)
  tensors = {t.name: t for t in reader.tensors}
  param_dtype = jnp.dtype(dtype).name
  config = _config(meta, tensors, param_dtype, jnp.dtype(compute_dtype or dtype).name)
  _check_no_unused(tensors, config, path)

  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  if mesh is not None:
    from markovian_jax.runtime import sharding

    shardings = sharding.param_shardings(
      shapes, mesh, sharding.DEFAULT_RULES if rules is None else rules
    )
  else:
    shardings = jax.tree.map(lambda _: None, shapes)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  flat_shardings = treedef.flatten_up_to(shardings)
  np_dtype = jnp.dtype(param_dtype)
  leaves = []
  for (key_path, leaf), leaf_sharding in zip(flat, flat_shardings):
    sub = tuple(str(getattr(k, "key", k)) for k in key_path)
    if sub[0] == "layers":
      host = _layer_leaf(config, tensors, path, sub[1:], leaf.shape, np_dtype)
    else:
      host = _global_leaf(tensors, path, sub, leaf.shape, np_dtype)
    leaves.append(jax.device_put(host, leaf_sharding))
    del host  # free this leaf's host copy before the next one is built
  return config, jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------ tokenizer


def _pre_tokenizer(kind: str):
  from tokenizers import Regex, pre_tokenizers

  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != _PRE_LLAMA3)
  if kind == _PRE_GPT2:
    return byte_level
  if kind == _PRE_DIGITS_GPT2:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  return pre_tokenizers.Sequence(
    [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level]
  )


def load_gguf_tokenizer(path):
  """A `transformers.PreTrainedTokenizerFast` built from a byte-level BPE GGUF's tokenizer fields.

  Vocabulary and merges come from `tokenizer.ggml.tokens/merges`; the split rule from
  `tokenizer.ggml.pre` (llama.cpp's name); CONTROL tokens become special tokens, USER_DEFINED ones
  added tokens; bos/eos/unk/pad, whether BOS/EOS are added, and the chat template come from the
  metadata. Sentencepiece ('llama') and other tokenizer models are rejected.
  """
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  st = os.stat(path)
  backend, kwargs = _tokenizer_parts(path, st.st_ino, st.st_size, st.st_mtime_ns)
  # A new object per call: callers may set padding or truncation on theirs.
  return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(backend), **dict(kwargs))


@functools.lru_cache(maxsize=8)
def _tokenizer_parts(path: str, inode: int, size: int, mtime_ns: int) -> tuple[str, tuple]:
  """(the `tokenizers` JSON, the special-token keyword arguments) of one version (inode, size,
  modification time) of a GGUF file. Kept per process: reading the header walks every metadata
  entry in Python (about 3 s for a 49k-token vocabulary), and a process that builds several runs
  or readers loads the same tokenizer each time. Errors are raised, not kept."""
  del inode, size, mtime_ns  # part of the key only: a rewritten file is read again
  from tokenizers import AddedToken, Tokenizer, decoders, models

  meta = _Metadata(_open(path), path)
  model = meta.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise GGUFError(
      f"{path}: tokenizer model {model!r} is not supported; only byte-level BPE "
      "('gpt2', as in Llama 3 and SmolLM2) GGUF tokenizers can be built"
    )
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise GGUFError(
      f"{path}: pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_TOKENIZERS)}"
    )
  kind = _PRE_TOKENIZERS[pre]
  tokens = list(meta.get("tokenizer.ggml.tokens"))
  merges = []
  for i, merge in enumerate(meta.get("tokenizer.ggml.merges")):
    pair = merge.split(" ")
    if len(pair) != 2:
      raise GGUFError(f"{path}: merge #{i} {merge!r} is not two space-separated tokens")
    merges.append(tuple(pair))
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise GGUFError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
  # llama.cpp looks a whole Llama-3 pre-token up in the vocabulary before merging, as tiktoken does.
  bpe = models.BPE(
    vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=kind == _PRE_LLAMA3
  )
  backend = Tokenizer(bpe)
  backend.pre_tokenizer = _pre_tokenizer(kind)
  backend.decoder = decoders.ByteLevel()
  types = meta.get("tokenizer.ggml.token_type", None) or []
  backend.add_special_tokens(
    [
      AddedToken(t, special=True, normalized=False)
      for t, ty in zip(tokens, types)
      if ty == _CONTROL
    ]
  )
  backend.add_tokens(
    [
      AddedToken(t, special=False, normalized=False)
      for t, ty in zip(tokens, types)
      if ty == _USER_DEFINED
    ]
  )

  def token(name):
    index = meta.get(f"tokenizer.ggml.{name}", None)
    if index is None:
      return None
    if not 0 <= int(index) < len(tokens):
      raise GGUFError(
        f"{path}: tokenizer.ggml.{name}={index} is outside the vocabulary of {len(tokens)}"
      )
    return tokens[int(index)]

  kwargs = dict(
    bos_token=token("bos_token_id"),
    eos_token=token("eos_token_id"),
    unk_token=token("unknown_token_id"),
    pad_token=token("padding_token_id"),
    add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
  )
  template = meta.get("tokenizer.chat_template", None)
  if template is not None:
    kwargs["chat_template"] = template
  return backend.to_str(), tuple(kwargs.items())
