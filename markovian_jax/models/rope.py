"""Rotary position embeddings in HF's rotate-half layout, with optional llama3 or longrope scaling.

The rotate-half layout (first half of each head paired with the second half) is what HF Llama
safetensors are trained with, so q/k weights load without the interleaved-layout permutation.
Frequencies are computed from the config's theta (never a hard-coded constant).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from markovian_jax.models.config import DecoderConfig, LongRopeScaling


def inverse_frequencies(config: DecoderConfig, long: bool = False) -> np.ndarray:
  """float64 [head_dim // 2]: per-pair rotation frequencies, llama3-scaled when configured; with
  longrope, divided by the short factors (or, with `long`, the long ones)."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  s = config.rope_scaling
  if s is None:
    return inv_freq
  if isinstance(s, LongRopeScaling):
    return inv_freq / np.asarray(s.long_factor if long else s.short_factor, np.float64)
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths (beyond the original context) are slowed by `factor`; short ones are kept;
  # the band in between is interpolated smoothly in 1/wavelength.
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled)


def rope_tables(config: DecoderConfig, positions: jnp.ndarray):
  """cos, sin: float32 [B, T, head_dim] for int32 positions [B, T].

  longrope picks its long factors when any position of the call is past the original context
  (as transformers does, per forward call) and scales cos and sin by its attention factor."""
  inv_freq = jnp.asarray(inverse_frequencies(config), jnp.float32)
  s = config.rope_scaling
  if isinstance(s, LongRopeScaling):
    use_long = jnp.max(positions) + 1 > s.original_max_position_embeddings
    inv_freq = jnp.where(
      use_long, jnp.asarray(inverse_frequencies(config, long=True), jnp.float32), inv_freq
    )
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  if isinstance(s, LongRopeScaling):
    return jnp.cos(angles) * s.attention_factor, jnp.sin(angles) * s.attention_factor
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """x: [B, T, H, Dh] (any float dtype); cos/sin: float32 [B, T, Dh]. Rotation done in fp32."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)
