"""`config.model.attention`: which kernel runs self-attention, decided once at start-up.

  auto    on a GPU, a small preflight compiles and runs cuDNN's flash attention (forward and
          gradient, the model's heads and dtype) and compares it with XLA's; it passes: cuDNN
          where it can run (`DecoderConfig.attention_impl="auto"`), it fails at trace, lowering,
          compile or run time, or disagrees: XLA's attention, with the reason logged. Elsewhere:
          XLA's attention (the backend's default path), with the reason logged.
  cudnn   cuDNN's, after the same preflight; on a backend without it, or when the preflight
          fails, the run is refused (one line, exit 2).
  xla     XLA's attention (`jax.nn.dot_product_attention`'s XLA implementation on GPU; the
          backend's default path elsewhere, the einsum path on CPU).

The preflight exists because `decoder._dot_product_attention`'s own fallback catches only what
cuDNN refuses while tracing; a failure when XLA compiles the cuDNN call would otherwise end the
run at its first step.
"""

from __future__ import annotations

import time
from typing import Optional

from markovian_jax.models.config import DecoderConfig
from markovian_jax.runtime.errors import InvalidConfig

CHOICES = ("auto", "cudnn", "xla")
PREFLIGHT_ROWS, PREFLIGHT_LENGTH = 2, 128


def _gpu(backend: str) -> bool:
  return backend in ("gpu", "cuda", "rocm")


def preflight(
  config: DecoderConfig,
  rows: int = PREFLIGHT_ROWS,
  length: int = PREFLIGHT_LENGTH,
  kernel: str = "cudnn",
) -> Optional[str]:
  """None when `kernel`'s attention lowers, compiles and runs (forward, and the gradient of all
  three inputs) on [rows, length] of the model's heads in its compute dtype, and agrees with
  XLA's implementation; else the reason, naming the stage that failed."""
  import jax
  import jax.numpy as jnp

  from markovian_jax.models import decoder

  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  dtype = jnp.dtype(config.dtype)
  q = jax.random.normal(keys[0], (rows, length, config.num_heads, config.head_dim), dtype)
  k, v = (
    jax.random.normal(kk, (rows, length, config.num_kv_heads, config.head_dim), dtype)
    for kk in keys[1:]
  )
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (rows, length, length))

  def program(kernel):
    f = lambda q, k, v: decoder._dot_product_attention(kernel, q, k, v, mask)  # noqa: E731
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)  # noqa: E731
    return jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))

  stage = "trace"
  try:
    lowered = program(kernel).lower(q, k, v)
    stage = "compile"
    compiled = lowered.compile()
    stage = "run"
    out = jax.block_until_ready(compiled(q, k, v))
  except Exception as e:  # noqa: BLE001 - whatever the kernel raises, the run can use XLA's
    return f"{kernel} attention failed at {stage} time: {type(e).__name__}: {str(e)[:200]}"
  ref = program("xla")(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  for name, a, r in zip(("output", "dq", "dk", "dv"), jax.tree.leaves(out), jax.tree.leaves(ref)):
    scale = float(jnp.max(jnp.abs(f32(r)))) or 1.0
    # A few bf16 roundings of the scale; a wrong kernel (a dropped mask, wrong heads) is O(1).
    if float(jnp.max(jnp.abs(f32(a) - f32(r)))) > 0.05 * scale:
      return f"{kernel} attention disagrees with XLA's ({name} off by more than 5% of its scale)"
  return None


def check_backend(requested: str, backend: Optional[str] = None) -> None:
  """Raises InvalidConfig for `cudnn` on a backend without cuDNN (nothing is compiled)."""
  import jax

  backend = backend or jax.default_backend()
  if requested == "cudnn" and not _gpu(backend):
    raise InvalidConfig(
      f"config.model.attention: 'cudnn' needs a GPU, and JAX runs on {backend}; use 'auto' or 'xla'"
    )


def resolve(requested: str, config: DecoderConfig, backend: Optional[str] = None) -> tuple:
  """(DecoderConfig.attention_impl, what ran and why: one line for the log) for
  `config.model.attention=requested` on `backend` (default: JAX's). Raises InvalidConfig for
  `cudnn` where it cannot run."""
  import jax

  backend = backend or jax.default_backend()
  if requested not in CHOICES:
    raise InvalidConfig(f"config.model.attention: {requested!r} is not one of {list(CHOICES)}")
  xla = "dot_product" if _gpu(backend) else "auto"  # off GPU, "auto" never picks cuDNN
  if requested == "xla":
    return xla, "attention: xla (requested)"
  check_backend(requested, backend)
  if not _gpu(backend):
    return xla, f"attention: xla (auto: cuDNN attention is GPU only; JAX runs on {backend})"
  t = time.perf_counter()
  why = preflight(config)
  took = f"preflight {time.perf_counter() - t:.1f} s"
  if requested == "cudnn":
    if why:
      raise InvalidConfig(
        f"config.model.attention: 'cudnn' failed its preflight ({why}); use 'auto' or 'xla'"
      )
    return "cudnn", f"attention: cudnn (requested; {took} passed)"
  if why:
    return xla, f"attention: xla (auto: {why}; {took})"
  return "auto", f"attention: cudnn where it runs, else xla (auto: {took} passed)"
