"""The answer-likelihood methods as compositions of named pieces (docs/answer-likelihood.md).

METHODS maps a method to the pieces of objectives/answer_likelihood.py it composes and their
settings, plus who scores (`scorer`, `no_reasoning_scorer`: `actor` the current policy, `base` the
frozen initial model, `ema` an EMA-lagged policy copy) and `context`: `visible` (the scorer reads
the question, as the paper did) or `hidden` (the Markovian twin: the question is replaced by
<Redacted>). Every method is named `<method>` (its paper's context) and `<method>_markovian`.

One step, N = Q * G rows (question-major):

  s_i  = score(lp_i)        s0_q = score(no-reasoning lp_q)        (same token weights)
  R_i  = shaping(transform(base(s_i, s0_q)))                       (no gradient)
  A_i  = advantage(R)_i;  active_i = filter(R)_i;  v_i = answer_weight(R, l)_i
  loss = policy loss with A (loss_from_targets: pg | ppo, KL, entropy; CoT log-probs reduced by
         cot_reduction) - mean_{i active} sg(v_i) sum_t lp_it       (the answer term)

The step is split as markovian_loss is: `method_targets` once per step (no gradient; the filter's
EMA rides in BaselineState.filter_std, checkpointed) and `method_loss_from_targets` per
(mini)batch; `method_loss` composes them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from markovian_jax.objectives import answer_likelihood as al
from markovian_jax.objectives.baselines import BaselineState
from markovian_jax.objectives.config import ObjectiveConfig
from markovian_jax.objectives.inputs import LossInputs, Targets, require
from markovian_jax.objectives.reductions import f32, reduce_tokens
from markovian_jax.objectives.registry import check_choice
from markovian_jax.objectives.step import loss_from_targets

SCORERS = ("actor", "base", "ema")
CONTEXTS = ("visible", "hidden")
MARKOVIAN_SUFFIX = "_markovian"

# VR-CLI's step function of the % perplexity improvement: (threshold, reward), 0 below the first.
VRCLI_STEPS = ((0.05, 0.5), (1.0, 0.9), (2.0, 1.0))

# name -> the pieces and settings that differ from MethodConfig's defaults. `cot_reduction` is
# the CoT log-prob reduction of the policy term (sum: the sequence log-prob, as the papers that
# write log pi(z) train); `kl_penalty` None keeps the run's objective.kl_penalty.
METHODS: dict[str, dict] = {
  "verifree": dict(
    score="seq_prob", advantage="rloo", answer_weight="reward", cot_reduction="sum", kl_penalty=0.0
  ),
  "rlpr": dict(
    score="mean_token_prob",
    base="clipped_difference",
    no_reasoning_scorer="base",
    advantage="grpo",
    filter="std_ema",
    kl_penalty=0.0,
  ),
  "jepo": dict(
    score="logprob_sum", advantage="jepo_loo", answer_weight="group_softmax", cot_reduction="sum"
  ),
  "latro": dict(
    score="logprob_sum",
    shaping=("kl_to_reference",),
    advantage="rloo",
    answer_weight="constant",
    answer_weight_value=0.0,
    cot_reduction="sum",
    kl_penalty=0.0,
  ),
  "nover": dict(
    scorer="ema",
    score="perplexity",
    length_norm="log10",
    transform="group_rank",
    shaping=("efficiency",),
    advantage="center",
  ),
  "vrcli": dict(
    scorer="base",
    no_reasoning_scorer="base",
    score="perplexity",
    base="percent_improvement",
    transform="step",
    advantage="grpo",
  ),
  "dro": dict(
    token_weights="group_std",
    score="logprob_sum",
    base="difference",
    no_reasoning_scorer="actor",
    shaping=("length_penalty",),
    advantage="grpo",
  ),
}
METHOD_NAMES = tuple(name for m in METHODS for name in (m, m + MARKOVIAN_SUFFIX))


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """One answer-likelihood method: its pieces (answer_likelihood.py) and their settings.

  Frozen and hashable: a static argument under jit. Build it with `method_config(name)`.

  method / context: the METHODS key and `visible` | `hidden` (the `_markovian` twin).
  scorer / no_reasoning_scorer: who scores the answer after z_i / with no z (SCORERS; None: the
    method needs no no-reasoning score).
  token_weights, score, length_norm, base, transform, shaping (a tuple), advantage, filter,
    answer_weight: piece names (module docstring of answer_likelihood.py).
  answer_weight_value: VeriFree's factor on sg(R) (1), JEPO's beta_sup (1), LaTRO's weight (0 as
    its released code; 1 as its paper).
  kl_reward_coef: LaTRO's 0.05 on the sequence log-ratio folded into the reward.
  length_penalty: DRO's coefficient on K_i / K. efficiency_weight: NOVER's (1).
  step_levels: VR-CLI's ((threshold %, reward), ...). jepo_clip: the bound on JEPO's A / std.
  filter_ratio / filter_decay: RLPR's 0.5 x EMA(std) with decay 0.99.
  advantage_eps: added to group stds.
  cot_reduction / kl_penalty: the policy term's settings (objective below is built from them).
  objective: the ObjectiveConfig of the policy loss (kind, KL, entropy, PPO; reward_grad="none",
    normalize_reward=False: the answer term and base subtraction are the method's own).
  """

  method: str
  context: str = "visible"
  scorer: str = "actor"
  no_reasoning_scorer: Optional[str] = None
  token_weights: str = "uniform"
  score: str = "logprob_sum"
  length_norm: str = "none"
  base: str = "none"
  transform: str = "identity"
  shaping: tuple = ()
  advantage: str = "grpo"
  filter: str = "none"
  answer_weight: str = "none"
  answer_weight_value: float = 1.0
  kl_reward_coef: float = 0.05
  length_penalty: float = 0.0
  efficiency_weight: float = 1.0
  step_levels: tuple = VRCLI_STEPS
  jepo_clip: float = 1.0
  filter_ratio: float = 0.5
  filter_decay: float = 0.99
  advantage_eps: float = 1e-8
  cot_reduction: str = "mean"
  kl_penalty: Optional[float] = None
  objective: ObjectiveConfig = ObjectiveConfig()

  def __post_init__(self):
    check_choice("answer-likelihood method", self.method, METHODS)
    check_choice("context", self.context, CONTEXTS)
    check_choice("scorer", self.scorer, SCORERS)
    if self.no_reasoning_scorer is not None:
      check_choice("no_reasoning_scorer", self.no_reasoning_scorer, SCORERS)
    for family, name in (
      (al.TOKEN_WEIGHT_REGISTRY, self.token_weights),
      (al.SCORE_REGISTRY, self.score),
      (al.LENGTH_NORM_REGISTRY, self.length_norm),
      (al.BASE_REGISTRY, self.base),
      (al.TRANSFORM_REGISTRY, self.transform),
      (al.ADVANTAGE_REGISTRY, self.advantage),
      (al.FILTER_REGISTRY, self.filter),
      (al.ANSWER_WEIGHT_REGISTRY, self.answer_weight),
    ):
      family.lookup(name)
    if not isinstance(self.shaping, tuple):
      raise ValueError(f"MethodConfig.shaping must be a tuple of names, got {self.shaping!r}")
    for name in self.shaping:
      al.SHAPING_REGISTRY.lookup(name)
    needs_s0 = al.BASE_REGISTRY.meta[self.base]["needs_no_reasoning"]
    if needs_s0 != (self.no_reasoning_scorer is not None):
      raise ValueError(
        f"MethodConfig.no_reasoning_scorer: base={self.base!r} "
        f"{'needs' if needs_s0 else 'reads no'} no-reasoning score, got "
        f"{self.no_reasoning_scorer!r}"
      )
    for f in (
      "answer_weight_value",
      "kl_reward_coef",
      "length_penalty",
      "efficiency_weight",
      "jepo_clip",
      "filter_ratio",
      "filter_decay",
      "advantage_eps",
    ):
      v = getattr(self, f)
      if not (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
      ):
        raise ValueError(f"MethodConfig.{f}: must be a finite number >= 0, got {v!r}")
    if not self.filter_decay < 1:
      raise ValueError(f"MethodConfig.filter_decay: must be in [0, 1), got {self.filter_decay!r}")
    if self.objective.group_size < 2:
      raise ValueError(
        f"objective.group_size: the answer-likelihood methods compare a question's "
        f"CoTs and need >= 2 samples per question, got {self.objective.group_size}"
      )
    if self.objective.reward_grad != "none" or self.objective.normalize_reward:
      raise ValueError(
        "MethodConfig.objective: reward_grad must be 'none' and normalize_reward "
        "False (the method's answer term and base subtraction replace them); "
        "build it with method_config"
      )

  @property
  def group_size(self) -> int:
    return self.objective.group_size

  @property
  def markovian(self) -> bool:
    return self.context == "hidden"

  @property
  def name(self) -> str:
    return self.method + (MARKOVIAN_SUFFIX if self.markovian else "")

  @property
  def needs_no_reasoning(self) -> bool:
    return self.no_reasoning_scorer is not None

  @property
  def has_answer_term(self) -> bool:
    """Static: the loss has an answer term (the answer log-probs need the policy's gradient)."""
    if al.ANSWER_WEIGHT_REGISTRY[self.answer_weight] is None:
      return False
    # LaTRO at its released weight 0: the term is identically 0, so skip its backward pass.
    return not (self.answer_weight == "constant" and self.answer_weight_value == 0)


def split_name(name: str) -> tuple[str, str]:
  """'<method>' or '<method>_markovian' -> (method, context); one-line ValueError listing the
  known names otherwise."""
  if name in METHODS:
    return name, "visible"
  if name.endswith(MARKOVIAN_SUFFIX) and name[: -len(MARKOVIAN_SUFFIX)] in METHODS:
    return name[: -len(MARKOVIAN_SUFFIX)], "hidden"
  raise ValueError(f"unknown answer-likelihood method {name!r}; choose one of {list(METHOD_NAMES)}")


def method_config(
  name: str, objective: Optional[ObjectiveConfig] = None, **overrides
) -> MethodConfig:
  """The MethodConfig of `name` (METHODS, with or without `_markovian`), its pieces overridden
  by `overrides` (e.g. answer_weight_value=1.0 for LaTRO as its paper); `objective` supplies
  the policy loss's other settings (kind, KL estimator, entropy, group_size ...)."""
  method, context = split_name(name)
  fields = {**METHODS[method], **overrides, "method": method, "context": context}
  objective = objective or ObjectiveConfig()
  policy = dict(
    logprob_reduction=fields.get("cot_reduction", "mean"),
    reward_grad="none",
    actor_reward_weight=1.0,
    normalize_reward=False,
  )
  if fields.get("kl_penalty") is not None:
    policy["kl_penalty"] = fields["kl_penalty"]
  return MethodConfig(**fields, objective=dataclasses.replace(objective, **policy))


@functools.lru_cache(maxsize=None)
def method_of(objective: ObjectiveConfig) -> Optional[MethodConfig]:
  """The MethodConfig that `objective.method` names, with `objective`'s other settings as its
  policy loss; None for the Markovian objective (method ""). Static: call it at trace time."""
  if not objective.method:
    return None
  overrides = {}
  if objective.method_answer_weight >= 0:
    overrides["answer_weight_value"] = float(objective.method_answer_weight)
  if objective.method_length_penalty >= 0:
    overrides["length_penalty"] = float(objective.method_length_penalty)
  return method_config(objective.method, dataclasses.replace(objective, method=""), **overrides)


# ----------------------------------------------------------------------------- the step


class MethodTargets(NamedTuple):
  """Per-row constants of one step (float32 [N] / bool [N]): advantages A, active rows, answer
  weights v (zeros when the method has no answer term)."""

  advantages: jax.Array
  active: jax.Array
  answer_weight: jax.Array

  def targets(self) -> Targets:
    n = self.advantages.shape
    return Targets(
      self.advantages, self.active, jnp.zeros(n, jnp.float32), jnp.ones(n, jnp.float32)
    )


def method_rewards(inputs: LossInputs, cfg: MethodConfig) -> tuple[jax.Array, jax.Array, dict]:
  """(s [N], R [N], metrics): the raw score and the final reward of every row, no gradient.

  Reads inputs.answer_logprobs / answer_mask [N, A] (the scorer's), cot_mask [N, K] (lengths),
  no_reasoning_logprobs / no_reasoning_mask [Q or N, A] when the base needs them, ref_logprobs
  [N, K] for kl_to_reference.
  """
  g = cfg.group_size
  lp = jax.lax.stop_gradient(f32(inputs.answer_logprobs))
  valid = jnp.asarray(inputs.answer_mask).astype(bool)
  n = lp.shape[0]
  if n % g:
    raise ValueError(f"{n} samples do not split into groups of {g}")
  w_q = al.TOKEN_WEIGHT_REGISTRY.lookup(cfg.token_weights)(jnp.where(valid, lp, 0.0), valid, g)
  w = al.per_sample(w_q, n, g)
  lengths = al.cot_lengths(inputs.cot_mask)
  s = al.answer_scores(lp, valid, w, lengths, cfg)
  metrics = {
    "score_mean": jnp.mean(s),
    "cot_length_mean": jnp.mean(lengths),
    "answer_logprob_mean": jnp.mean(reduce_tokens(lp, valid, "mean")),
  }
  s0 = None
  if cfg.needs_no_reasoning:
    require(inputs, "no_reasoning_logprobs", f"base={cfg.base!r} ({cfg.method})")
    lp0 = al.per_sample(jax.lax.stop_gradient(f32(inputs.no_reasoning_logprobs)), n, g)
    v0 = al.per_sample(jnp.asarray(inputs.no_reasoning_mask).astype(bool), n, g)
    if lp0.shape[1] != lp.shape[1]:
      raise ValueError(
        f"no_reasoning_logprobs has {lp0.shape[1]} answer columns, answer_logprobs {lp.shape[1]}"
      )
    s0 = al.answer_scores(lp0, v0, w, jnp.zeros((n,), jnp.float32), cfg)
    metrics["no_reasoning_score_mean"] = jnp.mean(s0)
  r = al.TRANSFORM_REGISTRY.lookup(cfg.transform)(
    al.BASE_REGISTRY.lookup(cfg.base)(s, s0, cfg), cfg
  )
  for name in cfg.shaping:
    for field in al.SHAPING_REGISTRY.meta[name]["needs"]:
      require(inputs, field, f"shaping {name!r} ({cfg.method})")
    r = r + al.SHAPING_REGISTRY.lookup(name)(s, inputs, cfg)
  metrics["reward_mean"] = jnp.mean(r)
  return s, r, metrics


def method_targets(
  inputs: LossInputs, cfg: MethodConfig, state: Optional[BaselineState] = None
) -> tuple[MethodTargets, BaselineState, dict]:
  """Rewards, advantages, the filter's mask and the answer weights of one step (no gradient).

  Returns (MethodTargets, the BaselineState after this step, float32 scalar metrics)."""
  state = BaselineState.init() if state is None else state
  s, r, metrics = method_rewards(inputs, cfg)
  adv = al.ADVANTAGE_REGISTRY.lookup(cfg.advantage)(r, cfg)
  active, filter_state, filter_metrics = al.FILTER_REGISTRY.lookup(cfg.filter)(
    r, state.filter_std, cfg
  )
  metrics.update(filter_metrics)
  weight_fn = al.ANSWER_WEIGHT_REGISTRY.lookup(cfg.answer_weight)
  if weight_fn is None:
    v = jnp.zeros_like(r)
  else:
    lsum = reduce_tokens(
      jax.lax.stop_gradient(f32(inputs.answer_logprobs)), inputs.answer_mask, "sum"
    )
    v = weight_fn(r, lsum, cfg)
  metrics.update(
    advantage_mean=jnp.mean(adv),
    advantage_std=jnp.std(adv),
    advantage_min=jnp.min(adv),
    advantage_max=jnp.max(adv),
  )
  del s
  return (
    MethodTargets(jax.lax.stop_gradient(adv), active, jax.lax.stop_gradient(v)),
    state._replace(filter_std=filter_state),
    metrics,
  )


def method_loss_from_targets(
  inputs: LossInputs, targets: MethodTargets, cfg: MethodConfig
) -> tuple[jax.Array, dict]:
  """(float32 scalar loss, metrics): the policy loss of cfg.objective with the method's
  advantages, plus the answer term when the method has one (differentiable through
  inputs.answer_logprobs, which must then come from the policy with gradient)."""
  loss, metrics = loss_from_targets(inputs, targets.targets(), cfg.objective)
  if cfg.has_answer_term:
    term = al.answer_term(
      inputs.answer_logprobs, inputs.answer_mask, targets.answer_weight, targets.active
    )
    metrics["answer_loss"] = term
    loss = loss + term
    metrics["loss"] = loss
  return loss, metrics


def method_loss(
  inputs: LossInputs, cfg: MethodConfig, state: Optional[BaselineState] = None
) -> tuple[jax.Array, tuple[dict, BaselineState]]:
  """The whole step for `jax.value_and_grad(..., has_aux=True)`: (loss, (metrics, new state))."""
  targets, new_state, metrics = method_targets(inputs, cfg, state)
  loss, loss_metrics = method_loss_from_targets(inputs, targets, cfg)
  return loss, ({**metrics, **loss_metrics}, new_state)
