"""The KV-cache sampler and the host-side padding that keeps its shapes few.

  sampler    generate / generate_with_reference: one prefill per distinct prompt, one fused
             decode loop; temperature, top-k, top-p in float32; tokens and sampling log-probs
  batching   left padding into static length buckets (few distinct jitted shapes)

Public contract: `markovian_jax.sampling.generate(config, params, prompt_ids, max_new_tokens=...,
temperature=0.0)` returns `.tokens` [B, N].

May import: runtime, models.
"""

from markovian_jax.sampling.sampler import (
  TOP_P_WINDOW,
  SampleOutput,
  check_settings,
  compile_count,
  generate,
  generate_with_reference,
)

__all__ = [
  "TOP_P_WINDOW",
  "SampleOutput",
  "check_settings",
  "compile_count",
  "generate",
  "generate_with_reference",
]
