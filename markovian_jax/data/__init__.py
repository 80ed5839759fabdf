"""Tasks, prompts and answer extraction.

  load_task(name, split, path=None, **options) -> list[Example]   (tasks.py: sources and splits)
  ExampleStream(examples, seed, process_index=0, process_count=1)  seeded, resumable, sharded
  cot_prompt / answer_prompt / answer_tokens                       prompts.py
  extract_all / is_correct                                         extraction.py
  selection                              the selection (validation) split, kept apart

May import: runtime.
"""

from markovian_jax.data.extraction import (
  extract_all,
  extract_letter,
  extract_numeric,
  is_correct,
  normalize_number,
)
from markovian_jax.data.prompts import (
  AnswerTokens,
  answer_prompt,
  answer_tokens,
  base_prompt,
  cot_prompt,
  encode,
)
from markovian_jax.data.records import DataError, Example
from markovian_jax.data.stream import ExampleStream
from markovian_jax.data.tasks import TASKS, load_task, task_kind

__all__ = [
  "extract_all",
  "extract_letter",
  "extract_numeric",
  "is_correct",
  "normalize_number",
  "AnswerTokens",
  "answer_prompt",
  "answer_tokens",
  "base_prompt",
  "cot_prompt",
  "encode",
  "DataError",
  "Example",
  "ExampleStream",
  "TASKS",
  "load_task",
  "task_kind",
]
