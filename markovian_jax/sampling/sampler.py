"""Jitted KV-cache sampler: one prefill per distinct prompt, one fused decode loop.

    prompts (ragged lists, or a left-padded array + mask)
      -> left-pad to a static bucket P (a multiple of `bucket`)
      -> prefill [B, P] once, into a cache of P slots (keys [L, B, Hkv, Dh, P], values
         [L, B, Hkv, P, Dh]: the layouts the attention matmuls read)
      -> repeat the cache num_samples times and pad it to S = P + N slots (rows B*G)
      -> lax.while_loop over the N new tokens (exits early once every row has emitted EOS)

On a mesh (`mesh=`, or the mesh the params live on) the program runs in the decode layout
(`sharding.DECODE_RULES`): rows split over data, and, when fsdp > 1, the weights resharded once per
call so that fsdp splits heads / mlp / vocab like tensor does, so no token all-gathers a weight.
The rows are padded to a multiple of the data axis with filler rows (copies of prompt 0, done
from the start, dropped at the end): the B greedy reference rows of `generate_with_reference` make
B * (G + 1) rows, which the data axis rarely divides, and would otherwise replicate the whole
decode on every device. The prefill's prompts are padded the same way.

Left padding puts every row's next token in the same cache slot, so each step writes the cache with
one `dynamic_update_slice`. The cache is allocated inside the program and lives in the loop carry,
which XLA updates in place (there is no caller-visible buffer to donate). The G samples of a
question share its prefill. Params and LoRA are jit arguments, not closures, so one compiled
program serves any weights, and so are temperature, top-p and min_new_tokens: a program is compiled
once per (batch, bucket, N, num_samples) and sampling mode (greedy or not, top-k, top-p on or off,
EOS ids, LoRA present). Each compilation is logged and counted (`compile_count()`).

Token selection (fp32, per step):
  * greedy (`temperature=0`): the argmax (lowest id on ties);
  * otherwise the logits are divided by the temperature and, when top-k / top-p are on, restricted
    to a `lax.top_k` window (no full-vocabulary sort; top-p alone looks at the `top_p_window`
    most likely tokens, 1024 by default, so the nucleus holds at most that many);
  * the draw is an inverse-CDF lookup with one uniform number per row: a cumulative sum over
    128-token blocks, then within the chosen block. Gumbel-argmax would need a random number per
    vocabulary entry, which costs more than the rest of a CPU decode step at batch 48 and V=49k.
    The draw is exact up to fp32 rounding of the cumulative sums (about 1e-7 of the total mass).

Returned log-probs are those of the sampled token under the distribution being sampled: log_softmax
of logits / temperature, renormalised over the top-k / top-p set when those are on
(log_softmax(logits) when greedy). The `min_new_tokens` EOS block is a length constraint, not part
of that distribution: EOS is removed from the draw (as transformers' `min_new_tokens` does) but the
log-probs keep their unblocked normaliser, so they equal what a teacher-forced pass with the same
temperature computes (`logprobs.token_logprobs`) also during the first K steps of a rollout. With
top-k / top-p on, the blocked draw follows transformers' order (EOS mask, then temperature, top-k,
top-p, so the candidates are the best non-EOS tokens), and the log-prob is taken against the
unblocked candidate set.

After a row emits an EOS id, its remaining tokens are the pad id (`eos_ids[0]`, or 0 without EOS
ids) with log-prob 0, and `lengths` counts tokens up to and including the EOS.

The module is longer than our usual 400 lines on purpose: token selection, the decode loop and the
host-side prompt packing are the parts of one compiled program and share its static `_Mode`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from typing import Optional, Sequence

from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
import numpy as np

from markovian_jax.models import decoder
from markovian_jax.models.config import DecoderConfig
from markovian_jax.runtime import sharding
from markovian_jax.sampling import batching

log = logging.getLogger(__name__)

TOP_P_WINDOW = 1024
_BLOCK = 128  # inverse-CDF block: 2 passes of V/128 and 128 instead of one sequential pass of V
_NEG = -1e30  # finite: exp(_NEG - max) is exactly 0 and a fully masked row never makes NaN
_COMPILES: collections.Counter = collections.Counter()


@struct.dataclass
class SampleOutput:
  """tokens int32 [R, N]; logprobs float32 [R, N] (0 after the end); lengths int32 [R].

  R = B * num_samples rows, grouped by prompt (prompt 0's samples first).
  """

  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array


@struct.dataclass
class _LoopState:
  """The decode loop's carry. R = decode rows (B * G samples, then the B greedy reference rows
  when `_Mode.reference_rows`, then filler rows up to a multiple of the data axis), S = P + N
  cache slots, N = max_new_tokens, V = vocabulary size.

  Attributes:
    step: int32 []: the index of the token that the next `select` writes, 0 .. N - 1.
    cache: (keys [L, R, Hkv, Dh, S], values [L, R, Hkv, S, Dh]) in the compute dtype.
    slots: bool [R, S]: which cache slots hold a token (the prompt's real ones, then each decoded
      token as it is written).
    logits: float32 [R, V]: the logits that select the token at `step`.
    positions: int32 [R]: the rotary position of the token at `step` (counted over real tokens).
    done: bool [R]: the row has emitted an EOS id (filler rows: from the start).
    lengths: int32 [R]: tokens emitted before `step`, up to and including the EOS.
    tokens: int32 [R, N]: the selected tokens; the pad id from the end of the row on.
    logprobs: float32 [R, N]: their log-probs; 0 from the end of the row on.
  """

  step: jax.Array
  cache: tuple
  slots: jax.Array
  logits: jax.Array
  positions: jax.Array
  done: jax.Array
  lengths: jax.Array
  tokens: jax.Array
  logprobs: jax.Array


def compile_count() -> int:
  """Number of sampler programs compiled (traced) so far in this process."""
  return sum(_COMPILES.values())


@dataclasses.dataclass(frozen=True)
class _Mode:
  """Everything static about one sampler program (hashable: a jit static argument)."""

  config: DecoderConfig
  max_new_tokens: int
  num_samples: int
  greedy: bool
  top_k: int  # 0 = off
  use_top_p: bool
  top_p_window: int
  eos_ids: tuple
  mesh: Optional[Mesh]
  reference_rows: bool = False  # also decode one greedy base-model row per prompt

  @property
  def window(self) -> int:
    """Candidate-set size of the top-k / top-p path (0 = full vocabulary)."""
    if self.greedy or (self.top_k == 0 and not self.use_top_p):
      return 0
    return min(self.top_k or self.top_p_window, self.config.vocab_size)


# ------------------------------------------------------------------ token selection


def _last_positive(w: jax.Array) -> jax.Array:
  """int32 [R]: index of the last entry > 0 along the last axis of w [R, M] (0 if none)."""
  m = w.shape[-1]
  return (m - 1 - jnp.argmax(w[:, ::-1] > 0, axis=-1)).astype(jnp.int32)


def _inverse_cdf(w: jax.Array, u: jax.Array) -> jax.Array:
  """Draws one index per row with probability proportional to the weights.

  Args:
    w: float32 [R, M] non-negative weights (each row has a positive entry).
    u: float32 [R] uniform in [0, 1).
  Returns:
    int32 [R], always an index of positive weight.
  """
  r, m = w.shape
  blk = _BLOCK if m > 2 * _BLOCK else m
  w = jnp.pad(w, ((0, 0), (0, (-m) % blk))).reshape(r, -1, blk)
  sums = jnp.sum(w, axis=-1)  # [R, nb]
  csum = jnp.cumsum(sums, axis=-1)
  target = u * csum[:, -1]
  # Zero-weight entries repeat the previous cumulative value, so they are never the first entry
  # above the target; rounding that pushes the count past the end is clamped to the last positive.
  b = jnp.minimum(jnp.sum(csum <= target[:, None], axis=-1), _last_positive(sums))
  take = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]  # noqa: E731
  rest = target - (take(csum, b) - take(sums, b))
  inner = jnp.take_along_axis(w, b[:, None, None], axis=1)[:, 0]  # [R, blk]
  j = jnp.minimum(
    jnp.sum(jnp.cumsum(inner, axis=-1) <= rest[:, None], axis=-1), _last_positive(inner)
  )
  return (b * blk + j).astype(jnp.int32)


def _first_argmax(x: jax.Array, top: jax.Array) -> jax.Array:
  """int32 [R]: lowest index where x [R, M] equals its row max `top` [R, 1]."""
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def _nucleus(vals: jax.Array, allowed: jax.Array, top_p) -> jax.Array:
  """bool [R, W]: the allowed entries of descending `vals` whose preceding mass is < top_p."""
  probs = jax.nn.softmax(jnp.where(allowed, vals, _NEG), axis=-1)
  return allowed & ((jnp.cumsum(probs, axis=-1) - probs) < top_p)


def _select(mode: _Mode, logits, u, temperature, top_p, block, greedy_rows=None):
  """One token per row.

  Args:
    logits: float32 [R, V]; u: float32 [R] uniform; temperature, top_p: float32 scalars;
    block: bool scalar, True while EOS is suppressed (fewer than min_new_tokens generated);
    greedy_rows: optional bool [R], rows decoded greedily (unscaled logits) in a sampling
      program (the reference rows; top-k / top-p are off in that mode).
  Returns:
    (token int32 [R], log-prob float32 [R]); see the module docstring for what the log-prob is.
  """
  eos = jnp.asarray(mode.eos_ids, jnp.int32)
  v = logits.shape[-1]
  eos_col = jnp.zeros((v,), bool).at[eos].set(True) if mode.eos_ids else jnp.zeros((v,), bool)
  blocked = eos_col & block

  if mode.window == 0:
    if greedy_rows is not None:
      x = logits / jnp.where(greedy_rows, 1.0, temperature)[:, None]
    else:
      x = logits if mode.greedy else logits / temperature
    xb = jnp.where(blocked, _NEG, x)
    top = jnp.max(xb, axis=-1, keepdims=True)
    w = jnp.exp(xb - top)
    if mode.greedy:
      tok = _first_argmax(xb, top)
    elif greedy_rows is not None:
      tok = jnp.where(greedy_rows, _first_argmax(xb, top), _inverse_cdf(w, u))
    else:
      tok = _inverse_cdf(w, u)
    log_z = top[:, 0] + jnp.log(jnp.sum(w, axis=-1))
    if mode.eos_ids:  # add back the blocked EOS mass: the log-probs are of the unblocked policy
      eos_lse = jax.nn.logsumexp(x[:, eos], axis=-1)
      log_z = jnp.where(block, jnp.logaddexp(log_z, eos_lse), log_z)
    lp = jnp.take_along_axis(x, tok[:, None], axis=-1)[:, 0] - log_z
    return tok, lp

  k = mode.window
  x = logits / temperature
  # With EOS blocked the k candidates are the k best non-EOS tokens, so look at k + |eos|.
  vals, idx = jax.lax.top_k(x, min(v, k + len(mode.eos_ids)))
  rank = jnp.arange(vals.shape[-1])
  free = jnp.cumsum(~blocked[idx], axis=-1) - 1  # rank among the non-blocked entries
  cand = rank < k
  draw = ~blocked[idx] & (free < k)
  if mode.use_top_p:
    cand = _nucleus(vals, cand, top_p)
    draw = _nucleus(vals, draw, top_p)
  top = jnp.max(jnp.where(draw, vals, _NEG), axis=-1, keepdims=True)
  w = jnp.where(draw, jnp.exp(vals - top), 0.0)
  choice = _inverse_cdf(w, u)
  tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  log_z = jax.nn.logsumexp(jnp.where(cand, vals, _NEG), axis=-1)
  lp = jnp.take_along_axis(vals, choice[:, None], axis=-1)[:, 0] - log_z
  return tok, lp


# ------------------------------------------------------------------ the program


def _constrain(x, mesh: Optional[Mesh], spec_fn):
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec_fn(mesh, x.shape))


# The sampler's layout (read when a program is traced; tests swap in the train rules).
_RULES = sharding.DECODE_RULES


def _rows_sharding(mesh: Mesh, shape) -> NamedSharding:
  return sharding.batch_sharding(mesh, shape, _RULES)


def _cache_specs():
  return (
    functools.partial(sharding.cache_sharding, rules=_RULES),
    functools.partial(sharding.cache_sharding, rules=_RULES, values=True),
  )


def _decode_layout(params, lora, mesh: Optional[Mesh]):
  """params and LoRA in the sampler's layout: a no-op unless fsdp > 1 (`sharding.DECODE_RULES`)."""
  if mesh is None or sharding.axis_sizes(mesh)["fsdp"] == 1:
    return params, lora
  place = lambda tree: jax.lax.with_sharding_constraint(  # noqa: E731
    tree, sharding.param_shardings(tree, mesh, _RULES)
  )
  params = place(params)
  if lora is not None:
    lora = lora.replace(params=place(lora.params))
  return params, lora


@functools.partial(jax.jit, static_argnames=("mode",))
def _generate(params, lora, tokens, mask, rng, temperature, top_p, min_new_tokens, *, mode: _Mode):
  """tokens int32 [B, P] left-padded, mask bool [B, P] -> SampleOutput with B*G rows (and, with
  `mode.reference_rows`, a second SampleOutput of B greedy base-model rows)."""
  b, p = tokens.shape
  g, n, c = mode.num_samples, mode.max_new_tokens, mode.config
  _COMPILES[(mode, b, p, lora is None)] += 1
  log.info(
    "sampler: compiling batch=%d bucket=%d new_tokens=%d num_samples=%d (program %d)",
    b,
    p,
    n,
    g,
    compile_count(),
  )
  params, lora = _decode_layout(params, lora, mode.mesh)
  # Which prefill row each decode row continues: the G samples of prompt i share prefill row i;
  # reference rows (after all samples) continue a base-model prefill of the same prompts.
  source = jnp.repeat(jnp.arange(b), g)
  prefill_scale = row_scale = greedy_rows = None
  if mode.reference_rows:
    tokens, mask = jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask])
    prefill_scale = jnp.concatenate([jnp.ones((b,)), jnp.zeros((b,))])
    source = jnp.concatenate([source, b + jnp.arange(b)])
    row_scale = jnp.concatenate([jnp.ones((b * g,)), jnp.zeros((b,))])
  real = source.shape[0]
  rows = real if mode.mesh is None else sharding.pad_rows(real, mode.mesh, _RULES)
  source = jnp.pad(source, (0, rows - real))  # filler rows continue prompt 0
  if row_scale is not None:
    row_scale = jnp.pad(row_scale, (0, rows - real))
    greedy_rows = row_scale == 0
  if mode.mesh is not None:  # the prefill splits over data too (filler prompts: copies of 0)
    fill = jnp.zeros(
      (sharding.pad_rows(tokens.shape[0], mode.mesh, _RULES) - tokens.shape[0],), jnp.int32
    )
    tokens, mask = (
      _constrain(jnp.concatenate([x, x[fill]]), mode.mesh, _rows_sharding) for x in (tokens, mask)
    )
    if prefill_scale is not None:
      prefill_scale = jnp.pad(prefill_scale, (0, fill.shape[0]))
  # Prefill: one forward over the distinct prompts, into a cache that holds only the prompt.
  dtype = jnp.dtype(c.dtype)
  cache = tuple(
    _constrain(jnp.zeros(shape, dtype), mode.mesh, spec)
    for shape, spec in zip(decoder.cache_shape(c, tokens.shape[0], p), _cache_specs())
  )
  positions = decoder.positions_from_mask(mask)
  hidden, cache = decoder.forward(
    c,
    params,
    tokens,
    attention_mask=mask,
    positions=positions,
    lora=lora,
    cache=cache,
    cache_index=0,
    cache_mask=mask,
    lora_row_scale=prefill_scale,
  )
  logits = decoder.project(c, params, hidden[:, -1])

  # Share it among the G samples and make room for the N new tokens.
  room = ([(0, 0)] * 4 + [(0, n)], [(0, 0)] * 3 + [(0, n), (0, 0)])  # slots: last / 4th axis
  cache = tuple(
    _constrain(jnp.pad(jnp.take(x, source, axis=1), pad), mode.mesh, spec)
    for x, pad, spec in zip(cache, room, _cache_specs())
  )
  slots = jnp.pad(mask[source], [(0, 0), (0, n)])
  logits = _constrain(logits[source], mode.mesh, _rows_sharding)
  pos = positions[source, -1] + 1
  pad_id = mode.eos_ids[0] if mode.eos_ids else 0
  eos = jnp.asarray(mode.eos_ids, jnp.int32)

  def select(state: _LoopState) -> tuple[jax.Array, _LoopState]:
    """Selects the token at `state.step` into tokens / logprobs / lengths / done; returns it
    (int32 [R]) with the updated state (step, cache, slots, logits and positions unchanged)."""
    i, done = state.step, state.done
    # One uniform per sampled row, drawn as without reference rows (which are greedy).
    u = jax.random.uniform(jax.random.fold_in(rng, i), (b * g,), jnp.float32)
    u = jnp.pad(u, (0, rows - b * g))
    tok, lp = _select(mode, state.logits, u, temperature, top_p, i < min_new_tokens, greedy_rows)
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    out_tok = jax.lax.dynamic_update_slice_in_dim(state.tokens, tok[:, None], i, axis=1)
    out_lp = jax.lax.dynamic_update_slice_in_dim(state.logprobs, lp[:, None], i, axis=1)
    lengths = state.lengths + (~done).astype(jnp.int32)
    if mode.eos_ids:
      done = done | jnp.isin(tok, eos)
    return tok, state.replace(done=done, lengths=lengths, tokens=out_tok, logprobs=out_lp)

  def body(state: _LoopState) -> _LoopState:
    tok, state = select(state)
    i = state.step
    slots = jax.lax.dynamic_update_slice_in_dim(
      state.slots, jnp.ones((rows, 1), bool), p + i, axis=1
    )
    hidden, cache = decoder.forward(
      c,
      params,
      tok[:, None],
      positions=state.positions[:, None],
      lora=lora,
      cache=state.cache,
      cache_index=p + i,
      cache_mask=slots,
      lora_row_scale=row_scale,
    )
    logits = decoder.project(c, params, hidden[:, 0])
    return state.replace(
      step=i + 1, cache=cache, slots=slots, logits=logits, positions=state.positions + 1
    )

  def cond(state: _LoopState) -> jax.Array:
    return (state.step < n - 1) & ~jnp.all(state.done)

  # Filler rows are done from the start: they emit pads and never hold the early exit back.
  init = _LoopState(
    step=jnp.int32(0),
    cache=cache,
    slots=slots,
    logits=logits,
    positions=pos,
    done=jnp.arange(rows) >= real,
    lengths=jnp.zeros((rows,), jnp.int32),
    tokens=jnp.full((rows, n), pad_id, jnp.int32),
    logprobs=jnp.zeros((rows, n), jnp.float32),
  )
  state = jax.lax.while_loop(cond, body, init)
  # The last token needs no forward pass after it (and after an early exit this writes pads).
  _, state = select(state)
  out = SampleOutput(tokens=state.tokens, logprobs=state.logprobs, lengths=state.lengths)
  part = (
    lambda lo, hi: jax.tree.map(  # noqa: E731
      lambda x: _constrain(x[lo:hi], mode.mesh, _rows_sharding), out
    )
  )
  if mode.reference_rows:
    return part(0, b * g), part(b * g, real)
  return part(0, real)


# ------------------------------------------------------------------ host side


def _check_mask(mask: np.ndarray):
  if not mask.any(axis=1).all():
    raise ValueError(
      f"prompt rows {np.flatnonzero(~mask.any(axis=1)).tolist()} are empty "
      "(no real token in prompt_mask)"
    )
  if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
    bad = np.flatnonzero((np.diff(mask.astype(np.int8), axis=1) < 0).any(axis=1)).tolist()
    raise ValueError(f"prompt rows {bad} are not left-padded (padding must come before the tokens)")


def _host_prompts(prompt_ids, prompt_mask, bucket: int, vocab_size: int):
  """(tokens int32 [B, P], mask bool [B, P]) on the host, P a multiple of `bucket`."""
  if prompt_mask is None and not hasattr(prompt_ids, "shape"):
    seqs = [list(map(int, s)) for s in prompt_ids]
    if not seqs:
      raise ValueError("generate() got no prompts")
    empty = [i for i, s in enumerate(seqs) if not s]
    if empty:
      raise ValueError(f"prompts {empty} are empty")
    tokens, mask = batching.pad_left(seqs, batching.bucket(max(map(len, seqs)), bucket))
  else:
    tokens = np.asarray(prompt_ids)
    if tokens.ndim != 2:
      raise ValueError(f"prompt_ids array must be [B, P], got shape {tokens.shape}")
    mask = np.ones(tokens.shape, bool) if prompt_mask is None else np.asarray(prompt_mask, bool)
    if mask.shape != tokens.shape:
      raise ValueError(f"prompt_mask shape {mask.shape} != prompt_ids shape {tokens.shape}")
    _check_mask(mask)
    width = batching.bucket(tokens.shape[1], bucket)
    pad = [(0, 0), (width - tokens.shape[1], 0)]
    tokens, mask = np.pad(tokens.astype(np.int32), pad), np.pad(mask, pad)
  real = tokens[mask]
  if real.size and (real.min() < 0 or real.max() >= vocab_size):
    raise ValueError(
      f"prompt token ids must be in [0, {vocab_size}), got [{int(real.min())}, {int(real.max())}]"
    )
  return tokens, mask


def _place(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A row-sharded (decode layout) global array from a host array every process holds in full."""
  sh = _rows_sharding(mesh, x.shape)
  return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def _params_mesh(params) -> Optional[Mesh]:
  """The mesh the base weights live on (None when they are not on a NamedSharding)."""
  for leaf in jax.tree.leaves(params):
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, NamedSharding):
      return sh.mesh
  return None


def check_settings(
  max_new_tokens: int,
  min_new_tokens: int = 0,
  num_samples: int = 1,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> None:
  """Raises ValueError, naming the argument, for sampling settings `generate` cannot honour;
  callers that take them from a user (the sample CLI) check before loading a model."""
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if int(num_samples) < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
  if int(top_k) < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if not 0 <= int(min_new_tokens) <= int(max_new_tokens):
    raise ValueError(
      f"min_new_tokens={min_new_tokens} must be in [0, max_new_tokens={max_new_tokens}]"
    )


def generate(
  config: DecoderConfig,
  params,
  prompt_ids,
  *,
  max_new_tokens: int,
  rng=None,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  lora=None,
  min_new_tokens: int = 0,
  eos_ids: Sequence[int] = (),
  prompt_mask=None,
  num_samples: int = 1,
  bucket: int = 64,
  top_p_window: int = TOP_P_WINDOW,
  mesh: Optional[Mesh] = None,
  _reference_rows: bool = False,
) -> SampleOutput:
  """Samples `max_new_tokens` tokens after each prompt, `num_samples` times per prompt.

  Args:
    config, params: the base model; lora: optional `LoraAdapter` (its dropout is off here).
    prompt_ids: a ragged list of token-id lists, or an int array [B, P] left-padded with
      `prompt_mask` (bool [B, P]; default all real). Host inputs are left-padded further to a
      multiple of `bucket`; a device array is used as given.
    rng: a PRNG key or an int seed (default 0); step i draws with `fold_in(rng, i)`.
    temperature: 0 = greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass (1 = off), taken within
      the top_k tokens, or the `top_p_window` most likely tokens when top_k is off.
    min_new_tokens: EOS cannot end a row before this many tokens (the reference uses
      min_new_tokens = max_new_tokens = K).
    eos_ids: tokens that end a row.
    mesh: run in the mesh's decode layout (module docstring); default: the mesh of a sharded
      `prompt_ids`, else the mesh the params live on.
  Returns:
    SampleOutput: tokens int32 [B*num_samples, N], logprobs float32 [B*num_samples, N],
    lengths int32 [B*num_samples]; see the module docstring for pads and log-probs.
  """
  check_settings(max_new_tokens, min_new_tokens, num_samples, temperature, top_k, top_p)
  eos_ids = tuple(dict.fromkeys(int(e) for e in eos_ids))  # deduplicated, order kept
  if any(not 0 <= e < config.vocab_size for e in eos_ids):
    raise ValueError(f"eos_ids {eos_ids} must be in [0, {config.vocab_size})")
  if eos_ids and int(min_new_tokens) > 0 and len(eos_ids) >= config.vocab_size:
    raise ValueError("every token is an EOS id, so min_new_tokens cannot be honoured")

  if isinstance(prompt_ids, jax.Array):
    tokens = prompt_ids.astype(jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    if mask.shape != tokens.shape or tokens.ndim != 2:
      raise ValueError(
        f"prompt_ids {tokens.shape} must be [B, P] and match prompt_mask {mask.shape}"
      )
    if mesh is None and isinstance(prompt_ids.sharding, NamedSharding):
      mesh = prompt_ids.sharding.mesh
  else:
    tokens, mask = _host_prompts(prompt_ids, prompt_mask, int(bucket), config.vocab_size)
    mesh = mesh or _params_mesh(params)
    if mesh is not None:
      tokens, mask = _place(tokens, mesh), _place(mask, mesh)
  longest = tokens.shape[1] + int(max_new_tokens)
  if longest > config.max_position_embeddings:
    raise ValueError(
      f"padded prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) = "
      f"{longest} exceeds max_position_embeddings={config.max_position_embeddings}"
    )

  if rng is None:
    rng = 0
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.PRNGKey(int(rng))
  if lora is not None and lora.dropout:
    lora = lora.replace(dropout=0.0)  # sampling is deterministic given rng; also one program
  greedy = temperature == 0
  mode = _Mode(
    config=config,
    max_new_tokens=int(max_new_tokens),
    num_samples=int(num_samples),
    greedy=greedy,
    top_k=0 if greedy else int(top_k),
    use_top_p=not greedy and top_p < 1.0,
    top_p_window=int(top_p_window),
    eos_ids=eos_ids,
    mesh=mesh,
    reference_rows=_reference_rows,
  )
  return _generate(
    params,
    lora,
    tokens,
    mask,
    rng,
    jnp.float32(temperature or 1.0),
    jnp.float32(top_p),
    jnp.int32(min_new_tokens),
    mode=mode,
  )


def generate_with_reference(
  config: DecoderConfig,
  params,
  prompt_ids,
  *,
  lora,
  max_new_tokens: int,
  rng=None,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  min_new_tokens: int = 0,
  eos_ids: Sequence[int] = (),
  prompt_mask=None,
  num_samples: int = 1,
  bucket: int = 64,
  mesh: Optional[Mesh] = None,
) -> tuple[SampleOutput, SampleOutput]:
  """The policy's samples and the base model's greedy continuation of every prompt, in one
  decode loop: what a Markovian step samples (G CoTs per question under base + `lora`, and the
  baseline CoT' of the frozen base model).

  A decode step reads every weight once whatever the batch, so the B reference rows ride along
  the B * G samples nearly for free (their adapter branch is scaled by 0), where a separate
  batch-B greedy call would cost about as much as the sampling itself. Arguments are those of
  `generate`; `min_new_tokens` applies to both. With top-k / top-p on, `temperature=0` or no
  adapter, this makes the two `generate` calls instead (same results).

  Returns:
    (samples: SampleOutput of B * num_samples rows, as `generate(..., lora=lora)`;
     reference: SampleOutput of B rows, as `generate(..., temperature=0, lora=None)`).
  """
  kw = dict(
    max_new_tokens=max_new_tokens,
    min_new_tokens=min_new_tokens,
    eos_ids=eos_ids,
    prompt_mask=prompt_mask,
    bucket=bucket,
    mesh=mesh,
  )
  if lora is None or temperature == 0 or top_k or top_p < 1.0:
    return (
      generate(
        config,
        params,
        prompt_ids,
        lora=lora,
        rng=rng,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
        **kw,
      ),
      generate(config, params, prompt_ids, temperature=0.0, **kw),
    )
  return generate(
    config,
    params,
    prompt_ids,
    lora=lora,
    rng=rng,
    temperature=temperature,
    num_samples=num_samples,
    _reference_rows=True,
    **kw,
  )
