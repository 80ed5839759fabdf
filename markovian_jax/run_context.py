"""What train.py and evaluate.py both need: the mesh, the base model, the tokenizer, the prompts.

Host/device transfer helpers live here too, written for many processes: every process builds the
same global host batch and `put` hands each device its own slice; `fetch` gathers a global array
back to every host.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from markovian_jax import batching, config_validation, sharding
from markovian_jax import data as data_lib
from markovian_jax.models import LlamaConfig, load_checkpoint, load_tokenizer

log = logging.getLogger(__name__)


def put(array: np.ndarray, mesh, batch_sharded: bool = True) -> jax.Array:
  """A global device array from a host array that every process holds in full."""
  array = np.asarray(array)
  sh = sharding.batch_sharding(mesh, array.shape) if batch_sharded else sharding.replicated(mesh)
  return jax.make_array_from_callback(array.shape, sh, lambda idx: array[idx])


def fetch(x) -> np.ndarray:
  """The full value of a (possibly multi-process) global array, on this host."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


@dataclasses.dataclass
class RunContext:
  config: object  # the run's ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: LlamaConfig
  params: dict
  tokenizer: object
  eos_ids: tuple

  @classmethod
  def create(cls, config, mesh=None) -> "RunContext":
    config_validation.validate(config)
    mesh = mesh or config_validation.make_mesh(config)
    model, params = load_checkpoint(config.model.path, dtype=config.model.dtype, mesh=mesh)
    model = model.replace(remat=config.model.remat)
    tokenizer = load_tokenizer(config.model.path)
    eos = tuple(model.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
      eos = eos + (tokenizer.eos_token_id,)
    log.info("model %s: %d layers, d=%d, vocab %d, %s; mesh %s", config.model.path,
             model.num_layers, model.hidden_size, model.vocab_size, config.model.dtype,
             dict(mesh.shape))
    return cls(config, mesh, model, params, tokenizer, eos)

  @property
  def task(self) -> str:
    return self.config.task

  @property
  def cot_length(self) -> int:
    return self.config.sampling.cot_length

  def load_examples(self, split: str, limit: Optional[int] = None):
    c = self.config
    options = data_lib.task_options(c.task, c.data, self.tokenizer)
    examples = data_lib.load_task(c.task, split, c.data.path or None, **options)
    return examples[:limit] if limit else examples

  # ------------------------------------------------------------- prompts as token ids
  def cot_prompt_ids(self, example) -> list:
    c = self.config
    text = data_lib.cot_prompt(c.task, example.question, self.cot_length,
                               target_length=c.data.target_length, prompt_format=c.prompt.format,
                               tokenizer=self.tokenizer)
    return data_lib.encode(self.tokenizer, text, c.prompt.format)

  def answer_prefix(self, example, cot_text: str) -> str:
    c = self.config
    return data_lib.answer_prompt(c.task, example.question, cot_text, self.cot_length,
                                  markovian=c.prompt.markovian,
                                  target_length=c.data.target_length,
                                  prompt_format=c.prompt.format, tokenizer=self.tokenizer)

  def answer_rows(self, examples: Sequence, cot_texts: Sequence[str], multiple: int = 32):
    """Scoring rows "answer prompt(CoT) + gold answer", left-padded to a bucketed length.

    Returns (tokens int32 [N, A], mask bool [N, A], span bool [N, A]).
    """
    rows = [data_lib.answer_tokens(self.tokenizer, self.answer_prefix(ex, cot), ex.answer,
                                   self.config.prompt.format)
            for ex, cot in zip(examples, cot_texts)]
    length = batching.bucket(max(len(r.ids) for r in rows), multiple)
    tokens, mask = batching.pad_left([r.ids for r in rows], length)
    span, _ = batching.pad_left([r.mask.astype(np.int32) for r in rows], length)
    return tokens, mask, span.astype(bool)

  def decode(self, tokens: np.ndarray) -> list:
    return self.tokenizer.batch_decode(np.asarray(tokens), skip_special_tokens=True)
