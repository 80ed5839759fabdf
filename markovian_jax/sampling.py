"""Jitted KV-cache sampler: one prefill per distinct prompt, one fused decode loop.

Prompts are left-padded to a static bucket so every row writes the cache at the same slot each step
(a plain `dynamic_update_slice`); the G samples of a question share one prefill (its cache is
repeated G times); the decode runs as one `lax.scan`; temperature/top-k/top-p work in fp32 with
`lax.top_k` (no full-vocabulary sort). Params and LoRA are jit arguments, not closures, so one
compilation serves any weights; compilations are counted per (batch, bucket, N, num_samples, ...)
and logged.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from markovian_jax import batching
from markovian_jax.models import llama
from markovian_jax.models.config import LlamaConfig

log = logging.getLogger(__name__)
_NEG = -1e30
_TOP_P_WINDOW = 1024  # top-p without top-k looks at the 1024 most likely tokens
_COMPILES: dict = {}


@struct.dataclass
class SampleOutput:
  """tokens int32 [B*G, N] (EOS then pad after a row ends), logprobs float32 [B*G, N] (0 after the
  end), lengths int32 [B*G] (tokens up to and including EOS)."""
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array

  def __getitem__(self, key):
    return getattr(self, key)


def compile_count() -> int:
  """Number of distinct sampler programs traced so far in this process."""
  return sum(_COMPILES.values())


def _select(logits, key, temperature, top_k, top_p):
  """One token per row from float32 logits [B, V]: (token int32 [B], its log-prob float32 [B])."""
  if temperature == 0:
    tok = jnp.argmax(logits, axis=-1)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], -1)[:, 0]
    return tok.astype(jnp.int32), lp
  x = logits / temperature
  if top_k > 0 or top_p < 1.0:
    k = min(top_k if top_k > 0 else _TOP_P_WINDOW, x.shape[-1])
    vals, idx = jax.lax.top_k(x, k)
    if top_p < 1.0:
      probs = jax.nn.softmax(vals, -1)
      keep = (jnp.cumsum(probs, -1) - probs) < top_p  # always keeps the most likely token
      vals = jnp.where(keep, vals, _NEG)
    choice = jax.random.categorical(key, vals, axis=-1)
    tok = jnp.take_along_axis(idx, choice[:, None], -1)[:, 0]
    lp = jnp.take_along_axis(jax.nn.log_softmax(vals, -1), choice[:, None], -1)[:, 0]
    return tok.astype(jnp.int32), lp
  tok = jax.random.categorical(key, x, axis=-1)
  lp = jnp.take_along_axis(jax.nn.log_softmax(x, -1), tok[:, None], -1)[:, 0]
  return tok.astype(jnp.int32), lp


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "num_samples",
                                             "temperature", "top_k", "top_p", "min_new_tokens",
                                             "eos_ids"))
def _generate(params, lora, tokens, mask, rng, *, config: LlamaConfig, max_new_tokens: int,
              num_samples: int, temperature: float, top_k: int, top_p: float,
              min_new_tokens: int, eos_ids: tuple):
  key = (config, tokens.shape, max_new_tokens, num_samples, temperature, top_k, top_p,
         min_new_tokens, eos_ids, lora is None)
  _COMPILES[key] = _COMPILES.get(key, 0) + 1
  log.info("sampler: compiling batch=%d bucket=%d new=%d samples=%d (%d programs so far)",
           tokens.shape[0], tokens.shape[1], max_new_tokens, num_samples, compile_count())
  b, p = tokens.shape
  n = max_new_tokens
  s = p + n
  dtype = jnp.dtype(config.dtype)
  shape = (config.num_layers, b, s, config.num_kv_heads, config.head_dim)
  cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
  slots = jnp.concatenate([mask.astype(bool), jnp.zeros((b, n), bool)], axis=1)
  positions = llama.positions_from_mask(mask)
  hidden, cache = llama.forward(config, params, tokens, attention_mask=mask, positions=positions,
                                lora=lora, cache=cache, cache_index=0, cache_mask=slots)
  logits = llama.project(config, params, hidden[:, -1])
  rep = lambda x, axis=0: jnp.repeat(x, num_samples, axis=axis)  # noqa: E731
  cache = (rep(cache[0], 1), rep(cache[1], 1))
  slots, logits = rep(slots), rep(logits)
  pos = rep(positions[:, -1] + 1)
  rows = b * num_samples
  eos = jnp.asarray(eos_ids, jnp.int32) if eos_ids else jnp.zeros((0,), jnp.int32)
  pad_id = eos_ids[0] if eos_ids else 0

  def step(carry, i):
    cache, slots, logits, pos, done = carry
    if eos_ids:
      block = (i < min_new_tokens)
      logits = logits.at[:, eos].set(jnp.where(block, _NEG, logits[:, eos]))
    tok, lp = _select(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    valid = ~done
    is_eos = jnp.isin(tok, eos) if eos_ids else jnp.zeros_like(done)
    done = done | is_eos
    slots = slots.at[:, p + i].set(True)
    hidden, cache = llama.forward(config, params, tok[:, None], positions=pos[:, None], lora=lora,
                                  cache=cache, cache_index=p + i, cache_mask=slots)
    logits = llama.project(config, params, hidden[:, 0])
    return (cache, slots, logits, pos + 1, done), (tok, lp, valid)

  init = (cache, slots, logits, pos, jnp.zeros((rows,), bool))
  _, (toks, lps, valid) = jax.lax.scan(step, init, jnp.arange(n))
  return SampleOutput(tokens=toks.T, logprobs=lps.T,
                      lengths=jnp.sum(valid.T, axis=1).astype(jnp.int32))


def generate(config: LlamaConfig, params, prompt_ids, *, max_new_tokens: int, rng=None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, lora=None,
             min_new_tokens: int = 0, eos_ids: Sequence[int] = (), prompt_mask=None,
             num_samples: int = 1, bucket: int = 64, mesh=None) -> SampleOutput:
  """Samples `max_new_tokens` per row; rows are grouped by prompt (prompt 0's samples first).

  Args:
    prompt_ids: ragged list of token lists, or an int array [B, P] left-padded with `prompt_mask`.
    temperature: 0 = greedy. `logprobs` are under the sampling distribution: log_softmax of
      logits / temperature, renormalised over the top-k / top-p set when those are on.
    min_new_tokens: EOS is masked before this many tokens (the reference samples exactly K).
    bucket: prompts are left-padded to a multiple of this (one compilation per bucket).
    mesh: optional; the batch is then sharded over the mesh batch axes.
  Returns:
    SampleOutput(tokens int32 [B*num_samples, N], logprobs float32 [..., N], lengths int32 [...]).
  """
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if prompt_mask is None and not isinstance(prompt_ids, (jnp.ndarray, np.ndarray)):
    seqs = [list(map(int, s)) for s in prompt_ids]
    if not seqs or min(len(s) for s in seqs) == 0:
      raise ValueError("generate() needs at least one non-empty prompt")
    tokens, mask = batching.pad_left(seqs, batching.bucket(max(map(len, seqs)), bucket))
  else:
    tokens = np.asarray(prompt_ids, np.int32)
    mask = np.ones(tokens.shape, bool) if prompt_mask is None else np.asarray(prompt_mask, bool)
  if rng is None:
    rng = jax.random.PRNGKey(0)
  if mesh is not None:
    from markovian_jax.run_context import put
    tokens, mask = put(tokens, mesh), put(mask, mesh)
  return _generate(params, lora, tokens, mask, rng, config=config, max_new_tokens=max_new_tokens,
                   num_samples=num_samples, temperature=float(temperature), top_k=int(top_k),
                   top_p=float(top_p), min_new_tokens=int(min_new_tokens),
                   eos_ids=tuple(int(e) for e in eos_ids))
