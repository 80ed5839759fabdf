"""Prompt templates and the answer-span locator (docs/method.md#prompts-and-the-hidden-question).

Plain format (the reference for Llama 3.1: text + the BOS the tokenizer adds, no chat template):
  CoT prompt:     "{base_prompt} {question}\\n{prompt_type}"
  answer prompt:  "{base_prompt} {Q}\\n{prompt_type}{cot} Answer: "  (Q = "<Redacted>" if markovian)
with prompt_type "Reasoning:" ("Reasoning Bottleneck:" for wiki_continuation), `{K}` = cot_length
and `{N}` = target_length in the base prompts. The CoT follows the prompt type with no separator.
Chat format (`prompt_format="chat"`): the user turn "{base_prompt} {question}" goes through the
tokenizer's chat template with the generation prompt, then the assistant text is the same
"{prompt_type}" / "{prompt_type}{cot} Answer: " continuation.
Family formats, written literally as the reference writes them for each model type
(`FAMILY_FORMATS`; Llama, GPT-2 and Phi use the plain format):
  mistral:  "[INST] {user} [/INST]\n{assistant}"
  chatml:   "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}"  (Qwen2/3,
            no <think> handling)

The reward scores the answer tokens after the LAST "Answer:" of prefix + answer, tokenized
jointly (BPE may merge across the boundary): the same tokens the reference finds by its hard-coded
("Answer", ":") ids, located here by character offsets so that every vocabulary works
(`answer_tokens`).

`prompt.format="auto"` (the default) is each model family's format (`FAMILY_FORMATS`, read from
config.json's model_type), resolved once when the run config is validated; an explicit format wins.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BASE_PROMPTS = {
  "wiki_continuation": (
    "Compress your understanding of this text into {K} tokens, then predict "
    "the next {N} tokens.\n\nText:"
  ),
  "arithmetic": (
    "You will be given an arithmetic problem, which you have {K} tokens to work "
    "through step-by-step. Question:"
  ),
  "gsm8k": (
    "You will be given a reasoning problem, which you have {K} tokens to work through "
    "step-by-step. Question:"
  ),
  "svamp": (
    "You will be given a reasoning problem, which you have {K} tokens to work through "
    "step-by-step. Question:"
  ),
  "aqua": (
    "You will be given a multiple choice algebra word problem. Use {K} tokens to think "
    "step-by-step, then select the correct option. Question:"
  ),
  "mathqa": (
    "You will be given a multiple choice math word problem. Use {K} tokens to think "
    "step-by-step, then select the correct option. Question:"
  ),
  "mmlu": (
    "You will be given a multiple choice question. Use {K} tokens to think through the "
    "problem step-by-step, then select the correct answer. Question:"
  ),
  "arc": (
    "You will be given a multiple choice science question. Use {K} tokens to think "
    "step-by-step, then select the correct letter. Question:"
  ),
}
PROMPT_TYPES = {"wiki_continuation": "Reasoning Bottleneck:"}
DEFAULT_PROMPT_TYPE = "Reasoning:"
ANSWER_HEADER = " Answer: "
REDACTED = "<Redacted>"
ANSWER_MARKER = "Answer:"
PROMPT_FORMATS = ("plain", "chat", "mistral", "chatml")
# config.prompt.format: the model family's format, resolved before any prompt is built.
AUTO_FORMAT = "auto"
# The reference's format per model family (config.json model_type); others read plain text.
FAMILY_FORMATS = {"mistral": "mistral", "qwen2": "chatml", "qwen3": "chatml"}


def family_format(model_type: str) -> str:
  """The prompt format the reference used for a model family (`FAMILY_FORMATS`, else plain)."""
  return FAMILY_FORMATS.get(model_type, "plain")


def resolve_format(prompt_format: str, model_type: str) -> str:
  """`prompt_format` itself, or the family's format of `model_type` when it is "auto"."""
  return family_format(model_type) if prompt_format == AUTO_FORMAT else prompt_format


def base_prompt(task: str, cot_length: int, target_length: int = 50) -> str:
  if task not in BASE_PROMPTS:
    raise ValueError(f"no prompt template for task {task!r}; known: {sorted(BASE_PROMPTS)}")
  return BASE_PROMPTS[task].format(K=cot_length, N=target_length)


def prompt_type(task: str) -> str:
  return PROMPT_TYPES.get(task, DEFAULT_PROMPT_TYPE)


def _frame(user_text, assistant_text, prompt_format, tokenizer) -> str:
  if prompt_format == "plain":
    return f"{user_text}\n{assistant_text}"
  if prompt_format == "mistral":
    return f"[INST] {user_text} [/INST]\n{assistant_text}"
  if prompt_format == "chatml":
    return f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n{assistant_text}"
  if prompt_format == "chat":
    if tokenizer is None:
      raise ValueError("prompt_format='chat' needs the tokenizer (for its chat template)")
    head = tokenizer.apply_chat_template(
      [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    return head + assistant_text
  raise ValueError(f"unknown prompt_format {prompt_format!r}; choose one of {list(PROMPT_FORMATS)}")


def cot_prompt(
  task: str,
  question: str,
  cot_length: int,
  *,
  target_length: int = 50,
  prompt_format: str = "plain",
  tokenizer=None,
) -> str:
  """The text the policy continues with its K-token CoT."""
  user = f"{base_prompt(task, cot_length, target_length)} {question}"
  return _frame(user, prompt_type(task), prompt_format, tokenizer)


def answer_prompt(
  task: str,
  question: str,
  cot: str,
  cot_length: int,
  *,
  markovian: bool = True,
  target_length: int = 50,
  prompt_format: str = "plain",
  tokenizer=None,
) -> str:
  """The prefix after which the answer is scored (or generated at eval)."""
  q = REDACTED if markovian else question
  user = f"{base_prompt(task, cot_length, target_length)} {q}"
  return _frame(user, f"{prompt_type(task)}{cot}{ANSWER_HEADER}", prompt_format, tokenizer)


def _encoding(tokenizer, text: str, prompt_format: str, **kwargs):
  if prompt_format not in PROMPT_FORMATS:
    raise ValueError(
      f"unknown prompt_format {prompt_format!r}; choose one of {list(PROMPT_FORMATS)}"
    )
  return tokenizer(text, add_special_tokens=prompt_format != "chat", **kwargs)


def encode(tokenizer, text: str, prompt_format: str = "plain") -> list:
  """Token ids of a prompt: the plain and family formats let the tokenizer add its BOS (as the
  reference tokenizes them); a chat template already writes its own special tokens, so none are
  added then."""
  return list(_encoding(tokenizer, text, prompt_format)["input_ids"])


@dataclasses.dataclass(frozen=True)
class AnswerTokens:
  """Prefix + answer tokenized jointly.

  ids: int32 [T] token ids (with BOS in the plain format).
  start: index of the first answer token; the answer span is ids[start:].
  mask: bool [T], True on the answer span.
  """

  ids: np.ndarray
  start: int
  mask: np.ndarray


def answer_tokens(
  tokenizer, prefix: str, answer: str, prompt_format: str = "plain"
) -> AnswerTokens:
  """Tokenizes `prefix + answer` jointly; the answer span is the tokens after its last "Answer:".

  The span starts at the first token whose character offset (the fast tokenizer's offset mapping)
  is at or past the end of the last "Answer:" in the text: the same tokens the reference finds
  after its last ("Answer", ":") token pair, leading space token included. The reference
  hard-codes that pair's ids per family because they are the ids *inside the text*: in a
  byte-level BPE vocabulary (Llama 3, Qwen, GPT-2) ":" is the same token alone and after "Answer",
  but in a SentencePiece (Metaspace) one (Mistral, Llama 2 / Phi-3.5) ":" alone tokenizes as "▁:",
  which never follows "▁Answer" in a text. Character offsets need no per-vocabulary ids and hold
  for both, and for a vocabulary that makes "Answer:" one token.

  Raises ValueError if the text has no "Answer:", if one token covers both its colon and what
  follows (no token boundary to start the span at), or if nothing follows it.
  """
  if not answer.strip():
    raise ValueError(f"empty answer {answer!r}: there is nothing to score after {prefix[-40:]!r}")
  text = prefix + answer
  marker = text.rfind(ANSWER_MARKER)
  if marker < 0:
    raise ValueError(
      f"no {ANSWER_MARKER!r} marker in the scored text {text[-120:]!r}; the "
      f"answer prompt must end with {ANSWER_HEADER!r}"
    )
  end = marker + len(ANSWER_MARKER)
  enc = _encoding(tokenizer, text, prompt_format, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], dtype=np.int32)
  offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
  if np.any((offsets[:, 0] < end) & (offsets[:, 1] > end)):
    raise ValueError(
      f"{type(tokenizer).__name__} merges the colon of {ANSWER_MARKER!r} with what "
      f"follows it in {text[marker : marker + 40]!r}: no token starts the answer"
    )
  after = np.flatnonzero(offsets[:, 0] >= end)
  if not after.size:
    raise ValueError(
      f"empty answer span: nothing follows the last {ANSWER_MARKER!r} in "
      f"{text[-80:]!r} (answer={answer!r})"
    )
  start = int(after[0])
  mask = np.zeros(ids.shape, dtype=bool)
  mask[start:] = True
  return AnswerTokens(ids=ids, start=start, mask=mask)
