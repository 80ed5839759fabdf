"""Teacher-forced per-token log-probs, chunked over the sequence so that fp32 `[B, T, V]` logits
never exist at once (the Llama 3 vocab is 128k: B=32, T=1024 would be 16.8 GB).

`token_logprobs` scores whole rows: the Markovian reward log P(answer | CoT) and evaluation.
`continuation_logprobs` scores G continuations of each prompt with the prompt computed once: the
policy terms of the G CoTs sampled for a question (differentiable w.r.t. the LoRA, with optional
LoRA dropout). In one call either can also return, per position, the exact full-vocabulary
KL(pi || ref) and the entropy of pi, and the reference's log-probs of the same tokens. The
reference is the base model (`reference_lora=None`) or base + a frozen adapter. `full_kl` and
`entropy` are those two per-position terms on [..., V] log-softmax arrays.

Alignment: `out[:, t]` is about token `t`: the log-prob of `tokens[:, t]` given `tokens[:, :t]`,
and the KL / entropy of the distribution that produced it (the logits at position t-1). Column 0
has no prediction and is 0, as is every position whose token or predecessor is padding, or that
`target_mask` leaves out.

The projection runs in a `lax.scan` over chunks of `chunk_size` positions. A chunk whose logits
exceed `SAVED_LOGITS_BYTES` runs under `jax.checkpoint`, so the forward keeps one chunk of logits
alive and the backward recomputes them chunk by chunk; smaller chunks keep theirs.
"""

from __future__ import annotations

from typing import Optional

from flax import struct
import jax
import jax.numpy as jnp

from markovian_jax.models import decoder
from markovian_jax.models.config import DecoderConfig

# Per chunk, fp32 logits up to this size (policy + reference) are kept for the backward pass
# instead of being recomputed (SmolLM2, 12 x 50 positions: 236 MB).
SAVED_LOGITS_BYTES = 256 * 2**20


@struct.dataclass
class TokenLogprobs:
  """float32 [B, T] each; `kl`, `entropy`, `ref_logprobs` are None unless requested."""

  logprobs: jax.Array
  kl: Optional[jax.Array] = None
  entropy: Optional[jax.Array] = None
  ref_logprobs: Optional[jax.Array] = None


def token_logprobs(
  config: DecoderConfig,
  params: dict,
  tokens: jax.Array,
  attention_mask: jax.Array,
  *,
  target_mask: Optional[jax.Array] = None,
  lora=None,
  temperature: float = 1.0,
  chunk_size: int = 64,
  dropout_rng: Optional[jax.Array] = None,
  with_kl: bool = False,
  with_entropy: bool = False,
  with_reference: bool = False,
  reference_lora=None,
  reference_hidden: Optional[jax.Array] = None,
  last_n: Optional[int] = None,
) -> TokenLogprobs:
  """Per-token log-probs under base + `lora` with temperature-scaled logits.

  Args:
    tokens: int32 [B, T], left-padded (prefix + targets).
    attention_mask: bool/int [B, T], 1 for real tokens.
    target_mask: optional bool [B, T], the positions to score (default: every real token).
    lora: the policy adapter (None = base); gradients flow to it.
    temperature: logits are divided by it before the softmax (<= 0 is read as 1: the greedy
      policy's log-probs are those of the unscaled logits, as the sampler reports them).
    chunk_size: positions per projection chunk.
    dropout_rng: turns on the policy adapter's LoRA dropout.
    with_kl: exact KL(pi || ref) over the full vocabulary at each scored position.
    with_entropy: entropy of pi at each scored position.
    with_reference: the reference's log-probs of the same tokens.
    reference_lora: the reference adapter (None = the base model).
    reference_hidden: optional precomputed reference hidden states [B, T, D] (the output of
      `decoder.forward` with `reference_lora`), e.g. shared by several calls; no gradient flows.
    last_n: only the last `last_n` tokens can be scored (others are 0); the vocabulary projection,
      the dominant cost for a short CoT after a long prompt, then runs on those positions only.
  Returns:
    TokenLogprobs of float32 [B, T] arrays, aligned as in the module docstring.
  """
  if tokens.ndim != 2 or attention_mask.shape != tokens.shape:
    raise ValueError(
      f"tokens {tokens.shape} must be [B, T] and match attention_mask {attention_mask.shape}"
    )
  if target_mask is not None and target_mask.shape != tokens.shape:
    raise ValueError(f"target_mask {target_mask.shape} must match tokens {tokens.shape}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  b, n = tokens.shape
  if n < 2:
    raise ValueError(f"need at least 2 positions to score a token, got T={n}")
  need_ref = with_kl or with_reference
  if reference_hidden is not None and reference_hidden.shape[:2] != tokens.shape:
    raise ValueError(
      f"reference_hidden {reference_hidden.shape} must be [B, T, D] for tokens {tokens.shape}"
    )

  t = float(temperature) if temperature and temperature > 0 else 1.0
  hidden, _ = decoder.forward(
    config, params, tokens, attention_mask=attention_mask, lora=lora, dropout_rng=dropout_rng
  )
  ref_hidden = None
  if need_ref:
    ref_hidden = reference_hidden
    if ref_hidden is None:
      ref_hidden, _ = decoder.forward(
        config, params, tokens, attention_mask=attention_mask, lora=reference_lora
      )
    ref_hidden = jax.lax.stop_gradient(ref_hidden)

  start = 0 if last_n is None else max(0, n - 1 - int(last_n))
  rh = None if ref_hidden is None else ref_hidden[:, start:-1]
  outs = _project_chunks(
    config,
    params,
    hidden[:, start:-1],
    rh,
    tokens[:, 1 + start :],
    t,
    chunk_size,
    with_entropy,
    with_kl,
    with_reference,
  )
  real = attention_mask.astype(bool)
  valid = real & jnp.pad(real[:, :-1], [(0, 0), (1, 0)])
  if target_mask is not None:
    valid = valid & target_mask.astype(bool)
  place = lambda x: (
    None
    if x is None
    else jnp.where(  # noqa: E731
      valid, jnp.pad(x, [(0, 0), (1 + start, 0)]), 0.0
    )
  )
  return TokenLogprobs(**{k: place(v) for k, v in outs.items()})


def continuation_logprobs(
  config: DecoderConfig,
  params: dict,
  prefix_tokens: jax.Array,
  prefix_mask: jax.Array,
  tokens: jax.Array,
  attention_mask: jax.Array,
  *,
  lora=None,
  temperature: float = 1.0,
  chunk_size: int = 64,
  dropout_rng: Optional[jax.Array] = None,
  with_kl: bool = False,
  with_entropy: bool = False,
  with_reference: bool = False,
  reference_lora=None,
) -> TokenLogprobs:
  """`token_logprobs` of G continuations per prompt, each prompt computed once
  (`decoder.forward_with_prefix`): the policy terms of G sampled CoTs per question.

  Args:
    prefix_tokens: int32 [Q, P] left-padded prompts; prefix_mask: bool [Q, P].
    tokens: int32 [B, T], B = Q * G, row r continuing prompt r // G; attention_mask: bool [B, T]
      (padding only after real tokens).
    Other arguments as in `token_logprobs` (the reference gets its own prefix pass).
  Returns:
    TokenLogprobs of float32 [B, T]: column t is about tokens[:, t] given the prompt and
    tokens[:, :t] (column 0 is predicted by the prompt's last position); 0 on padding.
  """
  if tokens.ndim != 2 or attention_mask.shape != tokens.shape:
    raise ValueError(
      f"tokens {tokens.shape} must be [B, T] and match attention_mask {attention_mask.shape}"
    )
  g = tokens.shape[0] // prefix_tokens.shape[0]
  t = float(temperature) if temperature and temperature > 0 else 1.0

  def predictors(lora_, rng):
    """[B, T, D]: the hidden state that predicts each continuation token."""
    hp, h = decoder.forward_with_prefix(
      config,
      params,
      prefix_tokens,
      prefix_mask,
      tokens,
      attention_mask=attention_mask,
      lora=lora_,
      dropout_rng=rng,
    )
    last = jnp.repeat(hp[:, -1:], g, axis=0)  # left padding: the prompt's last token is real
    return jnp.concatenate([last, h[:, :-1]], axis=1)

  hidden = predictors(lora, dropout_rng)
  ref_hidden = None
  if with_kl or with_reference:
    ref_hidden = jax.lax.stop_gradient(predictors(reference_lora, None))
  outs = _project_chunks(
    config, params, hidden, ref_hidden, tokens, t, chunk_size, with_entropy, with_kl, with_reference
  )
  valid = attention_mask.astype(bool)
  return TokenLogprobs(
    **{k: None if v is None else jnp.where(valid, v, 0.0) for k, v in outs.items()}
  )


def _support(logp: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  # A token with p = 0 (logp = -inf, e.g. a masked vocabulary entry) would give 0 * (-inf) = NaN in
  # the value and the gradient unless both the product *and* the log-prob it reads are selected
  # away (the "double where").
  p = jnp.exp(logp)
  support = p > 0
  return p, jnp.where(support, logp, 0.0), support


def full_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """Exact KL(pi || ref) = sum_v p_v (log p_v - log q_v) at every position.

  Differentiating it gives the exact gradient of the KL at those positions, with no sampling
  noise; the reference is a constant (stop_gradient). Use the temperature-scaled logits of both
  models (the reference divides both by T).

  Args:
    logp: [..., V] float log-softmax of pi (with grad); -inf entries contribute 0.
    ref_logp: [..., V] float log-softmax of the reference (base) model.

  Returns:
    [...] of logp's dtype, >= 0 (up to rounding).
  """
  p, logp, support = _support(logp)
  logq = jnp.where(support, jax.lax.stop_gradient(ref_logp), 0.0)
  return jnp.sum(jnp.where(support, p * (logp - logq), 0.0), axis=-1)


def entropy(logp: jax.Array) -> jax.Array:
  """H = -sum_v p_v log p_v at every position: [...] from [..., V] float log-softmax (-inf
  entries contribute 0)."""
  p, logp, support = _support(logp)
  return -jnp.sum(jnp.where(support, p * logp, 0.0), axis=-1)


def _project_chunks(
  config, params, hidden, ref_hidden, targets, t, chunk_size, with_entropy, with_kl, with_reference
) -> dict:
  """Log-probs (and KL, entropy, reference log-probs) of `targets` from predicting states.

  Args:
    hidden: [B, n, D] states predicting targets int32 [B, n]; ref_hidden: the reference's, or
      None; t: temperature.
  Returns:
    dict with float32 [B, n] "logprobs" and "kl" / "entropy" / "ref_logprobs" (None unless asked).
  """
  b, steps = targets.shape
  need_ref = with_kl or with_reference
  c = max(1, min(chunk_size, steps))
  pad = (-steps) % c

  def chunks(x):
    """[B, steps, ...] -> [num_chunks, B, c, ...] so the scan walks the sequence."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, -1, c, *x.shape[2:]).swapaxes(0, 1)

  def one(h, rh, target):
    logp = jax.nn.log_softmax(decoder.project(config, params, h) / t, axis=-1)
    out = {"logprobs": jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]}
    if with_entropy:
      out["entropy"] = entropy(logp)
    if need_ref:
      ref = jax.nn.log_softmax(decoder.project(config, params, rh) / t, axis=-1)
      if with_kl:
        out["kl"] = full_kl(logp, ref)
      if with_reference:
        out["ref_logprobs"] = jnp.take_along_axis(ref, target[..., None], axis=-1)[..., 0]
    return out

  # Small chunks keep their logits for the backward pass; large ones (a 128k vocabulary) are
  # recomputed from the hidden states, so the scan holds one chunk of logits at a time.
  live = (2 if need_ref else 1) * b * c * config.vocab_size * 4
  body = one if live <= SAVED_LOGITS_BYTES else jax.checkpoint(one)
  xs = (chunks(hidden), chunks(ref_hidden) if need_ref else None, chunks(targets))
  _, outs = jax.lax.scan(lambda carry, x: (carry, body(*x)), None, xs)
  result = {"logprobs": None, "kl": None, "entropy": None, "ref_logprobs": None}
  for key, x in outs.items():
    result[key] = x.swapaxes(0, 1).reshape(b, -1)[:, :steps]
  return result
