"""The per-token KL(pi || ref) term: exact (`full`) or a sample-based estimator.

`full` reads LossInputs.kl, the exact sum_v p_v (log p_v - log q_v) at each position computed
during the teacher-forced pass (`markovian_jax.models.logprobs.full_kl`): its gradient is the exact
gradient of the KL, with no sampling noise. The sampled estimators (Schulman's k1/k2/k3) use only
the log-probs of the sampled tokens. With x ~ pi and d = log pi(x) - log ref(x):

  k1 = d                       unbiased for KL, high variance, negative on some tokens.
  k2 = d^2 / 2                 biased (tight only when pi ~ ref), low variance, >= 0.
  k3 = exp(-d) - (-d) - 1      unbiased (E[ref/pi] = 1) and >= 0 everywhere (x - 1 >= log x).

As *loss terms* they differ from their values: the pathwise gradient of k1 has zero mean under pi
(E[grad log pi] = 0) so k1 penalises nothing in expectation; E[grad k2] = grad KL(pi || ref)
exactly (on-policy); E[grad k3] = grad KL(ref || pi), the reverse KL. `full` has none of these
caveats and is the default. The samples must come from pi at the same temperature as the log-probs
(true for PG and the first PPO pass; approximately after PPO updates).

A sampled estimator is a function of d ([N, K] float32) registered with
`@SAMPLED_KL_REGISTRY.register(name)`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from markovian_jax.objectives.inputs import LossInputs, require
from markovian_jax.objectives.reductions import f32
from markovian_jax.objectives.registry import Registry

SAMPLED_KL_REGISTRY = Registry("sampled KL estimator")


@SAMPLED_KL_REGISTRY.register("k1")
def _k1(d: jax.Array) -> jax.Array:
  return d


@SAMPLED_KL_REGISTRY.register("k2")
def _k2(d: jax.Array) -> jax.Array:
  return 0.5 * jnp.square(d)


@SAMPLED_KL_REGISTRY.register("k3")
def _k3(d: jax.Array) -> jax.Array:
  return jnp.exp(-d) + d - 1.0


SAMPLED_KL_ESTIMATORS = tuple(SAMPLED_KL_REGISTRY)
KL_ESTIMATORS = ("full",) + SAMPLED_KL_ESTIMATORS


def kl_estimate(
  logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k3", clamp: Optional[float] = 20.0
) -> jax.Array:
  """A sampled per-token KL(pi || ref) estimate at the sampled tokens (module docstring).

  `clamp` bounds |d| before the estimator: k3 has exp(-d), which overflows float32 for d < -88
  (a sampled token the reference finds far likelier than pi does), and a single outlier token would
  otherwise dominate the batch's penalty and gradient. None: no clamp.

  Args:
    logprobs: [N, K] float per-token log-probs of the sampled tokens under pi (with grad).
    ref_logprobs: [N, K] float the same under the reference (never differentiated).
    estimator: a SAMPLED_KL_ESTIMATORS name.
    clamp: bound on |d|.

  Returns:
    float32 [N, K].
  """
  fn = SAMPLED_KL_REGISTRY.lookup(estimator)
  d = f32(logprobs) - jax.lax.stop_gradient(f32(ref_logprobs))
  if clamp is not None:
    d = jnp.clip(d, -clamp, clamp)
  return fn(d)


def kl_per_token(inputs: LossInputs, cfg) -> Optional[jax.Array]:
  """float32 [N, K] KL(pi || ref) per CoT token for `cfg.kl_estimator`, or None when the inputs
  do not allow it and the penalty does not need it (kl_penalty = 0: then it is only a metric)."""
  if cfg.kl_estimator == "full":
    if cfg.kl_penalty > 0:
      require(inputs, "kl", "kl_estimator='full' with kl_penalty > 0")
    return None if inputs.kl is None else f32(inputs.kl)
  if inputs.ref_logprobs is None and cfg.kl_penalty == 0:
    return None
  require(inputs, "ref_logprobs", f"kl_estimator={cfg.kl_estimator!r}")
  return kl_estimate(inputs.cot_logprobs, inputs.ref_logprobs, cfg.kl_estimator, cfg.kl_clamp)
