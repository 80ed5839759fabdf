"""What train.py and evaluate.py both need: the examples, the mesh, the base model, the tokenizer,
the prompts.

Host/device transfer helpers live here too, written for many processes: every process builds the
same global host batch and `put` hands each device its own slice; `fetch` gathers a global array
back to every host.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from markovian_jax import data as data_lib
from markovian_jax.models import (
  DecoderConfig,
  attention_choice,
  eos_ids,
  load_checkpoint,
  load_tokenizer,
)
from markovian_jax.runtime import files, sharding
from markovian_jax.sampling import batching
from markovian_jax.training import config_validation

log = logging.getLogger(__name__)


def put(array: np.ndarray, mesh, batch_sharded: bool = True) -> jax.Array:
  """A global device array from a host array that every process holds in full.

  Multi-process, this is the global-batch construction: a step's rows (Q questions x G CoTs,
  often Q = 1) are too few to split by process, so every process reads the same examples (one
  global data cursor, `data.ExampleStream`), samples the same global batch, and here hands its
  own devices their slices of it: `make_array_from_callback` asks only for this process's shards
  and moves no row between hosts (what `jax.make_array_from_process_local_data` does when every
  process's local data is the whole array). `array`: any dtype, batch on axis 0 when
  `batch_sharded`.
  """
  array = np.asarray(array)
  sh = sharding.batch_sharding(mesh, array.shape) if batch_sharded else sharding.replicated(mesh)
  return jax.make_array_from_callback(array.shape, sh, lambda idx: array[idx])


def fetch(x) -> np.ndarray:
  """The full value of a (possibly multi-process) global array, on this host."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def read_examples(spec, split: str, tokenizer=None, limit: Optional[int] = None) -> list:
  """The examples of `split` for the run `spec` (a RunSpec), read before any model is loaded so
  that a wrong `data.path` or a malformed record fails in seconds. Raises DataError (or
  FileNotFoundError for a missing path) naming the file and the key."""
  if spec.data.path and spec.task != "arithmetic":
    if not os.path.exists(os.path.expanduser(spec.data.path)):
      raise data_lib.DataError(
        f"config.data.path: {spec.data.path}: no such file or directory ({spec.task} data)"
      )
  options = spec.data.task_options(spec.task, tokenizer)
  examples = data_lib.load_task(spec.task, split, spec.data.path or None, **options)
  examples = examples[:limit] if limit else examples
  if not examples:
    raise data_lib.DataError(
      f"{spec.task} split {split!r} has no examples (config.data.path={spec.data.path!r})"
    )
  return examples


def run_splits(spec, tokenizer=None):
  """The run's disjoint train, selection and test sets (`data.selection.run_splits`): the test set
  is a seeded sample of eval.num_examples, the selection set one of eval.selection_size (0 = auto)
  (MMLU stratified by subject); a task without a validation split gives up a seeded carve-out of
  train. The selection set does not depend on eval.num_examples."""
  from markovian_jax.data import selection

  return selection.run_splits(
    spec.task,
    lambda split: read_examples(spec, split, tokenizer),
    train_split=spec.data.train_split,
    eval_split=spec.data.eval_split,
    selection_size=spec.eval.selection_size,
    test_size=spec.eval.num_examples,
    seed=spec.eval.seed,
    task_options=spec.data.task_options(spec.task, tokenizer),
  )


def recorded_selection(spec, workdir, tokenizer=None) -> tuple[list, str]:
  """The selection set run `workdir` trained with, and where it came from: the items its
  selection.json lists (one fixed set per run, whatever this spec's eval sizes are); without that
  file, the set `run_splits(spec)` draws. Raises DataError when the data lacks a recorded item."""

  from etils import epath

  from markovian_jax.data import selection

  path = epath.Path(workdir) / "selection.json" if workdir else None
  if path is not None and path.exists():
    record = files.read_json(path)
    return (
      selection.from_record(record, lambda split: read_examples(spec, split, tokenizer)),
      f"{path}: {record.get('description', '')}",
    )
  log.warning(
    "no selection.json in %s: drawing the selection set from the config (eval.selection_size=%d)",
    workdir,
    spec.eval.selection_size,
  )
  return run_splits(spec, tokenizer).selection, "drawn from the config (no selection.json)"


@dataclasses.dataclass
class RunContext:
  spec: object  # the run's specs.RunSpec
  mesh: jax.sharding.Mesh
  model: DecoderConfig
  params: dict
  tokenizer: object
  eos_ids: tuple

  @classmethod
  def create(cls, spec, mesh=None, *, tokenizer=None) -> "RunContext":
    """The mesh and the model of `spec` (a RunSpec, from `config_validation.validate`)."""
    mesh = mesh or config_validation.make_mesh(spec)
    attention_choice.check_backend(spec.model.attention)  # before the weights load
    tokenizer = tokenizer or load_tokenizer(spec.model.path)
    model, params = load_checkpoint(spec.model.path, dtype=spec.model.dtype, mesh=mesh)
    impl, why = attention_choice.resolve(spec.model.attention, model)
    log.info("%s", why)
    model = model.replace(remat=spec.model.remat, attention_impl=impl)
    log.info(
      "model %s: %d layers, d=%d, vocab %d, %s; mesh %s",
      spec.model.path,
      model.num_layers,
      model.hidden_size,
      model.vocab_size,
      spec.model.dtype,
      dict(mesh.shape),
    )
    return cls(spec, mesh, model, params, tokenizer, eos_ids(model, tokenizer))

  @property
  def task(self) -> str:
    return self.spec.task

  @property
  def cot_length(self) -> int:
    return self.spec.sampling.cot_length

  # ------------------------------------------------------------- prompts as token ids
  def cot_prompt_ids(self, example) -> list:
    s = self.spec
    text = data_lib.cot_prompt(
      s.task,
      example.question,
      self.cot_length,
      target_length=s.data.target_length,
      prompt_format=s.prompt.format,
      tokenizer=self.tokenizer,
    )
    return data_lib.encode(self.tokenizer, text, s.prompt.format)

  def answer_prefix(self, example, cot_text: str) -> str:
    s = self.spec
    return data_lib.answer_prompt(
      s.task,
      example.question,
      cot_text,
      self.cot_length,
      markovian=s.prompt.markovian,
      target_length=s.data.target_length,
      prompt_format=s.prompt.format,
      tokenizer=self.tokenizer,
    )

  def answer_rows(self, examples: Sequence, cot_texts: Sequence[str], multiple: int = 32):
    """Scoring rows "answer prompt(CoT) + gold answer", left-padded to a bucketed length.

    Returns (tokens int32 [N, A], mask bool [N, A], span bool [N, A]).
    """
    rows = [
      data_lib.answer_tokens(
        self.tokenizer, self.answer_prefix(ex, cot), ex.answer, self.spec.prompt.format
      )
      for ex, cot in zip(examples, cot_texts)
    ]
    length = batching.bucket(max(len(r.ids) for r in rows), multiple)
    tokens, mask = batching.pad_left([r.ids for r in rows], length)
    span, _ = batching.pad_left([r.mask.astype(np.int32) for r in rows], length)
    return tokens, mask, span.astype(bool)

  def decode(self, tokens: np.ndarray) -> list:
    return self.tokenizer.batch_decode(np.asarray(tokens), skip_special_tokens=True)
