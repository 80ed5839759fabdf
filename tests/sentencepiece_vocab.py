"""Mistral's real SentencePiece vocabularies, from the tokenizer files that `mistral-common` ships.

`mistral-common` (Apache-2.0) is a test-only dependency whose files the Makefile installs with
--no-deps into `.venv/test-data/mistral-common`, off the import path: only its data files are read.
(Importable without its dependencies, it would break transformers, which imports it to probe every
Mistral tokenizer it loads.) Two vocabularies:

    v1  tokenizer.model.v1                             32000 pieces: Mistral-7B v0.1 / v0.2 (the
                                                       paper's reader Mistral-7B-Instruct-v0.2)
    v3  mistral_instruct_tokenizer_240323.model.v3     32768 pieces: Mistral-7B v0.3, with [INST]
                                                       and [/INST] as control tokens

transformers converts a `tokenizer.model` into a fast (tokenizers) tokenizer with its SentencePiece
converter, which needs the `sentencepiece` package. Both are Metaspace vocabularies, as Llama-2's
(Phi-3.5's) is: a word-start mark "▁" replaces the space, so ":" alone is "▁:" while the colon of
"Answer:" in a text is ":".
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile

from tests import helpers

FILES = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}
# Mistral-7B-Instruct's user/assistant template (its tokenizer_config.json), without the check
# that roles alternate.
CHAT_TEMPLATE = (
  "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
  "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
  "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


# Where the Makefile installs the package (MARKOVIAN_MISTRAL_COMMON overrides it).
INSTALLED = os.environ.get(
  "MARKOVIAN_MISTRAL_COMMON", os.path.join(sys.prefix, "test-data", "mistral-common")
)


def model_file(version: str) -> str:
  """The path of `mistral-common`'s tokenizer.model file of vocabulary `version` (v1 or v3)."""
  path = os.path.join(INSTALLED, "mistral_common", "data", FILES[version])
  if not os.path.isfile(path):
    helpers.missing(
      f"{path} not found: pip install --no-deps --target {INSTALLED} "
      "mistral-common==1.13.1 (as the Makefile does)"
    )
  return path


@functools.lru_cache(maxsize=None)
def mistral_tokenizer(version: str):
  """A `transformers` fast tokenizer of Mistral vocabulary `version`: BOS <s> added, EOS </s>, and
  Mistral-Instruct's chat template."""
  helpers.require("sentencepiece")
  from transformers import LlamaTokenizer

  with tempfile.TemporaryDirectory() as tmp:
    shutil.copy(model_file(version), os.path.join(tmp, "tokenizer.model"))
    tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
  assert tok.is_fast and len(tok) == {"v1": 32000, "v3": 32768}[version]
  tok.chat_template = CHAT_TEMPLATE
  return tok


def tiny_mistral_dir(version: str, path: str) -> str:
  """Writes a tiny random Mistral (2 layers, d=64) carrying vocabulary `version` as an HF
  directory at `path` (config.json model_type=mistral, safetensors, tokenizer.json)."""
  import jax

  from markovian_jax.models import hf, init_params

  tok = mistral_tokenizer(version)
  config = helpers.tiny_config(
    model_type="mistral",
    vocab_size=len(tok),
    bos_token_id=tok.bos_token_id,
    eos_token_ids=(tok.eos_token_id,),
    rope_scaling=None,
  )
  hf.save_hf(config, init_params(config, jax.random.PRNGKey(0)), path, tokenizer=tok)
  return path
