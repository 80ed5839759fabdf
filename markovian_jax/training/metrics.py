"""Host-side diagnostics of a step's samples (collapse signals) and throughput accounting."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

# Dense (no sparsity) bf16 peak FLOP/s per chip, by jax device_kind prefix.
PEAK_FLOPS = {
  "NVIDIA H100": 989.4e12,
  "NVIDIA H200": 989.4e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6": 918e12,
}


def repetition_rate(tokens: np.ndarray, n: int = 3) -> float:
  """Mean over rows of 1 - distinct n-grams / n-grams; ~0 for varied text, -> 1 for "4444...".

  tokens: int [N, K].
  """
  rates = []
  for row in np.asarray(tokens):
    grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
    if grams:
      rates.append(1.0 - len(set(grams)) / len(grams))
  return float(np.mean(rates)) if rates else 0.0


def contains_answer(cot_texts: Sequence[str], answers: Sequence[str]) -> float:
  """Fraction of CoTs whose text contains the gold answer string (the reference's metric)."""
  hits = [a.strip() != "" and a.strip() in t for t, a in zip(cot_texts, answers)]
  return float(np.mean(hits)) if hits else 0.0


def device_peak_flops() -> Optional[float]:
  kind = jax.devices()[0].device_kind
  for prefix, peak in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return peak * jax.device_count()
  return None


def step_flops(num_params: int, forward_tokens: int, train_tokens: int, remat: bool) -> float:
  """Model FLOPs of a step: 2N per forward token; a LoRA backward adds ~2N (activation grads,
  no base weight grads), remat another forward."""
  return 2.0 * num_params * forward_tokens + (6.0 if remat else 4.0) * num_params * train_tokens
