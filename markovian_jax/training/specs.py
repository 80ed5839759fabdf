"""Typed, frozen views of a run config: each section read once and validated.

    configs/schema.py             each key's type, default and description, written once
      -> base.get_config(task)    the ConfigDict built from them (+ configs/*.py, --config.x.y)
      -> RunSpec.read(config)       one spec per section; each checks its own keys
      -> config_validation.validate  the rules that span sections

Each section spec here is its configs/schema.py section (the fields, with their defaults) plus
the checks, which live here because their choice lists come from the packages above configs.

Every error is an `InvalidConfig` whose message starts with the key (`config.lora.targets: ...`).
The choice lists come from the modules that implement them (tasks from `data.tasks`, objective
variants from `objectives`' registries, remat modes from `models.config`, ...), never restated here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

from markovian_jax import objectives as obj
from markovian_jax.configs import schema
from markovian_jax.configs.base import VARIANTS
from markovian_jax.data import tasks as tasks_lib
from markovian_jax.data.mcq_tasks import MMLU_HUB_SPLITS
from markovian_jax.data.prompts import AUTO_FORMAT, PROMPT_FORMATS
from markovian_jax.models import lora as lora_lib
from markovian_jax.models.attention_choice import CHOICES as ATTENTION_CHOICES
from markovian_jax.models.config import DTYPES, REMAT_MODES
from markovian_jax.runtime import host_allocator, sharding
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.training import guards, optimizer

LORA_REFERENCES = ("base", "initial_adapter")  # what the KL / baseline reference model is
SCORERS = ("actor", "base")  # who reads the answer in evaluation; who may score the reward
# Who scores the reward: SCORERS, or "ema", the EMA-lagged adapter copy that only a method whose
# scorer is "ema" (NOVER) keeps (objective.scorer_ema_decay, scorer_ema_every).
REWARD_SCORERS = SCORERS + ("ema",)


def _bad(key: str, msg: str):
  raise InvalidConfig(f"config.{key}: {msg}")


class _Section:
  """Reading and checking helpers shared by the section specs."""

  SECTION = ""

  @classmethod
  def read(cls, section) -> "_Section":
    names = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(section.keys()) - names) if section is not None else []
    if extra:
      _bad(f"{cls.SECTION}.{extra[0]}", f"unknown key; {cls.SECTION} has {sorted(names)}")
    values = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}
    for k, v in values.items():
      if isinstance(v, list):
        values[k] = tuple(v)
    return cls(**values)

  def _key(self, name: str) -> str:
    return f"{self.SECTION}.{name}"

  def choice(self, name: str, choices: Sequence[str]):
    v = getattr(self, name)
    if v not in choices:
      _bad(self._key(name), f"{v!r} is not one of {list(choices)}")

  def positive_int(self, *names: str):
    for name in names:
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        _bad(self._key(name), f"must be a positive integer, got {v!r}")

  def number(
    self,
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
  ):
    v = getattr(self, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
      lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
      _bad(self._key(name), f"must be a finite number in {lo}{low}, {high}{hi}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ModelSpec(schema.Model, _Section):
  SECTION = "model"

  def __post_init__(self):
    if not self.path:
      _bad("model.path", "is empty; give an HF directory, a .gguf file, a hub id or random:<name>")
    self.choice("dtype", DTYPES)
    self.choice("remat", REMAT_MODES)
    self.choice("attention", ATTENTION_CHOICES)


@dataclasses.dataclass(frozen=True)
class LoraSpec(schema.Lora, _Section):
  SECTION = "lora"

  def __post_init__(self):
    self.positive_int("rank")
    self.number("alpha", 0.0, low_open=True)
    self.number("dropout", 0.0, 1.0, high_open=True)
    unknown = [t for t in self.targets if t not in lora_lib.ALL_LINEAR]
    if unknown or not self.targets:
      _bad(
        "lora.targets",
        f"{list(self.targets)}: choose a non-empty subset of {list(lora_lib.ALL_LINEAR)}",
      )
    self.choice("reference", LORA_REFERENCES)
    if self.reference == "initial_adapter" and not self.init_from:
      _bad("lora.reference", "'initial_adapter' needs lora.init_from (a PEFT adapter directory)")


@dataclasses.dataclass(frozen=True)
class DataSpec(schema.Data, _Section):
  SECTION = "data"

  def __post_init__(self):
    self.positive_int("arithmetic_terms", "arithmetic_max", "question_length", "target_length")
    allowed = [s for s in MMLU_HUB_SPLITS if s != "test"]
    if not self.mmlu_train_splits or any(s not in allowed for s in self.mmlu_train_splits):
      _bad(
        "data.mmlu_train_splits",
        f"{list(self.mmlu_train_splits)}: choose a non-empty subset of {allowed}",
      )

  def task_options(self, task: str, tokenizer=None) -> dict:
    """`data.load_task` options for `task` from this section."""
    if task == "arc":
      return {"subset": self.arc_subset}
    if task == "mmlu":
      return {"subject": self.mmlu_subject or None, "train_splits": self.mmlu_train_splits}
    if task == "arithmetic":
      return {"num_terms": self.arithmetic_terms, "max_value": self.arithmetic_max}
    if task == "wiki_continuation":
      return {
        "tokenizer": tokenizer,
        "question_length": self.question_length,
        "target_length": self.target_length,
      }
    return {}


@dataclasses.dataclass(frozen=True)
class PromptSpec(schema.Prompt, _Section):
  """`format` "auto" (AUTO_FORMAT) is resolved to the model family's by
  config_validation.validate."""

  SECTION = "prompt"

  def __post_init__(self):
    self.choice("format", (AUTO_FORMAT,) + PROMPT_FORMATS)


@dataclasses.dataclass(frozen=True)
class SamplingSpec(schema.Sampling, _Section):
  SECTION = "sampling"

  def __post_init__(self):
    self.positive_int("cot_length", "prompt_bucket")
    self.number("temperature", 0.0, low_open=True)
    self.number("top_p", 0.0, 1.0, low_open=True)
    if not isinstance(self.top_k, int) or self.top_k < 0:
      _bad("sampling.top_k", f"must be >= 0 (0 = off), got {self.top_k!r}")


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec(_Section):
  """The objective section: the loss settings (`loss`, an objectives.ObjectiveConfig, which
  validates itself) and what the training step does around them. Its keys and their defaults are
  configs/schema.py's `Objective`: the ones `loss` does not hold are fields here."""

  SECTION = "objective"
  loss: Any = None
  reward_scorer: str = schema.same(schema.Objective, "reward_scorer")
  ppo_epochs: int = schema.same(schema.Objective, "ppo_epochs")
  ppo_minibatches: int = schema.same(schema.Objective, "ppo_minibatches")

  @classmethod
  def read(cls, section, group_size: int = 12) -> "ObjectiveSpec":
    own = {f.name for f in dataclasses.fields(cls)} - {"loss"}
    loss_fields = {f.name for f in dataclasses.fields(obj.ObjectiveConfig)}
    # A key the section lacks (a run recorded before the key existed) takes the schema's default.
    kw = {f.name: f.default for f in dataclasses.fields(schema.Objective) if f.name in loss_fields}
    for key in section.keys():
      if key in own:
        continue
      if key not in loss_fields and key != "ei_std":
        _bad(f"objective.{key}", f"unknown key; objective has {sorted(own | loss_fields)}")
      kw[key] = section[key]
    if "ei_std" in kw:  # < 0 means off in the config file
      kw["ei_std"] = None if kw["ei_std"] < 0 else float(kw["ei_std"])
    try:
      loss = obj.ObjectiveConfig(group_size=int(group_size), **kw)
    except ValueError as e:
      # ObjectiveConfig names the field in its message; point at the config key that sets it.
      msg = str(e)
      named = sorted((f for f in loss_fields if f in msg), key=len, reverse=True)
      field = named[0] if named else ""
      key = (
        "train.group_size"
        if field == "group_size"
        else f"objective.{field}"
        if field
        else "objective"
      )
      raise InvalidConfig(f"config.{key}: {msg}") from e
    return cls(loss=loss, **{k: section[k] for k in own if k in section})

  def __post_init__(self):
    self.choice("reward_scorer", REWARD_SCORERS)
    self.positive_int("ppo_epochs", "ppo_minibatches")
    if self.loss.kind != "ppo" and (self.ppo_epochs, self.ppo_minibatches) != (1, 1):
      _bad(
        "objective.ppo_minibatches" if self.ppo_minibatches != 1 else "objective.ppo_epochs",
        f"PPO passes need objective.kind='ppo' (got {self.loss.kind!r}); policy gradient makes "
        "one update per step on the whole batch, so leave ppo_epochs and ppo_minibatches at 1",
      )
    if self.loss.reward_grad == "paper" and self.reward_scorer != "actor":
      _bad(
        "objective.reward_grad",
        "'paper' differentiates the actor's answer log-prob, so it "
        "needs objective.reward_scorer='actor'",
      )
    if self.loss.method:
      self._check_method()
    else:
      if self.reward_scorer == "ema":
        _bad(
          "objective.reward_scorer",
          "'ema' is the EMA-lagged adapter copy that only an answer-likelihood method whose "
          "scorer it is keeps (objective.method='nover'); the Markovian objective scores with "
          "'actor' or 'base'",
        )
      self._check_ema_keys(None)
    self._check_method_knobs(obj.method_of(self.loss) if self.loss.method else None)

  def _check_method_knobs(self, method):
    """objective.method_answer_weight / method_length_penalty set (>= 0) where the run's method
    has no such term would change nothing: refused, naming the methods that have one."""
    knobs = (
      (
        "method_answer_weight",
        method is not None and method.answer_weight != "none",
        "an answer term (verifree, jepo, latro)",
      ),
      (
        "method_length_penalty",
        method is not None and "length_penalty" in method.shaping,
        "a length penalty (dro)",
      ),
    )
    for name, has, which in knobs:
      if getattr(self.loss, name) != -1 and not has:
        _bad(
          f"objective.{name}",
          f"{getattr(self.loss, name)!r} sets the weight of a method with {which}; "
          f"{'this run has no method' if method is None else repr(method.name) + ' has none'}, "
          "so leave it at -1",
        )

  def _check_ema_keys(self, method):
    """objective.scorer_ema_* set away from their defaults in a run that keeps no EMA copy would
    change nothing: refused, as a contradicting key is."""
    if method is not None and method.scorer == "ema":
      return
    for name in ("scorer_ema_decay", "scorer_ema_every"):
      if getattr(self.loss, name) != getattr(obj.ObjectiveConfig, name):
        _bad(
          f"objective.{name}",
          f"{getattr(self.loss, name)!r} sets the EMA-lagged scorer copy of a method whose "
          "scorer is 'ema' (objective.method='nover' or 'nover_markovian'); this run keeps no "
          f"such copy, so leave it at {getattr(obj.ObjectiveConfig, name)!r}",
        )

  def _check_method(self):
    """An answer-likelihood method (docs/answer-likelihood.md) decides its own reward: the keys
    that would change it must be at the values it sets (the config variants of its name do)."""
    m = self.loss.method
    try:
      method = obj.method_of(self.loss)
    except ValueError as e:
      _bad("objective.method", str(e))
    self._check_ema_keys(method)
    if self.reward_scorer != method.scorer:
      _bad(
        "objective.reward_scorer",
        f"{m!r} scores with the {method.scorer!r} model; set "
        f"objective.reward_scorer={method.scorer!r} (the variant {m!r} does)",
      )
    if method.has_answer_term and method.scorer != "actor":
      _bad("objective.method", f"{m!r}'s answer term differentiates the actor's answer log-prob")
    if self.loss.normalize_reward or self.loss.reward_grad != "none":
      key = "objective.normalize_reward" if self.loss.normalize_reward else "objective.reward_grad"
      _bad(
        key,
        f"{m!r} subtracts its own no-reasoning score and has its own answer term: set "
        "objective.normalize_reward=False and objective.reward_grad='none' (the variant "
        f"{m!r} does)",
      )

  @property
  def kind(self) -> str:
    return self.loss.kind


@dataclasses.dataclass(frozen=True)
class OptimSpec(schema.Optim, _Section):
  SECTION = "optim"

  def __post_init__(self):
    self.number("lr", 0.0, low_open=True)
    self.number("grad_clip", 0.0, low_open=True)
    self.number("b1", 0.0, 1.0, high_open=True)
    self.number("b2", 0.0, 1.0, high_open=True)
    self.number("eps", 0.0)
    self.number("weight_decay", 0.0)
    self.choice("schedule", optimizer.SCHEDULES)
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      _bad("optim.warmup_steps", f"must be an integer >= 0, got {self.warmup_steps!r}")
    self.positive_int("accumulation_steps")


@dataclasses.dataclass(frozen=True)
class TrainSpec(schema.Train, _Section):
  SECTION = "train"

  def __post_init__(self):
    self.positive_int(
      "num_steps",
      "questions_per_step",
      "group_size",
      "checkpoint_every",
      "eval_every",
      "max_to_keep",
      "text_every",
      "nan_patience",
      "max_rollbacks",
    )
    self.choice("collapse_action", guards.COLLAPSE_ACTIONS)
    self.choice("nonfinite_action", guards.NONFINITE_ACTIONS)

  @property
  def rows(self) -> int:
    """N = Q * G sampled CoTs per step."""
    return self.questions_per_step * self.group_size


@dataclasses.dataclass(frozen=True)
class EvalSpec(schema.Eval, _Section):
  SECTION = "eval"

  def __post_init__(self):
    self.positive_int("num_examples", "num_samples", "answer_max_tokens", "batch_size")
    for name, zero in (("selection_size", "auto"), ("final_num_examples", "the whole split")):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        _bad(self._key(name), f"must be an integer >= 0 (0 = {zero}), got {v!r}")
    if not isinstance(self.fragility_every, int) or self.fragility_every < 0:
      _bad(
        "eval.fragility_every", f"must be an integer >= 0 (0 = off), got {self.fragility_every!r}"
      )
    self.choice("reader", SCORERS)


@dataclasses.dataclass(frozen=True)
class MeshSpec(schema.Mesh, _Section):
  SECTION = "mesh"

  def __post_init__(self):
    if self.preset and self.preset not in sharding.MESH_PRESETS:
      _bad("mesh.preset", f"unknown {self.preset!r}; choose one of {sorted(sharding.MESH_PRESETS)}")
    s = self.shape
    if (
      not isinstance(s, tuple)
      or len(s) != 3
      or s.count(-1) > 1
      or any(not isinstance(x, int) or x == 0 or x < -1 for x in s)
    ):
      _bad("mesh.shape", f"{s}: use 3 positive sizes (data, fsdp, tensor), at most one -1")
    if not isinstance(self.allow_replication, bool):
      _bad("mesh.allow_replication", f"must be True or False, got {self.allow_replication!r}")
    self.number("device_memory_gib", 0.0)

  @property
  def resolved(self) -> tuple:
    """The mesh shape to build (a preset wins over `shape`)."""
    return sharding.MESH_PRESETS[self.preset] if self.preset else self.shape

  @property
  def known(self) -> bool:
    """Whether `resolved` is fixed without counting devices (no -1)."""
    return -1 not in self.resolved


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """The whole run config, typed. `read` checks every section; `config_validation.validate` adds
  the rules that span sections."""

  task: str
  workdir: str
  compilation_cache_dir: str
  host_allocator: str
  model: ModelSpec
  lora: LoraSpec
  data: DataSpec
  prompt: PromptSpec
  sampling: SamplingSpec
  objective: ObjectiveSpec
  optim: OptimSpec
  train: TrainSpec
  eval: EvalSpec
  mesh: MeshSpec
  # The config as validated (prompt.format resolved), as plain JSON-able values: what a run
  # records (config.json, each checkpoint's state) and what a protocol is compared on. Set by
  # `config_validation.validate`; below the command line only the spec travels.
  recorded: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  @classmethod
  def read(cls, c) -> "RunSpec":
    # The objective's spec reads the group size too (ObjectiveConfig checks a baseline's needs).
    sections = {k: v for k, v in SECTION_SPECS.items() if k != "objective"}
    top = {f.name for f in dataclasses.fields(schema.Run)} | set(schema.SECTIONS)
    extra = sorted(set(c.keys()) - top)
    if extra:
      _bad(extra[0], f"unknown key; a run config has {sorted(top)}")
    if c.task not in tasks_lib.TASKS:
      _bad("task", f"unknown task {c.task!r}; choose one of {list(tasks_lib.TASKS)}")
    if c.host_allocator not in host_allocator.SETTINGS:
      _bad("host_allocator", f"{c.host_allocator!r} is not one of {list(host_allocator.SETTINGS)}")
    if not c.workdir:
      _bad("workdir", "is empty; give the run's directory")
    if c.get("variant", "") and c.variant not in VARIANTS:
      _bad("variant", f"unknown {c.variant!r}; choose one of {list(VARIANTS)} (or '')")
    read = {name: spec.read(c[name]) for name, spec in sections.items()}
    objective = ObjectiveSpec.read(c.objective, read["train"].group_size)
    if objective.loss.method:
      if objective.reward_scorer == "ema" and read["lora"].reference != "base":
        # The EMA copy starts as the starting adapter and is the KL reference itself.
        _bad(
          "lora.reference",
          f"objective.method={objective.loss.method!r} takes its KL reference and reward "
          "scorer from its EMA-lagged adapter copy, which starts as the starting adapter; a "
          f"second reference ({read['lora'].reference!r}) would be kept and never read: leave "
          "lora.reference='base'",
        )
      # Whom the scorer shows the question is prompt.markovian's job, for every row it builds.
      hidden = obj.method_of(objective.loss).markovian
      if read["prompt"].markovian != hidden:
        _bad(
          "prompt.markovian",
          f"objective.method={objective.loss.method!r} "
          f"{'hides' if hidden else 'shows'} the question from its scorer: set "
          f"prompt.markovian={hidden} (the variant {objective.loss.method!r} does)",
        )
    return cls(
      task=c.task,
      workdir=str(c.workdir),
      compilation_cache_dir=str(c.compilation_cache_dir),
      host_allocator=c.host_allocator,
      objective=objective,
      **read,
    )

  def eval_temperature(self) -> float:
    """The CoT temperature of evaluation (<0 in the config: the training temperature)."""
    return self.sampling.temperature if self.eval.temperature < 0 else self.eval.temperature


# The spec of each schema.SECTIONS section, in the same order.
SECTION_SPECS = {
  "model": ModelSpec,
  "lora": LoraSpec,
  "data": DataSpec,
  "prompt": PromptSpec,
  "sampling": SamplingSpec,
  "objective": ObjectiveSpec,
  "optim": OptimSpec,
  "train": TrainSpec,
  "eval": EvalSpec,
  "mesh": MeshSpec,
}


def optional(x) -> Optional[str]:
  """'' -> None, for path-like config strings."""
  return x or None
