"""Teacher-forced per-token log-probs, chunked over the sequence so that fp32 `[B, T, V]` logits
never exist at once (the Llama 3 vocab is 128k: B=32, T=1024 would be 16.8 GB).

One function serves the policy log-probs of the CoT, the KL reference and the Markovian reward
log P(answer | CoT). Alignment: `out[:, t]` is about token `t` — the log-prob of `tokens[:, t]`
given `tokens[:, :t]`, and the KL/entropy of the distribution that produced it (the logits at
position t-1). Column 0 has no prediction and is 0.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from markovian_jax.models import llama
from markovian_jax.models.config import LlamaConfig


@struct.dataclass
class TokenLogprobs:
  """float32 [B, T] each; `kl`, `entropy`, `ref_logprobs` are None unless requested."""
  logprobs: jax.Array
  kl: Optional[jax.Array] = None
  entropy: Optional[jax.Array] = None
  ref_logprobs: Optional[jax.Array] = None


def token_logprobs(config: LlamaConfig, params: dict, tokens: jax.Array,
                   attention_mask: jax.Array, *, lora=None, temperature: float = 1.0,
                   chunk_size: int = 64, dropout_rng: Optional[jax.Array] = None,
                   with_kl: bool = False, with_entropy: bool = False,
                   with_reference: bool = False, reference_lora=None,
                   last_n: Optional[int] = None) -> TokenLogprobs:
  """Per-token log-probs under base+`lora` (temperature-scaled logits), differentiable in `lora`.

  Args:
    tokens: int32 [B, T], left-padded; attention_mask: bool [B, T].
    temperature: logits are divided by it (<= 0 means 1).
    with_kl: exact full-vocab KL(pi || ref) per position, ref = base (+ `reference_lora`).
    with_entropy: entropy of pi per position.
    with_reference: the reference model's log-probs of the same tokens.
    last_n: only the last `last_n` tokens are scored (others are 0): the vocab projection, the
      dominant cost for short CoTs after long prompts, then runs on those positions only.
  """
  t = float(temperature) if temperature and temperature > 0 else 1.0
  hidden, _ = llama.forward(config, params, tokens, attention_mask=attention_mask, lora=lora,
                            dropout_rng=dropout_rng)
  need_ref = with_kl or with_reference
  ref_hidden = None
  if need_ref:
    ref_hidden, _ = llama.forward(config, params, tokens, attention_mask=attention_mask,
                                  lora=reference_lora)
    ref_hidden = jax.lax.stop_gradient(ref_hidden)
  b, n = tokens.shape
  start = 0 if last_n is None else max(0, n - 1 - last_n)
  targets = tokens[:, 1 + start:]
  h = hidden[:, start:-1]
  rh = ref_hidden[:, start:-1] if need_ref else h
  steps = n - 1 - start
  c = max(1, min(chunk_size, steps))
  pad = (-steps) % c
  padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
  # [num_chunks, B, c, ...] so the scan walks the sequence.
  chunks = lambda x: padt(x).reshape(b, -1, c, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731

  @jax.checkpoint
  def one(hc, rc, tc):
    logp = jax.nn.log_softmax(llama.project(config, params, hc) / t, axis=-1)
    lp = jnp.take_along_axis(logp, tc[..., None], axis=-1)[..., 0]
    out = {"lp": lp}
    if with_entropy:
      out["ent"] = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    if need_ref:
      ref = jax.nn.log_softmax(llama.project(config, params, rc) / t, axis=-1)
      if with_kl:
        out["kl"] = jnp.sum(jnp.exp(logp) * (logp - ref), axis=-1)
      if with_reference:
        out["ref"] = jnp.take_along_axis(ref, tc[..., None], axis=-1)[..., 0]
    return out

  _, outs = jax.lax.scan(lambda carry, x: (carry, one(*x)), None,
                         (chunks(h), chunks(rh), chunks(targets)))
  unchunk = lambda x: jnp.pad(  # noqa: E731
      x.swapaxes(0, 1).reshape(b, -1)[:, :steps], [(0, 0), (1 + start, 0)])
  valid = attention_mask.astype(bool) & jnp.pad(attention_mask[:, :-1].astype(bool),
                                                [(0, 0), (1, 0)])
  get = lambda k: None if k not in outs else jnp.where(valid, unchunk(outs[k]), 0.0)  # noqa: E731
  return TokenLogprobs(logprobs=get("lp"), kl=get("kl"), entropy=get("ent"),
                       ref_logprobs=get("ref"))
