"""HF model directories of every family <-> our params, and PEFT LoRA adapters <-> `LoraAdapter`.

Llama, Mistral, Qwen2, Qwen3, Phi-3 (`_hf_name`):

    HF tensor (Linear weights [out, in])                our leaf (kernels [in, out], stacked [L])
    model.embed_tokens.weight                [V, D]     embed/embedding             [V, D]
    model.layers.{i}.input_layernorm.weight  [D]        layers/attn_norm/scale      [L, D]
    model.layers.{i}.self_attn.q_proj.weight [Hq*Dh, D] layers/attn/q/kernel        [L, D, Hq*Dh]
                       ... k_proj, v_proj, o_proj       layers/attn/{k,v,o}/kernel
    model.layers.{i}.post_attention_layernorm.weight    layers/mlp_norm/scale       [L, D]
    model.layers.{i}.mlp.gate_proj.weight    [F, D]     layers/mlp/gate/kernel      [L, D, F]
                       ... up_proj, down_proj           layers/mlp/{up,down}/kernel
    model.norm.weight                        [D]        final_norm/scale            [D]
    lm_head.weight                           [V, D]     lm_head/kernel (not tied)   [D, V]
    ...self_attn.{q,k,v,o}_proj.bias, mlp.*.bias        .../bias                    [L, out]
    ...self_attn.{q,k}_norm.weight (Qwen3)   [Dh]       layers/attn/{q,k}_norm/scale [L, Dh]
    ...self_attn.qkv_proj.weight (Phi-3)                layers/attn/qkv/kernel
    ...mlp.gate_up_proj.weight (Phi-3)                  layers/mlp/gate_up/kernel

GPT-2 (Conv1D weights are stored [in, out], as ours; the "transformer." prefix is optional):

    transformer.wte.weight / wpe.weight                 embed/embedding, pos_embed/embedding
    transformer.h.{i}.ln_1 / ln_2 .weight, .bias        layers/{attn,mlp}_norm/{scale,bias}
    transformer.h.{i}.attn.c_attn / attn.c_proj         layers/attn/{qkv,o}/{kernel,bias}
    transformer.h.{i}.mlp.c_fc / mlp.c_proj             layers/mlp/{up,down}/{kernel,bias}
    transformer.ln_f.weight, .bias                      final_norm/{scale,bias}

A PEFT adapter names the same modules: `base_model.model.<module>.lora_A.weight` [r, in] is our `a`
transposed and `...lora_B.weight` [out, r] our `b` transposed; both scale the update by alpha / r
(for GPT-2's Conv1D modules PEFT records fan_in_fan_out, which changes only how it merges).

Loading streams: each leaf is built by `jax.make_array_from_callback`, whose callback reads from the
memory-mapped safetensors only the layers and slices of the shard a device owns. The host never
holds the model twice, and on a pod each process reads only what its own devices hold.

The module is longer than our usual 400 lines on purpose: the loader, the full-weight writer and
the PEFT adapter reader/writer all work from the one name table above; split apart, each part would
have to restate it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
from typing import Optional, Union

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from markovian_jax.models import decoder
from markovian_jax.models import lora as lora_lib
from markovian_jax.models.config import DecoderConfig
from markovian_jax.runtime import sharding
from markovian_jax.runtime.errors import CheckpointError
from markovian_jax.runtime.files import read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


# Our module name -> the HF module, per naming style ("{i}" marks the layer).
_LLAMA_MODULES = {
  **{("attn", n): f"model.layers.{{i}}.self_attn.{n}_proj" for n in ("q", "k", "v", "o", "qkv")},
  **{("mlp", n): f"model.layers.{{i}}.mlp.{n}_proj" for n in ("gate", "up", "down", "gate_up")},
}
_GPT2_MODULES = {
  ("attn", "qkv"): "transformer.h.{i}.attn.c_attn",
  ("attn", "o"): "transformer.h.{i}.attn.c_proj",
  ("mlp", "up"): "transformer.h.{i}.mlp.c_fc",
  ("mlp", "down"): "transformer.h.{i}.mlp.c_proj",
}
_LLAMA_OTHER = {
  "embed/embedding": "model.embed_tokens.weight",
  "layers/attn_norm/scale": "model.layers.{i}.input_layernorm.weight",
  "layers/mlp_norm/scale": "model.layers.{i}.post_attention_layernorm.weight",
  "layers/attn/q_norm/scale": "model.layers.{i}.self_attn.q_norm.weight",
  "layers/attn/k_norm/scale": "model.layers.{i}.self_attn.k_norm.weight",
  "final_norm/scale": "model.norm.weight",
  "lm_head/kernel": "lm_head.weight",
}
_GPT2_OTHER = {
  "embed/embedding": "transformer.wte.weight",
  "pos_embed/embedding": "transformer.wpe.weight",
  **{
    f"layers/{ours}_norm/{leaf}": f"transformer.h.{{i}}.{theirs}.{hf_leaf}"
    for ours, theirs in (("attn", "ln_1"), ("mlp", "ln_2"))
    for leaf, hf_leaf in (("scale", "weight"), ("bias", "bias"))
  },
  "final_norm/scale": "transformer.ln_f.weight",
  "final_norm/bias": "transformer.ln_f.bias",
  "lm_head/kernel": "lm_head.weight",
}
# Buffers some exporters save beside the weights (RoPE is recomputed from the config; GPT-2's
# causal-mask buffers are rebuilt by the attention mask).
_IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def _modules(config: DecoderConfig) -> dict:
  """{(module, name): HF module path with "{i}"} in this family's naming."""
  return _GPT2_MODULES if config.model_type == "gpt2" else _LLAMA_MODULES


def _hf_name(config: DecoderConfig, leaf_path: str) -> tuple[str, bool]:
  """(HF tensor name with "{i}" for a stacked leaf, HF stores the transpose) of one of our
  leaves."""
  gpt2 = config.model_type == "gpt2"
  parts = leaf_path.split("/")
  if len(parts) == 4 and parts[0] == "layers" and parts[3] in ("kernel", "bias"):
    module = _modules(config).get((parts[1], parts[2]))
    if module is not None:
      # torch Linear stores [out, in]; GPT-2's Conv1D stores [in, out] as we do.
      return (
        f"{module}.{'weight' if parts[3] == 'kernel' else 'bias'}",
        parts[3] == "kernel" and not gpt2,
      )
  other = (_GPT2_OTHER if gpt2 else _LLAMA_OTHER).get(leaf_path)
  if other is None:
    raise CheckpointError(
      f"no HF name for our parameter {leaf_path} of a {config.model_type} model"
    )
  return other, leaf_path == "lm_head/kernel"


def _table(config: DecoderConfig) -> list:
  """[(HF name with "{i}", our leaf path, transposed)] for every leaf of this config's params."""
  abstract = jax.eval_shape(lambda: decoder.init_params(config, jax.random.PRNGKey(0)))
  paths = [sharding.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)]
  return [(name, p, transposed) for p in paths for name, transposed in (_hf_name(config, p),)]


def _canonical_names(weight_map: dict, config: DecoderConfig) -> dict:
  """{canonical HF name: name in the checkpoint}. GPT-2 checkpoints saved from `GPT2Model` (the
  original `gpt2` upload) lack the "transformer." prefix that `GPT2LMHeadModel` writes."""
  if config.model_type != "gpt2":
    return {n: n for n in weight_map}
  return {
    (n if n.startswith(("transformer.", "lm_head.")) else "transformer." + n): n for n in weight_map
  }


# ------------------------------------------------------------------ loading


@dataclasses.dataclass
class _Source:
  """The safetensors slices (one per layer for a stacked leaf) that make up one of our leaves."""

  slices: list
  stacked: bool
  transposed: bool


def _weight_map(path: str) -> dict:
  """{HF tensor name: safetensors file name} from the index, or from a single model.safetensors."""
  index = os.path.join(path, INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as f:
      try:
        weight_map = json.load(f).get("weight_map")
      except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a safetensors index: {e}") from None
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{index} has no 'weight_map'")
    absent = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
    if absent:
      raise FileNotFoundError(f"{index} names shard file(s) missing from {path}: {absent}")
    return weight_map
  single = os.path.join(path, WEIGHTS_NAME)
  if os.path.isfile(single):
    with safe_open(single, framework="numpy") as f:
      return {name: WEIGHTS_NAME for name in f.keys()}
  raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _check_no_unexpected(names: dict, table: list, config: DecoderConfig, path: str):
  """A tensor we would not read means the checkpoint is not the model its config describes.
  names: {canonical HF name: name in the checkpoint}; table: `_table(config)`."""
  expected = {
    t.format(i=i) for t, _, _ in table for i in range(config.num_layers if "{i}" in t else 1)
  }
  unexpected = []
  for name in sorted(names):
    if _IGNORED.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
      continue
    if name not in expected:
      unexpected.append(names[name])
  if unexpected:
    raise CheckpointError(
      f"{path}: tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} do not belong "
      f"to the {config.model_type} model with num_hidden_layers={config.num_layers} that "
      "config.json describes"
    )


def _resolve(
  leaf_path: str,
  shape: tuple,
  config: DecoderConfig,
  by_path: dict,
  names: dict,
  weight_map: dict,
  files: dict,
  keys: dict,
  path: str,
) -> _Source:
  """Finds and shape-checks the HF tensors of one leaf (before any data is read)."""
  template, transposed = by_path[leaf_path]
  stacked = "{i}" in template
  wanted = [template.format(i=i) for i in range(config.num_layers)] if stacked else [template]
  per_tensor = tuple(shape[1:] if stacked else shape)
  expected = per_tensor[::-1] if transposed else per_tensor
  slices = []
  for canonical in wanted:
    name = names.get(canonical, canonical)
    file = weight_map.get(name)
    if file is None or name not in keys[file]:
      where = f"{file} (listed in {INDEX_NAME})" if file else path
      raise CheckpointError(f"tensor {name} is missing from {where}")
    tensor = files[file].get_slice(name)
    found = tuple(tensor.get_shape())
    if found != expected:
      raise CheckpointError(
        f"tensor {name} in {file} has shape {list(found)}, but config.json implies {list(expected)}"
      )
    slices.append(tensor)
  return _Source(slices, stacked, transposed)


def _read_block(source: _Source, index: tuple, shape: tuple, dtype) -> np.ndarray:
  """The block `leaf[index]` of a leaf of global `shape`, read from the safetensors slices."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = np.empty([len(range(n)[s]) for n, s in zip(shape, index)], dtype)

  def one(tensor, idx):
    return tensor[tuple(reversed(idx))].T if source.transposed else tensor[tuple(idx)]

  if source.stacked:
    for j, layer in enumerate(range(shape[0])[index[0]]):
      out[j] = one(source.slices[layer], index[1:])
  else:
    out[...] = one(source.slices[0], index)
  return out


def _build(source: _Source, abstract: jax.ShapeDtypeStruct, leaf_sharding) -> jax.Array:
  # A replicated leaf asks for the same block once per device: read it once.
  blocks: dict = {}

  def callback(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in blocks:
      blocks[key] = _read_block(source, index, abstract.shape, abstract.dtype)
    return blocks[key]

  return jax.make_array_from_callback(abstract.shape, leaf_sharding, callback)


def load_hf(
  path, dtype="float32", mesh=None, rules=None, compute_dtype=None
) -> tuple[DecoderConfig, dict]:
  """Loads `(config, params)` from an HF directory of any supported family (config.json +
  safetensors); an unsupported model_type is a ConfigError before any tensor is opened.

  Args:
    path: directory with config.json (published-3.1 or transformers-5 rope layout) and either
      model.safetensors or model.safetensors.index.json with its shards.
    dtype: storage dtype of the loaded weights (e.g. "float32", "bfloat16"); also the compute dtype
      unless `compute_dtype` is given.
    mesh, rules: place each leaf on its `NamedSharding` from `sharding.param_shardings`; without a
      mesh every leaf goes to the first local device.
  Returns:
    (DecoderConfig, params tree in the layout of `decoder.init_params`, leaves in `dtype`).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"HF model directory does not exist: {path}")
  dtype = jnp.dtype(dtype).name
  config = DecoderConfig.from_json_file(
    os.path.join(path, CONFIG_NAME), param_dtype=dtype, dtype=jnp.dtype(compute_dtype or dtype).name
  )
  abstract = jax.eval_shape(lambda: decoder.init_params(config, jax.random.PRNGKey(0)))
  shardings = sharding.placement(abstract, mesh, rules)
  weight_map = _weight_map(path)
  table = _table(config)
  by_path = {leaf: (name, transposed) for name, leaf, transposed in table}
  names = _canonical_names(weight_map, config)
  _check_no_unexpected(names, table, config, path)
  with contextlib.ExitStack() as stack:
    files = {
      f: stack.enter_context(safe_open(os.path.join(path, f), framework="numpy"))
      for f in sorted(set(weight_map.values()))
    }
    keys = {f: set(h.keys()) for f, h in files.items()}
    sources = jax.tree_util.tree_map_with_path(
      lambda p, leaf: _resolve(
        sharding.path_str(p), leaf.shape, config, by_path, names, weight_map, files, keys, path
      ),
      abstract,
    )
    params = jax.tree.map(_build, sources, abstract, shardings)
  return config, params


# tokenizer_config.json's tokenizer_class values that name the plain tokenizers-backed class.
GENERIC_TOKENIZER_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def load_hf_tokenizer(path):
  """The directory's tokenizer (`tokenizer.json`, plus `tokenizer_config.json` when present),
  loaded offline. Returns a `transformers.PreTrainedTokenizerFast`."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"HF model directory does not exist: {path}")
  tokenizer_file = os.path.join(path, TOKENIZER_NAME)
  if not os.path.isfile(tokenizer_file):
    raise FileNotFoundError(
      f"no {TOKENIZER_NAME} in {path}: a fast (tokenizers) tokenizer is needed"
    )
  from transformers import PreTrainedTokenizerFast

  config_file = os.path.join(path, "tokenizer_config.json")
  if not os.path.isfile(config_file):
    return PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
  # The config carries the special tokens and chat template that tokenizer.json lacks. A generic
  # class (ours, and transformers 5's own saves) is what AutoTokenizer would build, without its
  # import of AutoConfig and torch (~5 s of CPU per process); a model's own class goes through it.
  with open(config_file) as f:
    tokenizer_class = json.load(f).get("tokenizer_class")
  if tokenizer_class in GENERIC_TOKENIZER_CLASSES:
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ------------------------------------------------------------------ export


def _to_host(x) -> np.ndarray:
  """A full copy on every process (an all-gather when the array spans other processes' devices)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _parse_size(size: Union[int, str]) -> int:
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
  if not match:
    raise ValueError(f"max_shard_size={size!r}: use bytes (int) or e.g. '5GB', '200MB'")
  return int(float(match.group(1)) * 1000 ** " KMG".index(match.group(2) or " "))


def _hf_tensors(config: DecoderConfig, params: dict) -> list:
  """[(HF name, shape, dtype, thunk returning the numpy tensor)] in table order."""
  out = []
  leaves = {sharding.path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  for template, leaf_path, transposed in _table(config):
    if leaf_path not in leaves:
      raise CheckpointError(f"params have no leaf {leaf_path}")
    leaf = leaves[leaf_path]
    stacked = "{i}" in template
    shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
    shape = shape[::-1] if transposed else shape
    for i in range(config.num_layers if stacked else 1):

      def thunk(leaf=leaf, i=i, stacked=stacked, transposed=transposed):
        x = _to_host(leaf[i] if stacked else leaf)
        return np.ascontiguousarray(x.T if transposed else x)

      out.append((template.format(i=i), shape, np.dtype(leaf.dtype), thunk))
  return out


def save_hf(
  config: DecoderConfig,
  params: dict,
  out_dir,
  tokenizer=None,
  max_shard_size: Union[int, str] = "5GB",
):
  """Writes an HF directory of the config's family that its transformers class loads.

  config.json comes from `config.to_hf()`; weights keep their dtype (`config.param_dtype`) and are
  split into `model-0000k-of-0000n.safetensors` + index when over `max_shard_size` (bytes or e.g.
  "5GB"); only one shard is on the host at a time. Every process must call this (sharded leaves are
  gathered); process 0 writes.
  """
  out_dir = os.fspath(out_dir)
  limit = _parse_size(max_shard_size)
  tensors = _hf_tensors(config, params)
  shards: list = [[]]
  size = 0
  for t in tensors:
    nbytes = math.prod(t[1]) * t[2].itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  names = (
    [WEIGHTS_NAME]
    if len(shards) == 1
    else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  )
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    # A stale index or shard left from an earlier export would be loaded instead of (or mixed with)
    # the new weights.
    for stale in glob.glob(os.path.join(out_dir, "model*.safetensors*")):
      os.remove(stale)
  weight_map = {}
  for file, shard in zip(names, shards):
    arrays = {name: thunk() for name, _, _, thunk in shard}
    if writer:
      save_file(arrays, os.path.join(out_dir, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in arrays})
    del arrays
  if not writer:
    return
  if len(shards) > 1:
    total = sum(math.prod(t[1]) * t[2].itemsize for t in tensors)
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
    json.dump(config.to_hf(), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)


def save_merged_hf(
  config: DecoderConfig,
  params: dict,
  lora: lora_lib.LoraAdapter,
  out_dir,
  tokenizer=None,
  max_shard_size: Union[int, str] = "5GB",
):
  """`save_hf` of the base with the adapter folded into its kernels: a plain Llama that any runtime
  loads."""
  save_hf(
    config,
    lora_lib.merge(params, lora),
    out_dir,
    tokenizer=tokenizer,
    max_shard_size=max_shard_size,
  )


# ------------------------------------------------------------------ PEFT adapters

_PEFT_PREFIX = "base_model.model."
# adapter_config.json options that change what the tensors mean; only their neutral values are
# supported (a missing key is neutral).
_PEFT_NEUTRAL = {
  "use_dora": False,
  "use_rslora": False,
  "bias": "none",
  "fan_in_fan_out": False,
  "modules_to_save": None,
  "rank_pattern": {},
  "alpha_pattern": {},
  "layers_to_transform": None,
  "lora_bias": False,
  "layer_replication": None,
  "target_parameters": None,
  "trainable_token_indices": None,
  "use_qalora": False,
  "alora_invocation_tokens": None,
  "use_bdlora": None,
}


def _peft_target_modules(config: DecoderConfig, targeted) -> list:
  """PEFT `target_modules` for our targeted (module, name) pairs: the HF short names ('q_proj',
  'qkv_proj', 'c_attn'), or the last two components ('attn.c_proj') where a short name also
  matches a module of this family that is not targeted (GPT-2's two c_proj)."""
  modules = _modules(config)
  present = {(m, n) for n, (m, _, _) in lora_lib.module_table(config).items()}
  out = set()
  for key in targeted:
    short = modules[key].rsplit(".", 1)[-1]
    sharing = {k for k in present if modules[k].rsplit(".", 1)[-1] == short}
    out.add(short if sharing <= set(targeted) else ".".join(modules[key].rsplit(".", 2)[-2:]))
  return sorted(out)


def _peft_keys(config: DecoderConfig) -> dict:
  """{adapter tensor name: ((module, name), layer, 'a' | 'b')} of every LoRA tensor a PEFT adapter
  of this family may hold."""
  modules = _modules(config)
  out = {}
  for name, (module, _, _) in lora_lib.module_table(config).items():
    for i in range(config.num_layers):
      prefix = _PEFT_PREFIX + modules[(module, name)].format(i=i)
      out[prefix + ".lora_A.weight"] = ((module, name), i, "a")
      out[prefix + ".lora_B.weight"] = ((module, name), i, "b")
  return out


def peft_tensors(lora: lora_lib.LoraAdapter, config: DecoderConfig) -> dict:
  """{PEFT adapter key: numpy [r, in] (A) or [out, r] (B)} of an adapter (or of any tree of its
  layout, e.g. its gradient), named as the family's PEFT adapter names them."""
  shapes = lora_lib.target_shapes(config, lora.targets)
  tensors = {}
  for (module, name), (n_in, n_out) in sorted(shapes.items()):
    group = lora.params["layers"][module][name]
    a, b = _to_host(group["a"]), _to_host(group["b"])
    want_a, want_b = (config.num_layers, n_in, lora.rank), (config.num_layers, lora.rank, n_out)
    if a.shape != want_a or b.shape != want_b:
      raise CheckpointError(
        f"LoRA {module}/{name}: a {a.shape}, b {b.shape} do not match the "
        f"config and rank {lora.rank} (expected {want_a}, {want_b})"
      )
    for i in range(config.num_layers):
      prefix = _PEFT_PREFIX + _modules(config)[(module, name)].format(i=i)
      tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)
      tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)
  return tensors


def save_peft_adapter(
  lora: lora_lib.LoraAdapter,
  config: DecoderConfig,
  out_dir,
  base_model_name_or_path: Optional[str] = None,
):
  """Writes a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) that
  `peft.PeftModel.from_pretrained(<the family's transformers model>, out_dir)` loads. Tensors
  keep the adapter's dtype; the LoRA update of each module is `(alpha / r) * x @ A.T @ B.T` in
  PEFT's terms."""
  out_dir = os.fspath(out_dir)
  shapes = lora_lib.target_shapes(config, lora.targets)
  tensors = peft_tensors(lora, config)
  alpha = int(lora.alpha) if float(lora.alpha).is_integer() else float(lora.alpha)
  adapter_config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_name_or_path,
    "r": lora.rank,
    "lora_alpha": alpha,
    "lora_dropout": float(lora.dropout),
    "target_modules": _peft_target_modules(config, shapes),
    "bias": "none",
    # PEFT's flag for GPT-2's Conv1D modules (their weights are [in, out]).
    "fan_in_fan_out": config.model_type == "gpt2",
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "inference_mode": True,
    "init_lora_weights": True,
    "revision": None,
  }
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
  with open(os.path.join(out_dir, ADAPTER_CONFIG_NAME), "w") as f:
    json.dump(adapter_config, f, indent=2)


def _read_adapter_config(path: str, config: DecoderConfig) -> dict:
  file = os.path.join(path, ADAPTER_CONFIG_NAME)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {path}")
  cfg = read_json(file)
  if cfg.get("peft_type") != "LORA":
    raise CheckpointError(f"{file}: peft_type={cfg.get('peft_type')!r}, only 'LORA' is supported")
  for key in ("r", "lora_alpha"):
    if key not in cfg:
      raise CheckpointError(f"{file} is missing {key!r}")
  # fan_in_fan_out is how PEFT marks GPT-2's Conv1D modules; the A/B tensors are the same.
  unsupported = {
    k: cfg[k]
    for k, neutral in _PEFT_NEUTRAL.items()
    if cfg.get(k, neutral) not in (neutral, None, False, {}, [])
    and not (k == "fan_in_fan_out" and config.model_type == "gpt2")
  }
  if unsupported:
    raise CheckpointError(f"{file}: unsupported LoRA options {unsupported}")
  return cfg


def load_peft_adapter(
  path, config: DecoderConfig, dtype="float32", mesh=None, rules=None
) -> lora_lib.LoraAdapter:
  """Reads a PEFT LoRA adapter directory into a `LoraAdapter`.

  Leaves are `a` [L, in, r] and `b` [L, r, out] in `dtype`; the targets are the modules whose
  weights the file holds; rank, alpha and dropout come from adapter_config.json. With a mesh the
  leaves are placed by the sharding rules.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"adapter directory does not exist: {path}")
  cfg = _read_adapter_config(path, config)
  weights = os.path.join(path, ADAPTER_WEIGHTS_NAME)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {path}")
  rank = int(cfg["r"])
  known = _peft_keys(config)
  with safe_open(weights, framework="numpy") as f:
    keys = set(f.keys())
    unexpected = sorted(k for k in keys if k not in known)
    found = {known[k][0] for k in keys if k in known}
    if unexpected:
      raise CheckpointError(
        f"{weights}: tensors {unexpected[:8]} are not LoRA A/B weights of the "
        f"{config.num_layers} decoder layers' linear projections of this "
        f"{config.model_type} model"
      )
    declared = cfg.get("target_modules")
    if isinstance(declared, (list, tuple)):
      names = set(_peft_target_modules(config, found))
      if set(declared) != names:
        raise CheckpointError(
          f"{path}: target_modules {sorted(declared)} in {ADAPTER_CONFIG_NAME} "
          f"but the weights hold {sorted(names)}"
        )
    if not found:
      raise CheckpointError(f"{weights} holds no LoRA weights")
    shapes = lora_lib.target_shapes(config, sorted({n for _, n in found}))
    layers: dict = {}
    for (module, name), (n_in, n_out) in sorted(shapes.items()):
      stacks = {"a": [], "b": []}
      for i in range(config.num_layers):
        prefix = _PEFT_PREFIX + _modules(config)[(module, name)].format(i=i)
        for leaf, suffix, expected in (
          ("a", ".lora_A.weight", (rank, n_in)),
          ("b", ".lora_B.weight", (n_out, rank)),
        ):
          key = prefix + suffix
          if key not in keys:
            raise CheckpointError(f"tensor {key} is missing from {weights}")
          found_shape = tuple(f.get_slice(key).get_shape())
          if found_shape != expected:
            raise CheckpointError(
              f"tensor {key} has shape {list(found_shape)}, expected "
              f"{list(expected)} (r={rank} and the model config)"
            )
          stacks[leaf].append(f.get_tensor(key).T)
      layers.setdefault(module, {})[name] = {
        k: jnp.asarray(np.stack(v), dtype) for k, v in stacks.items()
      }
  adapter = lora_lib.LoraAdapter(
    {"layers": layers},
    rank=rank,
    alpha=float(cfg["lora_alpha"]),
    dropout=float(cfg.get("lora_dropout", 0.0)),
  )
  if mesh is not None:
    adapter = adapter.replace(
      params=sharding.shard_tree(adapter.params, mesh, rules or sharding.DEFAULT_RULES)
    )
  return adapter
