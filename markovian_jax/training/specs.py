"""Typed, frozen views of a run config: each section of configs/base.py read once and validated.

    ConfigDict (configs/*.py + --config.x.y overrides)
      -> RunSpec.read(config)       one spec per section; each checks its own keys
      -> config_validation.validate  the rules that span sections

Every error is an `InvalidConfig` whose message starts with the key (`config.lora.targets: ...`).
The choice lists come from the modules that implement them (tasks from `data.tasks`, objective
variants from `objectives`' registries, remat modes from `models.config`, ...), never restated here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

from markovian_jax.training import guards
from markovian_jax.runtime import host_allocator
from markovian_jax.training import optimizer
from markovian_jax.runtime import sharding
from markovian_jax import objectives as obj
from markovian_jax.data import tasks as tasks_lib
from markovian_jax.data.mcq_tasks import MMLU_HUB_SPLITS
from markovian_jax.data.prompts import AUTO_FORMAT, PROMPT_FORMATS
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.models import lora as lora_lib
from markovian_jax.models.attention_choice import CHOICES as ATTENTION_CHOICES
from markovian_jax.models.config import DTYPES, REMAT_MODES
from markovian_jax.configs.base import VARIANTS

LORA_REFERENCES = ("base", "initial_adapter")  # what the KL / baseline reference model is
SCORERS = ("actor", "base")  # who scores the answer for the reward; who reads it in evaluation


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

  def number(self, name: str, low: float = -math.inf, high: float = math.inf,
             low_open: bool = False, high_open: bool = False):
    v = getattr(self, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
      lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
      _bad(self._key(name), f"must be a finite number in {lo}{low}, {high}{hi}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ModelSpec(_Section):
  SECTION = "model"
  path: str = ""
  dtype: str = "bfloat16"
  remat: str = "full"
  attention: str = "auto"

  def __post_init__(self):
    if not self.path:
      _bad("model.path", "is empty; give an HF directory, a .gguf file, a hub id or random:<name>")
    self.choice("dtype", DTYPES)
    self.choice("remat", REMAT_MODES)
    self.choice("attention", ATTENTION_CHOICES)


@dataclasses.dataclass(frozen=True)
class LoraSpec(_Section):
  SECTION = "lora"
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.1
  targets: tuple = lora_lib.ALL_LINEAR
  init_from: str = ""
  reference: str = "base"

  def __post_init__(self):
    self.positive_int("rank")
    self.number("alpha", 0.0, low_open=True)
    self.number("dropout", 0.0, 1.0, high_open=True)
    unknown = [t for t in self.targets if t not in lora_lib.ALL_LINEAR]
    if unknown or not self.targets:
      _bad("lora.targets", f"{list(self.targets)}: choose a non-empty subset of "
           f"{list(lora_lib.ALL_LINEAR)}")
    self.choice("reference", LORA_REFERENCES)
    if self.reference == "initial_adapter" and not self.init_from:
      _bad("lora.reference", "'initial_adapter' needs lora.init_from (a PEFT adapter directory)")


@dataclasses.dataclass(frozen=True)
class DataSpec(_Section):
  SECTION = "data"
  path: str = ""
  train_split: str = "train"
  eval_split: str = "test"
  arithmetic_terms: int = 15
  arithmetic_max: int = 99
  arc_subset: str = "ARC-Challenge"
  question_length: int = 50
  target_length: int = 50
  mmlu_subject: str = ""
  mmlu_train_splits: tuple = ("dev", "validation")

  def __post_init__(self):
    self.positive_int("arithmetic_terms", "arithmetic_max", "question_length", "target_length")
    allowed = [s for s in MMLU_HUB_SPLITS if s != "test"]
    if not self.mmlu_train_splits or any(s not in allowed for s in self.mmlu_train_splits):
      _bad("data.mmlu_train_splits", f"{list(self.mmlu_train_splits)}: choose a non-empty "
           f"subset of {allowed}")

  def task_options(self, task: str, tokenizer=None) -> dict:
    """`data.load_task` options for `task` from this section."""
    if task == "arc":
      return {"subset": self.arc_subset}
    if task == "mmlu":
      return {"subject": self.mmlu_subject or None, "train_splits": self.mmlu_train_splits}
    if task == "arithmetic":
      return {"num_terms": self.arithmetic_terms, "max_value": self.arithmetic_max}
    if task == "wiki_continuation":
      return {"tokenizer": tokenizer, "question_length": self.question_length,
              "target_length": self.target_length}
    return {}


@dataclasses.dataclass(frozen=True)
class PromptSpec(_Section):
  SECTION = "prompt"
  format: str = AUTO_FORMAT  # config_validation.validate resolves it to the model family's
  markovian: bool = True

  def __post_init__(self):
    self.choice("format", (AUTO_FORMAT,) + PROMPT_FORMATS)


@dataclasses.dataclass(frozen=True)
class SamplingSpec(_Section):
  SECTION = "sampling"
  cot_length: int = 50
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  prompt_bucket: int = 64

  def __post_init__(self):
    self.positive_int("cot_length", "prompt_bucket")
    self.number("temperature", 0.0, low_open=True)
    self.number("top_p", 0.0, 1.0, low_open=True)
    if not isinstance(self.top_k, int) or self.top_k < 0:
      _bad("sampling.top_k", f"must be >= 0 (0 = off), got {self.top_k!r}")


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec(_Section):
  """The objective section: the loss settings (`loss`, an objectives.ObjectiveConfig, which
  validates itself) and what the training step does around them."""
  SECTION = "objective"
  loss: Any = None
  reward_scorer: str = "actor"
  ppo_epochs: int = 1
  ppo_minibatches: int = 1

  @classmethod
  def read(cls, section, group_size: int = 12) -> "ObjectiveSpec":
    own = {f.name for f in dataclasses.fields(cls)} - {"loss"}
    loss_fields = {f.name for f in dataclasses.fields(obj.ObjectiveConfig)}
    kw = {}
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
      key = ("train.group_size" if field == "group_size" else
             f"objective.{field}" if field else "objective")
      raise InvalidConfig(f"config.{key}: {msg}") from e
    return cls(loss=loss, **{k: section[k] for k in own if k in section})

  def __post_init__(self):
    self.choice("reward_scorer", SCORERS)
    self.positive_int("ppo_epochs", "ppo_minibatches")
    if self.loss.kind != "ppo" and (self.ppo_epochs, self.ppo_minibatches) != (1, 1):
      _bad("objective.ppo_minibatches" if self.ppo_minibatches != 1 else "objective.ppo_epochs",
           f"PPO passes need objective.kind='ppo' (got {self.loss.kind!r}); policy gradient makes "
           "one update per step on the whole batch, so leave ppo_epochs and ppo_minibatches at 1")
    if self.loss.reward_grad == "paper" and self.reward_scorer != "actor":
      _bad("objective.reward_grad", "'paper' differentiates the actor's answer log-prob, so it "
           "needs objective.reward_scorer='actor'")

  @property
  def kind(self) -> str:
    return self.loss.kind


@dataclasses.dataclass(frozen=True)
class OptimSpec(_Section):
  SECTION = "optim"
  lr: float = 1e-4
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  schedule: str = "constant"
  warmup_steps: int = 0
  accumulation_steps: int = 1

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
class TrainSpec(_Section):
  SECTION = "train"
  num_steps: int = 100000
  questions_per_step: int = 1
  group_size: int = 12
  seed: int = 0
  checkpoint_every: int = 1000
  eval_every: int = 1000
  max_to_keep: int = 3
  keep_best: bool = True
  resume: bool = False
  text_every: int = 10
  nan_patience: int = 5
  nonfinite_action: str = "stop"
  collapse_action: str = "warn"
  collapse_repetition: float = 0.8
  collapse_ppo_ratio: float = 10.0
  collapse_kl: float = 5.0
  max_rollbacks: int = 3

  def __post_init__(self):
    self.positive_int("num_steps", "questions_per_step", "group_size", "checkpoint_every",
                      "eval_every", "max_to_keep", "text_every", "nan_patience", "max_rollbacks")
    self.choice("collapse_action", guards.COLLAPSE_ACTIONS)
    self.choice("nonfinite_action", guards.NONFINITE_ACTIONS)

  @property
  def rows(self) -> int:
    """N = Q * G sampled CoTs per step."""
    return self.questions_per_step * self.group_size


@dataclasses.dataclass(frozen=True)
class EvalSpec(_Section):
  SECTION = "eval"
  num_examples: int = 200
  selection_size: int = 0
  final_num_examples: int = 0
  num_samples: int = 1
  temperature: float = -1.0
  answer_max_tokens: int = 10
  reader: str = "actor"
  answer_first_line: bool = False
  batch_size: int = 32
  seed: int = 1234
  fragility_every: int = 0

  def __post_init__(self):
    self.positive_int("num_examples", "num_samples", "answer_max_tokens", "batch_size")
    for name, zero in (("selection_size", "auto"), ("final_num_examples", "the whole split")):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        _bad(self._key(name), f"must be an integer >= 0 (0 = {zero}), got {v!r}")
    if not isinstance(self.fragility_every, int) or self.fragility_every < 0:
      _bad("eval.fragility_every", f"must be an integer >= 0 (0 = off), got "
           f"{self.fragility_every!r}")
    self.choice("reader", SCORERS)


@dataclasses.dataclass(frozen=True)
class MeshSpec(_Section):
  SECTION = "mesh"
  shape: tuple = (-1, 1, 1)
  preset: str = ""
  allow_replication: bool = False
  device_memory_gib: float = 0.0

  def __post_init__(self):
    if self.preset and self.preset not in sharding.MESH_PRESETS:
      _bad("mesh.preset", f"unknown {self.preset!r}; choose one of {sorted(sharding.MESH_PRESETS)}")
    s = self.shape
    if (not isinstance(s, tuple) or len(s) != 3 or s.count(-1) > 1
        or any(not isinstance(x, int) or x == 0 or x < -1 for x in s)):
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

  @classmethod
  def read(cls, c) -> "RunSpec":
    sections = {"model": ModelSpec, "lora": LoraSpec, "data": DataSpec, "prompt": PromptSpec,
                "sampling": SamplingSpec, "optim": OptimSpec, "train": TrainSpec,
                "eval": EvalSpec, "mesh": MeshSpec}
    top = {"task", "workdir", "compilation_cache_dir", "host_allocator", "objective", "variant",
           *sections}
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
    return cls(task=c.task, workdir=str(c.workdir),
               compilation_cache_dir=str(c.compilation_cache_dir),
               host_allocator=c.host_allocator, objective=objective, **read)

  def eval_temperature(self) -> float:
    """The CoT temperature of evaluation (<0 in the config: the training temperature)."""
    return self.sampling.temperature if self.eval.temperature < 0 else self.eval.temperature


def optional(x) -> Optional[str]:
  """'' -> None, for path-like config strings."""
  return x or None
