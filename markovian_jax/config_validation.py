"""Checks a run config before anything is loaded or compiled; every message names the key."""

from __future__ import annotations

import ml_collections

from markovian_jax import sharding

TASKS = ("gsm8k", "svamp", "arc", "mmlu", "aqua", "mathqa", "arithmetic", "wiki_continuation")

HOST_ALLOCATORS = ("tcmalloc", "system")  # config.host_allocator (markovian_jax.host_allocator)

_CHOICES = {
    "host_allocator": HOST_ALLOCATORS,
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "lora.reference": ("base", "initial_adapter"),
    "prompt.format": ("plain", "chat"),
    "objective.kind": ("pg", "ppo"),
    "objective.kl_estimator": ("full", "k1", "k2", "k3"),
    "objective.logprob_reduction": ("mean", "sum"),
    "objective.reward_scorer": ("actor", "base"),
    "objective.reward_grad": ("none", "paper"),
    "objective.baseline": ("group", "ema", "none"),
    "objective.ppo_ratio_reference": ("behaviour", "base"),
    "objective.loss_aggregation": ("sequence_mean", "token_mean"),
    "optim.schedule": ("constant", "warmup_cosine"),
    "train.collapse_action": ("warn", "stop", "rollback"),
    "eval.reader": ("actor", "base"),
}

_POSITIVE_INTS = ("lora.rank", "sampling.cot_length", "sampling.prompt_bucket", "train.num_steps",
                  "train.questions_per_step", "train.group_size", "train.checkpoint_every",
                  "train.eval_every", "train.max_to_keep", "train.nan_patience",
                  "train.max_rollbacks",
                  "optim.accumulation_steps", "objective.ppo_epochs", "objective.ppo_minibatches",
                  "eval.num_examples", "eval.num_samples", "eval.answer_max_tokens",
                  "eval.batch_size", "data.arithmetic_terms", "data.arithmetic_max",
                  "data.question_length", "data.target_length")


class InvalidConfig(ValueError):
  pass


def _get(c, dotted):
  for part in dotted.split("."):
    c = c[part]
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises InvalidConfig naming the first offending key."""
  def bad(key, msg):
    raise InvalidConfig(f"config.{key}: {msg}")

  if c.task not in TASKS:
    bad("task", f"unknown task {c.task!r}; choose one of {list(TASKS)}")
  for key, choices in _CHOICES.items():
    if _get(c, key) not in choices:
      bad(key, f"{_get(c, key)!r} is not one of {list(choices)}")
  for key in _POSITIVE_INTS:
    v = _get(c, key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      bad(key, f"must be a positive integer, got {v!r}")
  if not c.model.path:
    bad("model.path", "is empty; give an HF directory, a .gguf file or a hub id")
  if c.sampling.temperature <= 0:
    bad("sampling.temperature", f"must be > 0 for policy-gradient sampling, got "
        f"{c.sampling.temperature}")
  if not 0 < c.sampling.top_p <= 1:
    bad("sampling.top_p", f"must be in (0, 1], got {c.sampling.top_p}")
  if c.sampling.top_k < 0:
    bad("sampling.top_k", f"must be >= 0 (0 = off), got {c.sampling.top_k}")
  if not 0 <= c.lora.dropout < 1:
    bad("lora.dropout", f"must be in [0, 1), got {c.lora.dropout}")
  if c.lora.reference == "initial_adapter" and not c.lora.init_from:
    bad("lora.reference", "'initial_adapter' needs lora.init_from (a PEFT adapter directory)")
  if c.objective.baseline == "group" and c.train.group_size < 2:
    bad("train.group_size", f"is {c.train.group_size}, but objective.baseline='group' needs at "
        "least 2 samples per question (the unbiased std is undefined for 1)")
  if c.objective.reward_grad == "paper" and c.train.group_size < 2:
    bad("train.group_size", "objective.reward_grad='paper' standardises r within each question's "
        "group, which needs at least 2 samples")
  if c.objective.kl_penalty < 0:
    bad("objective.kl_penalty", f"must be >= 0, got {c.objective.kl_penalty}")
  if not 0 < c.objective.ppo_eps < 1:
    bad("objective.ppo_eps", f"must be in (0, 1), got {c.objective.ppo_eps}")
  if not 0 <= c.objective.ema_decay < 1:
    bad("objective.ema_decay", f"must be in [0, 1), got {c.objective.ema_decay}")
  if c.objective.reward_grad == "paper" and c.objective.reward_scorer != "actor":
    bad("objective.reward_grad", "'paper' differentiates the actor's answer log-prob, so it needs "
        "objective.reward_scorer='actor'")
  n = c.train.questions_per_step * c.train.group_size
  if n % c.objective.ppo_minibatches:
    bad("objective.ppo_minibatches", f"{c.objective.ppo_minibatches} does not divide the "
        f"{n} samples per step")
  if c.optim.lr <= 0:
    bad("optim.lr", f"must be > 0, got {c.optim.lr}")
  if c.optim.grad_clip <= 0:
    bad("optim.grad_clip", f"must be > 0, got {c.optim.grad_clip}")
  try:
    shape = tuple(c.mesh.shape)
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
      raise ValueError(f"{shape}: use 3 positive sizes (data, fsdp, tensor), at most one -1")
  except (TypeError, ValueError) as e:
    bad("mesh.shape", str(e))


def mesh_shape(c: ml_collections.ConfigDict) -> tuple:
  """The configured mesh shape (a preset name wins over `mesh.shape`)."""
  if c.mesh.preset:
    if c.mesh.preset not in sharding.MESH_PRESETS:
      raise InvalidConfig(f"config.mesh.preset: unknown {c.mesh.preset!r}; "
                          f"choose one of {sorted(sharding.MESH_PRESETS)}")
    return sharding.MESH_PRESETS[c.mesh.preset]
  return tuple(c.mesh.shape)


def make_mesh(c: ml_collections.ConfigDict):
  return sharding.make_mesh(mesh_shape(c))
