"""The LoRA optimizer: clip_by_global_norm -> AdamW, with a learning-rate schedule in steps.

A training step can make several optimizer updates (PPO: epochs x minibatches) or none (expert
iteration with no sample above its threshold). A schedule over optax's update count would then
reach its end after a fraction of the run, so the learning rate is a hyperparameter injected into
the optimizer state (`optax.inject_hyperparams`) and set from the training step before each update:
every update of step s uses `learning_rate(spec, num_steps, s)`, and that is the value logged.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "warmup_cosine")  # config.optim.schedule


def schedule(optim, num_steps: int) -> optax.Schedule:
  """The learning rate as a function of the training step (`optim`: an OptimSpec)."""
  if optim.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, optim.lr, max(optim.warmup_steps, 1), max(num_steps, optim.warmup_steps + 1)
    )
  if optim.warmup_steps > 0:
    return optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)
  return optax.constant_schedule(optim.lr)


def learning_rate(optim, num_steps: int, step: int) -> float:
  """The learning rate of every update made in training step `step` (0-based)."""
  return float(schedule(optim, num_steps)(step))


def make_optimizer(optim) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW whose learning rate lives in the state (`set_learning_rate`).

  `optim.accumulation_steps > 1` wraps it in optax.MultiSteps (gradients averaged over that many
  update calls, one AdamW step at the end).
  """
  adamw = optax.inject_hyperparams(optax.adamw)(
    learning_rate=optim.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
  )
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
  if optim.accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.accumulation_steps)
  return tx


def set_learning_rate(opt_state, lr):
  """`opt_state` with its injected learning rate replaced by `lr` (float32 scalar; jit-safe)."""
  return optax.tree_utils.tree_set(opt_state, learning_rate=jnp.asarray(lr, jnp.float32))


def applied_learning_rate(opt_state):
  """The learning rate the last update used, read back from the state."""
  return optax.tree_utils.tree_get(opt_state, "learning_rate")
