"""Every knob of a Markovian training run, with the reference defaults (docs/method.md).

`get_config(task)` builds the ConfigDict from configs/schema.py, which types, defaults and
describes each key once (`python -m markovian_jax.training.config_reference` lists them). Task
files call `base.task_config(task, arg)` and override what differs. Any key can be overridden on
the command line: `--config.objective.kl_penalty=0.05`. Unknown keys fail (ConfigDict is locked).

Named variants (the columns of the paper's results table) are chosen after the file name:
`--config=configs/gsm8k.py:ei` (VARIANTS below; `python -m markovian_jax.report` groups runs by
them). A task file's own options join with commas: `configs/wiki_continuation.py:markovian,t1.5`.
"""

import ml_collections

from markovian_jax.configs import schema
from markovian_jax.runtime.errors import InvalidConfig


def get_config(task: str = "gsm8k") -> ml_collections.ConfigDict:
  """Every key of a `task` run at its default: `schema.build`, from the typed sections in
  configs/schema.py, where each default and its description are written once."""
  return schema.build(task)


def with_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """`c` on hardware preset `preset`, with the smallest questions_per_step whose Q x G rows split
  over its data x fsdp devices (G stays the task's; presets.py lists the batches)."""
  from markovian_jax.runtime import presets

  if preset not in presets.PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets.PRESETS)}")
  c.mesh.preset = preset
  p = presets.PRESETS[preset]
  if p.devices:
    c.train.questions_per_step = presets.questions_for(p.mesh, c.train.group_size)
  return c


# ----------------------------------------------------------------------------- named variants
# The columns of the paper's results table, as changes to a task's defaults. The defaults are the
# "Markovian" column (the reference code's algorithm). Each entry: (what the
# column is, the keys it sets). A value may be a function of the task's config.


def _non_parallel(c):
  # The reference's non-parallel mode: a batch of G different questions, one CoT each.
  return {
    "train.questions_per_step": c.train.group_size * c.train.questions_per_step,
    "train.group_size": 1,
  }


VARIANTS = {
  "markovian": (
    "the defaults: the question hidden from the reader (<Redacted>), group "
    "baseline, reward scored by the actor",
    {},
  ),
  "non_markovian": ("the reader sees the question as well as the CoT", {"prompt.markovian": False}),
  "no_reward_grad": (
    "the reference's actor_reward_weight=0 run: the frozen base model scores "
    "the reward and reads the answer in evaluation (the reference's reward "
    "gradient was zero either way)",
    {"objective.reward_scorer": "base", "eval.reader": "base"},
  ),
  "unnormalised": (
    "no CoT' baseline subtracted from the reward (gradient-identical to "
    "markovian under the group baseline: a measure of seed noise)",
    {"objective.normalize_reward": False},
  ),
  "ema": (
    "the reference's non-parallel mode: G different questions a step, one CoT each, "
    "advantage = R - exponentially weighted mean of past rewards (decay 0.9 per example)",
    {"objective.baseline": "ema", "_": _non_parallel},
  ),
  "ei": (
    "expert iteration: only CoTs whose R exceeds the mean + 1 std of past rewards are "
    "trained on, nothing in the first 25 steps",
    {"objective.ei_std": 1.0},
  ),
  "paper_reward_grad": (
    "the paper's objective: the reward's gradient through the actor's answer log-prob, weight 1",
    {"objective.reward_grad": "paper", "objective.actor_reward_weight": 1.0},
  ),
  "ppo_base": (
    "the reference's PPO, for reproduction: a per-sequence ratio to the frozen base "
    "model, clipped at 1 +- 0.2, replacing the KL term (it collapsed there)",
    {"objective.kind": "ppo", "objective.ppo_ratio_reference": "base"},
  ),
}
# The answer-likelihood family (docs/answer-likelihood.md): each method as its paper ran it (the
# scorer sees the question) and its Markovian twin (it does not). Value: the reward scorer of the
# method's objectives.METHODS entry in objective.reward_scorer terms ("ema": NOVER's EMA-lagged
# adapter copy, objective.scorer_ema_*; tests/training/test_answer_likelihood_wiring.py holds the
# two tables equal).
ANSWER_LIKELIHOOD_SCORERS = {
  "verifree": "actor",
  "rlpr": "actor",
  "jepo": "actor",
  "latro": "actor",
  "nover": "ema",
  "vrcli": "base",
  "dro": "actor",
}


def _answer_likelihood_variant(method: str, markovian: bool):
  name = method + ("_markovian" if markovian else "")
  shown = "hidden from" if markovian else "shown to"
  return (
    f"answer-likelihood method {method} (docs/answer-likelihood.md), the question {shown} "
    f"its scorer and the reader",
    {
      "objective.method": name,
      "prompt.markovian": markovian,
      "objective.normalize_reward": False,
      "objective.reward_scorer": ANSWER_LIKELIHOOD_SCORERS[method],
    },
  )


for _method in ANSWER_LIKELIHOOD_SCORERS:
  for _markovian in (False, True):
    VARIANTS[_method + ("_markovian" if _markovian else "")] = _answer_likelihood_variant(
      _method, _markovian
    )
del _method, _markovian

# The paper's results-table columns in its order (after the base model's column).
TABLE_VARIANTS = ("ei", "no_reward_grad", "unnormalised", "ema", "markovian", "non_markovian")


def _set(c, key: str, value) -> None:
  section, _, leaf = key.rpartition(".")
  (c[section] if section else c)[leaf] = value


def apply_variant(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`c` changed into variant `name` (VARIANTS) and recorded as `c.variant`; raises
  InvalidConfig naming the choices for an unknown name."""
  if name not in VARIANTS:
    raise InvalidConfig(f"config variant {name!r} is unknown; choose one of {list(VARIANTS)}")
  for key, value in VARIANTS[name][1].items():
    changes = value(c) if callable(value) else {key: value}
    for k, v in changes.items():
      _set(c, k, v)
  c.variant = name
  return c


def task_config(task: str, arg: str = "", options: dict | None = None) -> ml_collections.ConfigDict:
  """The config of `task` with the `:arg` of `--config=FILE:arg` applied (`apply_arg`)."""
  return apply_arg(get_config(task), arg, options)


def apply_arg(
  c: ml_collections.ConfigDict, arg: str = "", options: dict | None = None
) -> ml_collections.ConfigDict:
  """`c` with the `:arg` of `--config=FILE:arg` applied: comma-separated names, each a VARIANTS
  name (at most one) or one of the config file's `options` ({name: fn(c)}, applied in place)."""
  task = c.task
  options = options or {}
  names = [n.strip() for n in (arg or "").split(",") if n.strip()]
  variants = [n for n in names if n in VARIANTS]
  if len(variants) > 1:
    raise InvalidConfig(f"config variants {variants}: choose one per run")
  for n in names:
    if n in VARIANTS:
      apply_variant(c, n)
    elif n in options:
      options[n](c)
    else:
      extra = f"; the {task} config's options: {', '.join(options)}" if options else ""
      raise InvalidConfig(f"{n!r} is not a known variant (variants: {', '.join(VARIANTS)}{extra})")
  return c
