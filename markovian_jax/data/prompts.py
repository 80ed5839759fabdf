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

The reward scores the answer tokens after the LAST ("Answer", ":") token pair of prefix + answer,
tokenized jointly: BPE may merge across the boundary, so the span is found by token ids (looked
up from the tokenizer, not hard-coded), exactly as the reference does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BASE_PROMPTS = {
    "wiki_continuation": ("Compress your understanding of this text into {K} tokens, then predict "
                          "the next {N} tokens.\n\nText:"),
    "arithmetic": ("You will be given an arithmetic problem, which you have {K} tokens to work "
                   "through step-by-step. Question:"),
    "gsm8k": ("You will be given a reasoning problem, which you have {K} tokens to work through "
              "step-by-step. Question:"),
    "svamp": ("You will be given a reasoning problem, which you have {K} tokens to work through "
              "step-by-step. Question:"),
    "aqua": ("You will be given a multiple choice algebra word problem. Use {K} tokens to think "
             "step-by-step, then select the correct option. Question:"),
    "mathqa": ("You will be given a multiple choice math word problem. Use {K} tokens to think "
               "step-by-step, then select the correct option. Question:"),
    "mmlu": ("You will be given a multiple choice question. Use {K} tokens to think through the "
             "problem step-by-step, then select the correct answer. Question:"),
    "arc": ("You will be given a multiple choice science question. Use {K} tokens to think "
            "step-by-step, then select the correct letter. Question:"),
}
PROMPT_TYPES = {"wiki_continuation": "Reasoning Bottleneck:"}
DEFAULT_PROMPT_TYPE = "Reasoning:"
ANSWER_HEADER = " Answer: "
REDACTED = "<Redacted>"
PROMPT_FORMATS = ("plain", "chat", "mistral", "chatml")
# The reference's format per model family (config.json model_type); others read plain text.
FAMILY_FORMATS = {"mistral": "mistral", "qwen2": "chatml", "qwen3": "chatml"}


def family_format(model_type: str) -> str:
  """The prompt format the reference used for a model family (`FAMILY_FORMATS`, else plain)."""
  return FAMILY_FORMATS.get(model_type, "plain")


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
    head = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                         tokenize=False, add_generation_prompt=True)
    return head + assistant_text
  raise ValueError(f"unknown prompt_format {prompt_format!r}; choose one of "
                   f"{list(PROMPT_FORMATS)}")


def cot_prompt(task: str, question: str, cot_length: int, *, target_length: int = 50,
               prompt_format: str = "plain", tokenizer=None) -> str:
  """The text the policy continues with its K-token CoT."""
  user = f"{base_prompt(task, cot_length, target_length)} {question}"
  return _frame(user, prompt_type(task), prompt_format, tokenizer)


def answer_prompt(task: str, question: str, cot: str, cot_length: int, *, markovian: bool = True,
                  target_length: int = 50, prompt_format: str = "plain", tokenizer=None) -> str:
  """The prefix after which the answer is scored (or generated at eval)."""
  q = REDACTED if markovian else question
  user = f"{base_prompt(task, cot_length, target_length)} {q}"
  return _frame(user, f"{prompt_type(task)}{cot}{ANSWER_HEADER}", prompt_format, tokenizer)


def encode(tokenizer, text: str, prompt_format: str = "plain") -> list:
  """Token ids of a prompt: the plain and family formats let the tokenizer add its BOS (as the
  reference tokenizes them); a chat template already writes its own special tokens, so none are
  added then."""
  if prompt_format not in PROMPT_FORMATS:
    raise ValueError(f"unknown prompt_format {prompt_format!r}; choose one of "
                     f"{list(PROMPT_FORMATS)}")
  return list(tokenizer(text, add_special_tokens=prompt_format != "chat")["input_ids"])


def _single_token(tokenizer, text: str):
  ids = tokenizer.encode(text, add_special_tokens=False)
  return ids[0] if len(ids) == 1 else None


def answer_marker_ids(tokenizer) -> tuple[tuple, tuple]:
  """(ids of "Answer" / " Answer", ids of ":"), each kept only if it is a single token."""
  answer = tuple(sorted({i for i in (_single_token(tokenizer, "Answer"),
                                     _single_token(tokenizer, " Answer")) if i is not None}))
  colon = tuple(i for i in (_single_token(tokenizer, ":"),) if i is not None)
  if not answer or not colon:
    raise ValueError(f"{type(tokenizer).__name__}: 'Answer' / ' Answer' / ':' are not single "
                     "tokens, so the answer span cannot be located by token ids")
  return answer, colon


def answer_start(ids, answer_ids, colon_ids) -> int:
  """Index of the first token after the last (Answer, :) pair, or -1 if there is none.

  ids: int [T] token ids of one sequence; answer_ids / colon_ids: the marker ids to match.
  """
  ids = np.asarray(ids)
  if ids.size < 2:
    return -1
  hits = np.flatnonzero(np.isin(ids[:-1], answer_ids) & np.isin(ids[1:], colon_ids))
  return int(hits[-1]) + 2 if hits.size else -1


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


def answer_tokens(tokenizer, prefix: str, answer: str, prompt_format: str = "plain"
                  ) -> AnswerTokens:
  """Tokenizes `prefix + answer` and locates the answer span after the last `Answer:` pair.

  Raises ValueError if the text has no (Answer, :) token pair or the span after it is empty.
  """
  if not answer.strip():
    raise ValueError(f"empty answer {answer!r}: there is nothing to score after "
                     f"{prefix[-40:]!r}")
  ids = np.asarray(encode(tokenizer, prefix + answer, prompt_format), dtype=np.int32)
  start = answer_start(ids, *answer_marker_ids(tokenizer))
  if start < 0:
    raise ValueError(f"no ('Answer', ':') token pair in the scored text "
                     f"{(prefix + answer)[-120:]!r}; the answer prompt must end with ' Answer: '")
  if start >= ids.size:
    raise ValueError(f"empty answer span: nothing follows the last 'Answer:' in "
                     f"{(prefix + answer)[-80:]!r} (answer={answer!r})")
  mask = np.zeros(ids.shape, dtype=bool)
  mask[start:] = True
  return AnswerTokens(ids=ids, start=start, mask=mask)
