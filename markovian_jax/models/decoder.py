"""The decoder of every supported family (Llama, Mistral, Qwen2/3, Phi-3, GPT-2) in Flax linen,
with a functional boundary. A family is a set of named `DecoderConfig` fields (`config.FAMILIES`):
biases, q/k norm, norm kind, position kind, MLP kind, fused q|k|v and gate|up kernels, sliding
window; the layer code branches on them at trace time, so one scan and one LoRA layout serve all.

The parameters are a plain nested dict (HF names, kernels stored `[in, out]`, layers stacked on a
leading `[L]` axis by one `nn.scan`):

    params = {'embed': {'embedding': [V, D]},
              'layers': {'attn_norm': {'scale': [L, D]},
                         'attn': {'q': {'kernel': [L, D, Hq*Dh]}, 'k': ..., 'v': ..., 'o': ...},
                         'mlp_norm': {'scale': [L, D]},
                         'mlp': {'gate': {'kernel': [L, D, F]}, 'up': ..., 'down': ...}},
              'final_norm': {'scale': [D]},
              'lm_head': {'kernel': [D, V]}}           # absent when embeddings are tied

Family variants: a `bias` [L, out] beside a kernel (qkv_bias, out_bias, mlp_bias); norms with a
`bias` (norm_kind="layer"); `attn/q_norm`, `attn/k_norm` scales [L, Dh] (qk_norm); `attn/qkv`
[L, D, (Hq + 2 Hkv) Dh] instead of q, k, v (fused_qkv); `mlp/gate_up` [L, D, 2F] instead of gate,
up (fused_gate_up); only `mlp/up`, `mlp/down` (mlp_kind="gelu_tanh"); `pos_embed/embedding`
[P, D] (position_kind="learned").

A LoRA adapter is a second tree with the same paths and leaves `a: [L, in, r]`, `b: [L, r, out]`
passed as the `lora` variable collection; with no adapter the same code is the base model, so the
policy, the answer scorer and the KL reference share one copy of the weights. A per-row scale of
the adapter branch (`lora_row_scale`) lets one batch mix policy rows and base-model rows.

Attention takes an explicit key mask and position ids, so left-padded batches give exactly the
logits of the unpadded sequences. An optional KV cache (keys `[L, B, Hkv, Dh, S]`, values
`[L, B, Hkv, S, Dh]`, `cache_shape`) rides in the scan carry and is written with
`dynamic_update_slice` (in place when the caller donates it). `forward_with_prefix` runs G
continuations of each of Q prompts with the prompts computed once: the prompt layers emit their
keys and values (scan outputs) and the continuation layers attend to them (scan inputs).

Attention has two kernels, chosen by `config.attention_impl` (`attention_kernel`): the einsum path
(fp32 scores and softmax, probabilities in the compute dtype) and `jax.nn.dot_product_attention`
(XLA's implementation, or cuDNN flash attention on GPU; same precision). The latter runs where
the tokens attend only to themselves: a forward without cache, the prompt pass of
`forward_with_prefix`, and a prefill into slot 0 of a cache as long as the prompt. A decode step
(one query against the cache's layouts) and the continuations of a shared prefix always take the
einsum path, which is also the default on CPU.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from markovian_jax.models import lora_branch, rope
from markovian_jax.models.config import DecoderConfig

Cache = Tuple[jnp.ndarray, jnp.ndarray]  # keys [L, B, Hkv, Dh, S], values [L, B, Hkv, S, Dh]

_INIT = nn.initializers.normal(0.02)
_MASKED = -1e30  # finite, so a fully masked (padding) query row stays NaN-free


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    # HF casts back to the activation dtype before multiplying by the weight.
    return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with scale and bias (GPT-2), computed in fp32 as torch does, output in `dtype`."""

  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def norm(c: DecoderConfig, name: str) -> nn.Module:
  """The family's layer norm (`config.norm_kind`)."""
  cls = LayerNorm if c.norm_kind == "layer" else RMSNorm
  return cls(c.rms_norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), name=name)


class Linear(nn.Module):
  """Projection (with a bias when `use_bias`); adds `scale * dropout(x) @ a @ b` when a LoRA pair
  is present (`lora_branch`: hashed dropout masks, a VJP that XLA:CPU runs without big
  transposes)."""

  features: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  lora_scale: float = 0.0
  lora_dropout: float = 0.0
  train: bool = False
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, row_scale=None):
    """row_scale: optional float32 [B], multiplies each row's adapter branch (0 = base model)."""
    kernel = self.param("kernel", _INIT, (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x, kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(
        self.dtype
      )
    if self.has_variable("lora", "a"):
      a = self.get_variable("lora", "a")
      b = self.get_variable("lora", "b")
      if self.train and self.lora_dropout > 0:
        delta = lora_branch.dropout_low_rank(
          self.make_rng("dropout"), x, a, b, self.lora_scale, self.lora_dropout
        )
      else:
        delta = lora_branch.low_rank(x.astype(a.dtype), a, b, self.lora_scale)
      if row_scale is not None:
        delta = delta * row_scale.astype(delta.dtype).reshape((-1,) + (1,) * (delta.ndim - 1))
      y = y + delta.astype(y.dtype)
    return y


class Attention(nn.Module):
  """own_only: the tokens attend only to themselves (causally, within `mask`): no cache history
  before them and no shared prefix. Only then can `jax.nn.dot_product_attention` run it."""

  config: DecoderConfig
  lora_kw: dict
  own_only: bool = False

  @nn.compact
  def __call__(
    self,
    x,
    cos,
    sin,
    mask,
    cache: Optional[Cache],
    cache_index,
    layer_index,
    prefix=None,
    row_scale=None,
  ):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    dense = lambda n, name, bias: functools.partial(  # noqa: E731
      Linear(n, dtype, pdtype, name=name, use_bias=bias, **self.lora_kw), row_scale=row_scale
    )
    b, t, _ = x.shape
    nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    if c.fused_qkv:
      qkv = dense(nq + 2 * nkv, "qkv", c.qkv_bias)(x)
      q, k, v = qkv[..., :nq], qkv[..., nq : nq + nkv], qkv[..., nq + nkv :]
    else:
      q, k, v = (dense(n, name, c.qkv_bias)(x) for n, name in ((nq, "q"), (nkv, "k"), (nkv, "v")))
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:  # per-head RMSNorm over Dh, before RoPE
      q = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="k_norm")(k)
    if c.position_kind == "rope":
      q = rope.apply_rope(q, cos, sin)
      k = rope.apply_rope(k, cos, sin)
    new_kv = (k, v)
    groups = c.num_heads // c.num_kv_heads
    if cache is not None:
      # Keys are stored [L, B, Hkv, Dh, S] and values [L, B, Hkv, S, Dh]: the operand layouts of
      # the two attention matmuls, so a decode step reads the cache without transposing it.
      ck, cv = cache
      ck = jax.lax.dynamic_update_slice(
        ck, k.transpose(0, 2, 3, 1)[None].astype(ck.dtype), (layer_index, 0, 0, 0, cache_index)
      )
      cv = jax.lax.dynamic_update_slice(
        cv, v.transpose(0, 2, 1, 3)[None].astype(cv.dtype), (layer_index, 0, 0, cache_index, 0)
      )
      cache = (ck, cv)
    kernel = attention_kernel(c, t) if self.own_only and prefix is None else "einsum"
    if kernel != "einsum":
      if cache is not None:
        # A prefill into slot 0 of a cache as long as the prompt: these keys are the whole cache
        # (rounded through the cache's dtype, as the einsum path reads them back).
        k, v = k.astype(ck.dtype).astype(dtype), v.astype(cv.dtype).astype(dtype)
      out = _dot_product_attention(kernel, q, k, v, mask, fallback=c.attention_impl == "auto")
      return (
        dense(c.hidden_size, "o", c.out_bias)(out.reshape(b, t, c.num_heads * c.head_dim)),
        cache,
        new_kv,
      )
    if cache is not None:
      kt = jax.lax.dynamic_index_in_dim(ck, layer_index, 0, keepdims=False).astype(dtype)
      vt = jax.lax.dynamic_index_in_dim(cv, layer_index, 0, keepdims=False).astype(dtype)
      # [B, Hkv, groups * T, Dh]: the query heads that share a kv head, stacked over positions.
      qh = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim).transpose(0, 2, 3, 1, 4)
      qh = qh.reshape(b, c.num_kv_heads, groups * t, c.head_dim)
      scores = jnp.matmul(qh, kt, preferred_element_type=jnp.float32)
      scores = scores.reshape(b, c.num_kv_heads, groups, t, -1) * (c.head_dim**-0.5)
      scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
      probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
      out = jnp.matmul(probs.reshape(b, c.num_kv_heads, groups * t, -1), vt)
      out = out.reshape(b, c.num_kv_heads, groups, t, c.head_dim).transpose(0, 3, 1, 2, 4)
      out = out.reshape(b, t, c.num_heads * c.head_dim)
      return dense(c.hidden_size, "o", c.out_bias)(out), cache, new_kv
    q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores * (c.head_dim**-0.5), _MASKED)
    if prefix is None:
      probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
      out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    else:
      out = _attend_with_prefix(c, q, scores, v, prefix, dtype)
    out = out.reshape(b, t, c.num_heads * c.head_dim)
    return dense(c.hidden_size, "o", c.out_bias)(out), cache, new_kv


def attention_kernel(config: DecoderConfig, t: int) -> str:
  """Which kernel runs self-attention over `t` tokens: "einsum", "xla" or "cudnn" (the two
  implementations of `jax.nn.dot_product_attention`), from `config.attention_impl` and the
  default backend (see `config.ATTENTION_IMPLS`). Under "auto", "cudnn" is a first choice:
  `_dot_product_attention` falls back to "xla" where cuDNN refuses the call."""
  impl = config.attention_impl
  if impl == "einsum":
    return "einsum"
  if impl == "dot_product":
    return "xla"
  if impl == "cudnn":
    return "cudnn"
  backend = jax.default_backend()
  if backend == "cpu":
    return "einsum"
  # cuDNN flash attention: fp16/bf16 only, and an even length (its backward with a mask).
  if (
    backend in ("gpu", "cuda")
    and jnp.dtype(config.dtype) in (jnp.bfloat16, jnp.float16)
    and t >= 2
    and t % 2 == 0
  ):
    return "cudnn"
  return "xla"


def _dot_product_attention(kernel: str, q, k, v, mask, fallback: bool = False):
  """`jax.nn.dot_product_attention` of q [B, T, Hq, Dh] over k, v [B, T, Hkv, Dh] with the bool
  mask [B, T, T] (causal and key padding), kernel "xla" or "cudnn".

  Logits and softmax are fp32 in both implementations (q.k accumulated in fp32, softmax in fp32,
  probabilities cast to the value dtype, as the einsum path does). A fully masked (padding) query
  row gets the mean of the values, as in the einsum path, so it stays finite. With `fallback`
  ("auto"), a call cuDNN refuses at trace time (a shape it does not support, no cuDNN) runs XLA's
  implementation instead.
  """
  mask = mask[:, None]  # [B, 1, T, T]: one mask for every head
  if kernel == "cudnn":
    try:
      # is_causal lets cuDNN skip the blocks above the diagonal; `mask` repeats it with the key
      # padding, so the result is the same either way.
      return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation="cudnn"
      )
    except (NotImplementedError, ValueError, RuntimeError):
      if not fallback:
        raise
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _attend_with_prefix(c: DecoderConfig, q, own_scores, v, prefix, dtype):
  """Attention over a shared prefix's keys followed by the row's own (causally masked) keys.

  Row r of the batch continues prefix row r // G, so the G continuations of one prompt read its
  keys and values once, with no copy per row.

  Args:
    q: [B, T, Hkv, groups, Dh] queries; own_scores: float32 [B, Hkv, groups, T, T], scaled and
      masked; v: [B, T, Hkv, Dh].
    prefix: (keys, values [Q, P, Hkv, Dh] of this layer, after RoPE; mask bool [Q, P]).
  Returns:
    [B, T, Hkv, groups, Dh].
  """
  pk, pv, pmask = prefix
  nq, p = pmask.shape
  b, t = q.shape[:2]
  g = b // nq
  qg = q.reshape(nq, g, *q.shape[1:])
  pre = jnp.einsum("qgtkhd,qskd->qgkhts", qg, pk.astype(dtype), preferred_element_type=jnp.float32)
  visible = pmask[:, None, None, None, None, :]
  if c.sliding_window is not None:
    # Prefix slot j and the continuation's token i (slot p + i) are p + i - j apart.
    apart = p + jnp.arange(t)[:, None] - jnp.arange(p)[None, :]
    visible = visible & (apart < c.sliding_window)
  pre = jnp.where(visible, pre * (c.head_dim**-0.5), _MASKED)
  scores = jnp.concatenate([pre.reshape(b, *pre.shape[2:]), own_scores], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  p_pre = probs[..., :p].reshape(nq, g, *probs.shape[1:-1], p)
  out = jnp.einsum("qgkhts,qskd->qgtkhd", p_pre, pv.astype(dtype)).reshape(b, t, *q.shape[2:])
  return out + jnp.einsum("bkhts,bskd->btkhd", probs[..., p:], v)


class MLP(nn.Module):
  config: DecoderConfig
  lora_kw: dict

  @nn.compact
  def __call__(self, x, row_scale=None):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    dense = lambda n, name: Linear(
      n,
      dtype,
      pdtype,
      name=name,  # noqa: E731
      use_bias=c.mlp_bias,
      **self.lora_kw,
    )
    f = c.intermediate_size
    if c.mlp_kind == "gelu_tanh":
      return dense(c.hidden_size, "down")(
        nn.gelu(dense(f, "up")(x, row_scale), approximate=True), row_scale
      )
    if c.fused_gate_up:
      gate_up = dense(2 * f, "gate_up")(x, row_scale)
      gate, up = gate_up[..., :f], gate_up[..., f:]
    else:
      gate, up = dense(f, "gate")(x, row_scale), dense(f, "up")(x, row_scale)
    return dense(c.hidden_size, "down")(nn.silu(gate) * up, row_scale)


class DecoderLayer(nn.Module):
  config: DecoderConfig
  lora_kw: dict
  return_kv: bool = False
  own_only: bool = False  # see Attention

  @nn.compact
  def __call__(self, carry, cos, sin, mask, cache_index, prefix_mask, row_scale, xs):
    """xs: (layer index, this layer's prefix keys and values or None)."""
    x, cache = carry
    layer_index, prefix_kv = xs
    c = self.config
    prefix = None if prefix_kv is None else (*prefix_kv, prefix_mask)
    h = norm(c, "attn_norm")(x)
    h, cache, kv = Attention(c, self.lora_kw, self.own_only, name="attn")(
      h, cos, sin, mask, cache, cache_index, layer_index, prefix, row_scale
    )
    x = x + h
    h = norm(c, "mlp_norm")(x)
    x = x + MLP(c, self.lora_kw, name="mlp")(h, row_scale)
    return (x, cache), (kv if self.return_kv else None)


_REMAT_POLICIES = {
  "full": None,  # save nothing: recompute the whole layer in the backward pass
  "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def attention_mask(key_mask, t: int, cache_index=0, sliding_window=None):
  """bool [B, T, S]: query i sits in slot cache_index + i (slot i without a cache) and sees the
  valid keys (`key_mask` [B, S]) in slots up to its own (and, with a sliding window W, only the
  last W slots: query slot - key slot < W)."""
  s = key_mask.shape[1]
  apart = (cache_index + jnp.arange(t))[:, None] - jnp.arange(s)[None, :]
  causal = apart >= 0
  if sliding_window is not None:
    causal = causal & (apart < sliding_window)
  return causal[None] & key_mask[:, None, :].astype(bool)


class Decoder(nn.Module):
  """Returns final-norm hidden states `[B, T, D]` (compute dtype) and the updated cache."""

  config: DecoderConfig
  lora_scale: float = 0.0
  lora_dropout: float = 0.0
  train: bool = False

  @nn.compact
  def __call__(
    self,
    tokens,
    positions,
    key_mask,
    cache: Optional[Cache] = None,
    cache_index=0,
    prefix=None,
    return_kv: bool = False,
    lora_row_scale=None,
  ):
    """lora_row_scale: optional float32 [B] multiplying each row's adapter branch (0 runs that
    row on the base model: one batch can mix the policy and the reference).
    prefix: optional (keys, values [L, Q, P, Hkv, Dh], mask bool [Q, P]) that row r attends
    to before its own tokens (row r continues prefix row r // (B / Q)). return_kv: also return
    every layer's keys (after RoPE) and values of these tokens, [L, B, T, Hkv, Dh] each."""
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    x = nn.Embed(
      c.vocab_size,
      c.hidden_size,
      embedding_init=_INIT,
      param_dtype=pdtype,
      dtype=dtype,
      name="embed",
    )(tokens)
    if c.position_kind == "learned":
      x = x + nn.Embed(
        c.max_position_embeddings,
        c.hidden_size,
        embedding_init=_INIT,
        param_dtype=pdtype,
        dtype=dtype,
        name="pos_embed",
      )(positions)
      cos = sin = None
    else:
      cos, sin = rope.rope_tables(c, positions)
    mask = attention_mask(key_mask, tokens.shape[1], cache_index, c.sliding_window)
    layer_cls = DecoderLayer
    if c.remat != "none":
      layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=_REMAT_POLICIES[c.remat])
    layers = nn.scan(
      layer_cls,
      variable_axes={"params": 0, "lora": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * 6 + (0,),
      length=c.num_layers,
    )
    lora_kw = dict(lora_scale=self.lora_scale, lora_dropout=self.lora_dropout, train=self.train)
    prefix_kv, prefix_mask = (None, None) if prefix is None else (prefix[:2], prefix[2])
    # Whether these tokens see only themselves (what dot_product_attention can run): no prefix,
    # and no cache or a prefill from slot 0 of a cache exactly as long as the tokens.
    own_only = prefix is None and (
      cache is None
      or (
        isinstance(cache_index, int) and cache_index == 0 and cache[0].shape[-1] == tokens.shape[1]
      )
    )
    (x, cache), kv = layers(c, lora_kw, return_kv, own_only, name="layers")(
      (x, cache),
      cos,
      sin,
      mask,
      cache_index,
      prefix_mask,
      lora_row_scale,
      (jnp.arange(c.num_layers), prefix_kv),
    )
    x = norm(c, "final_norm")(x)
    if not c.tie_word_embeddings:
      # Declared here so init() builds it; applied by `project`, which callers chunk over the vocab.
      LMHead(c.hidden_size, c.vocab_size, pdtype, name="lm_head")()
    return (x, cache, kv) if return_kv else (x, cache)


class LMHead(nn.Module):
  in_features: int
  features: int
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self):
    return self.param("kernel", _INIT, (self.in_features, self.features), self.param_dtype)


# ------------------------------------------------------------------ functional API


def positions_from_mask(attention_mask: jnp.ndarray) -> jnp.ndarray:
  """int32 [B, T]: 0, 1, 2... counted over real tokens, so a left-padded row starts at 0."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_params(config: DecoderConfig, rng: jax.Array) -> dict:
  """Random weights (normal 0.02, unit norms) in `config.param_dtype`. Use under `jax.eval_shape`
  to get the parameter shapes without allocating."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Decoder(config).init(rng, tokens, tokens, jnp.ones((1, 1), bool))["params"]


def forward(
  config: DecoderConfig,
  params: dict,
  tokens: jnp.ndarray,
  *,
  attention_mask: Optional[jnp.ndarray] = None,
  positions: Optional[jnp.ndarray] = None,
  lora=None,
  cache: Optional[Cache] = None,
  cache_index=0,
  cache_mask=None,
  dropout_rng: Optional[jax.Array] = None,
  lora_row_scale=None,
):
  """Runs the decoder.

  Args:
    tokens: int32 [B, T].
    attention_mask: bool/int [B, T], 1 for real tokens (default: all real).
    positions: int32 [B, T] RoPE positions (default: derived from `attention_mask`).
    lora: a `LoraAdapter` or None (base model).
    cache: optional (keys, values), shaped by `cache_shape`; tokens are written at slots
      `cache_index .. cache_index + T - 1` and attend to every valid earlier slot.
    cache_mask: bool [B, S], the valid slots *after* this write (required with a cache).
    dropout_rng: enables LoRA dropout (training mode) when given.
    lora_row_scale: optional float32 [B]: row r uses base + lora_row_scale[r] * adapter (0 = the
      base model), so policy and reference rows can share one pass over the weights.
  Returns:
    (hidden [B, T, D] in compute dtype, updated cache or None).
  """
  if attention_mask is None:
    attention_mask = jnp.ones(tokens.shape, bool)
  if positions is None:
    positions = positions_from_mask(attention_mask)
  key_mask = attention_mask if cache is None else cache_mask
  if key_mask is None:
    raise ValueError("forward() with a cache needs cache_mask [B, S]")
  variables, kw, rngs = _variables(params, lora, dropout_rng)
  return Decoder(config, **kw).apply(
    variables,
    tokens,
    positions,
    key_mask,
    cache,
    cache_index,
    rngs=rngs,
    lora_row_scale=lora_row_scale,
  )


def _variables(params, lora, dropout_rng):
  """(variables, Decoder kwargs, rngs) of one apply."""
  variables, kw = {"params": params}, {}
  if lora is not None:
    variables["lora"] = lora.params
    kw = dict(lora_scale=lora.scale, lora_dropout=lora.dropout, train=dropout_rng is not None)
  return variables, kw, ({"dropout": dropout_rng} if dropout_rng is not None else None)


def forward_with_prefix(
  config: DecoderConfig,
  params: dict,
  prefix_tokens: jnp.ndarray,
  prefix_mask: jnp.ndarray,
  tokens: jnp.ndarray,
  *,
  attention_mask: Optional[jnp.ndarray] = None,
  lora=None,
  dropout_rng: Optional[jax.Array] = None,
):
  """Runs G continuations of each of Q prompts, computing each prompt once.

  The result equals `forward` on the concatenated rows `[prefix_tokens[r // G], tokens[r]]`
  (restricted to the continuation), but the prompt's layers run on Q rows instead of Q * G and
  are differentiated once. This is the shape of a Markovian update: G sampled CoTs per question.
  With LoRA dropout on, the G rows share the prompt's dropout masks (each row's own tokens get
  their own masks).

  Args:
    prefix_tokens: int32 [Q, P], left-padded; prefix_mask: bool [Q, P] (each row non-empty).
    tokens: int32 [B, T] with B = Q * G, row r continuing prompt r // G.
    attention_mask: bool [B, T], real tokens of the continuations (default: all); padding may
      only follow real tokens.
    lora, dropout_rng: as in `forward`.
  Returns:
    (prefix hidden [Q, P, D], continuation hidden [B, T, D]), in the compute dtype.
  """
  nq, b = prefix_tokens.shape[0], tokens.shape[0]
  if prefix_mask.shape != prefix_tokens.shape or b % nq:
    raise ValueError(
      f"prefix {prefix_tokens.shape} / mask {prefix_mask.shape} must be [Q, P] "
      f"with Q dividing the {b} continuation rows"
    )
  if attention_mask is None:
    attention_mask = jnp.ones(tokens.shape, bool)
  rng_pre = rng_own = None
  if dropout_rng is not None:
    rng_pre, rng_own = jax.random.split(dropout_rng)
  variables, model_kw, rngs = _variables(params, lora, rng_pre)
  model = Decoder(config, **model_kw)
  prefix_mask = prefix_mask.astype(bool)
  hp, _, (pk, pv) = model.apply(
    variables,
    prefix_tokens,
    positions_from_mask(prefix_mask),
    prefix_mask,
    rngs=rngs,
    return_kv=True,
  )
  start = jnp.repeat(jnp.sum(prefix_mask, axis=-1, dtype=jnp.int32), b // nq)
  positions = start[:, None] + positions_from_mask(attention_mask)
  variables, model_kw, rngs = _variables(params, lora, rng_own)
  h, _ = Decoder(config, **model_kw).apply(
    variables, tokens, positions, attention_mask, prefix=(pk, pv, prefix_mask), rngs=rngs
  )
  return hp, h


def cache_shape(config: DecoderConfig, batch: int, slots: int):
  """(keys shape [L, B, Hkv, Dh, S], values shape [L, B, Hkv, S, Dh]) of a KV cache."""
  lead = (config.num_layers, batch, config.num_kv_heads)
  return lead + (config.head_dim, slots), lead + (slots, config.head_dim)


def head_weight(config: DecoderConfig, params: dict) -> jnp.ndarray:
  """[D, V] output projection (the transposed embedding when tied)."""
  if config.tie_word_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


MASKED_LOGIT = -1e9  # far below any real logit, yet finite: KL terms stay 0 * finite = 0


def project(config: DecoderConfig, params: dict, hidden: jnp.ndarray) -> jnp.ndarray:
  """float32 logits [..., V] from hidden states [..., D] (matmul in compute dtype, fp32
  accumulate); ids from `config.usable_vocab` on get MASKED_LOGIT."""
  w = head_weight(config, params).astype(config.dtype)
  out = jnp.dot(hidden.astype(config.dtype), w, preferred_element_type=jnp.float32)
  if config.usable_vocab is not None and config.usable_vocab < config.vocab_size:
    out = jnp.where(jnp.arange(config.vocab_size) < config.usable_vocab, out, MASKED_LOGIT)
  return out


def logits(
  config: DecoderConfig,
  params: dict,
  token_ids: jnp.ndarray,
  lora=None,
  *,
  attention_mask: Optional[jnp.ndarray] = None,
  positions: Optional[jnp.ndarray] = None,
) -> jnp.ndarray:
  """float32 [B, T, V] causal logits for int32 `token_ids` [B, T] (positions 0..T-1 by default)."""
  hidden, _ = forward(
    config,
    params,
    jnp.asarray(token_ids, jnp.int32),
    attention_mask=attention_mask,
    positions=positions,
    lora=lora,
  )
  return project(config, params, hidden)
