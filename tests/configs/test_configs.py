"""Every config file loads, validates, and fails early with a message naming a bad key."""

import importlib
import pathlib

import pytest

from markovian_jax.training import config_validation
from markovian_jax.training.config_validation import InvalidConfig

CONFIGS = sorted(
  p.stem
  for p in (pathlib.Path(__file__).parents[2] / "configs").glob("*.py")
  if p.stem not in ("__init__", "base", "schema")
)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid(name):
  c = importlib.import_module(f"configs.{name}").get_config()
  config_validation.validate(c)
  if name != "demo":
    assert c.task == name


def test_reference_defaults():
  c = importlib.import_module("configs.gsm8k").get_config()
  assert (c.sampling.cot_length, c.train.group_size, c.sampling.temperature) == (100, 12, 1.0)
  assert (c.objective.kl_penalty, c.optim.lr, c.lora.rank, c.lora.alpha) == (0.1, 1e-4, 8, 16)
  wiki = importlib.import_module("configs.wiki_continuation").get_config()
  assert (wiki.sampling.cot_length, wiki.train.group_size) == (50, 16)
  assert importlib.import_module("configs.mmlu").get_config().sampling.cot_length == 150
  assert importlib.import_module("configs.svamp").get_config().eval.answer_max_tokens == 16


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("train.group_size", 1, "config.train.group_size: "),
    ("objective.kl_estimator", "k9", "config.objective.kl_estimator: "),
    ("objective.baseline", "loo", "config.objective.baseline: "),
    ("objective.reward_kind", "likelihood", "config.objective.reward_kind: "),
    ("task", "gsm9k", "config.task: unknown task 'gsm9k'"),
    ("sampling.cot_length", 0, "sampling.cot_length: must be a positive integer"),
    ("train.text_every", 0, "config.train.text_every: must be a positive integer"),
    ("lora.targets", ("q", "attention"), "config.lora.targets: ['q', 'attention']: choose"),
    ("mesh.shape", (-1, -1, 1), "config.mesh.shape"),
    ("mesh.preset", "8xh200", "config.mesh.preset: unknown '8xh200'"),
    ("lora.reference", "initial_adapter", "needs lora.init_from"),
    (
      "objective.ppo_minibatches",
      2,
      "config.objective.ppo_minibatches: PPO passes need objective.kind='ppo'",
    ),
    ("objective.ppo_epochs", 2, "config.objective.ppo_epochs: PPO passes"),
    ("optim.lr", float("inf"), "config.optim.lr: must be a finite number"),
    ("optim.schedule", "linear", "config.optim.schedule: 'linear' is not one of"),
    ("data.mmlu_train_splits", ("test",), "config.data.mmlu_train_splits"),
    ("train.collapse_action", "panic", "config.train.collapse_action"),
    ("eval.reader", "critic", "config.eval.reader"),
    ("host_allocator", "jemalloc", "config.host_allocator"),
    ("objective.reward_scorer", "ema", "config.objective.reward_scorer: 'ema' is the EMA-lagged"),
    ("objective.scorer_ema_decay", 0.9, "config.objective.scorer_ema_decay: 0.9 sets the EMA"),
    ("objective.scorer_ema_every", 1, "config.objective.scorer_ema_every: 1 sets the EMA"),
  ],
)
def test_invalid_values_name_the_key(key, value, message):
  c = importlib.import_module("configs.gsm8k").get_config()
  section, _, leaf = key.rpartition(".")
  (c[section] if section else c)[leaf] = value
  with pytest.raises(InvalidConfig) as e:
    config_validation.validate(c)
  assert str(e.value).startswith("config.") and message in str(e.value), str(e.value)


def test_unknown_key_is_rejected_by_the_cli_override():
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  path = str(pathlib.Path(__file__).parents[2] / "configs" / "gsm8k.py")
  with pytest.raises(Exception, match="no_such_key"):
    fv(["prog", f"--config={path}", "--config.train.no_such_key=3"])


def test_sections_are_read_into_typed_specs():
  from markovian_jax import objectives
  from markovian_jax.data import TASKS
  from markovian_jax.models import lora
  from markovian_jax.models.config import REMAT_MODES

  c = importlib.import_module("configs.gsm8k").get_config()
  c.objective.baseline = "rloo"
  c.objective.reward_kind = "prob"
  c.objective.kind = "ppo"
  c.objective.ppo_minibatches = 3
  spec = config_validation.validate(c)
  assert spec.objective.loss.baseline == "rloo" and spec.objective.loss.reward_kind == "prob"
  assert spec.objective.loss.group_size == spec.train.group_size == 12
  assert spec.lora.targets == lora.ALL_LINEAR and spec.train.rows == 12
  assert spec.objective.loss.ei_std is None  # -1 in the file means off
  with pytest.raises(Exception):
    spec.train.num_steps = 3  # frozen
  # The choice lists are the implementing modules' own.
  assert "rloo" in objectives.BASELINES and "mean_token_prob" in objectives.REWARD_KINDS
  assert "gsm8k" in TASKS and REMAT_MODES == ("none", "full", "dots")


def test_ppo_minibatches_must_divide_the_rows():
  c = importlib.import_module("configs.gsm8k").get_config()
  c.objective.kind = "ppo"
  c.objective.ppo_minibatches = 5
  with pytest.raises(InvalidConfig, match="ppo_minibatches: 5 does not divide the 12 samples"):
    config_validation.validate(c)


def test_mmlu_subject_and_auxiliary_train_reach_the_loader():
  c = importlib.import_module("configs.mmlu").get_config()
  c.data.mmlu_subject = "anatomy"
  c.data.mmlu_train_splits = ("dev", "auxiliary_train")
  spec = config_validation.validate(c)
  assert spec.data.task_options("mmlu") == {
    "subject": "anatomy",
    "train_splits": ("dev", "auxiliary_train"),
  }


@pytest.mark.parametrize("weight,reward_grad", [(0.0, "none"), (0.5, "none"), (0.0, "paper")])
def test_actor_reward_weight_that_cannot_take_effect_is_refused(weight, reward_grad):
  """actor_reward_weight is the weight of the paper's reward-gradient term: under the default
  reward_grad='none' there is no such term (every weight gives the same gradient), and weight 0
  under 'paper' is the 'none' objective; both are refused with a line naming the knob that acts.
  The reference's w=0 run (frozen scorer and reader) is the no_reward_grad variant."""
  c = importlib.import_module("configs.gsm8k").get_config()
  c.objective.actor_reward_weight = weight
  c.objective.reward_grad = reward_grad
  with pytest.raises(InvalidConfig) as e:
    config_validation.validate(c)
  msg = str(e.value)
  assert msg.startswith("config.objective.actor_reward_weight: "), msg
  assert "objective.reward_grad" in msg and "\n" not in msg, msg
  if reward_grad == "none":
    assert "objective.reward_scorer" in msg and "no_reward_grad" in msg, msg


def test_actor_reward_weight_is_accepted_where_it_acts():
  c = importlib.import_module("configs.gsm8k").get_config()
  c.objective.reward_grad, c.objective.actor_reward_weight = "paper", 0.5
  assert config_validation.validate(c).objective.loss.actor_reward_weight == 0.5
  c = importlib.import_module("configs.gsm8k").get_config("no_reward_grad")
  spec = config_validation.validate(c)
  assert (spec.objective.reward_scorer, spec.eval.reader) == ("base", "base")
  assert spec.objective.loss.actor_reward_weight == 1.0  # untouched: it has no term here


TASK_FILES = (
  "gsm8k",
  "arc",
  "mmlu",
  "svamp",
  "arithmetic",
  "wiki_continuation",
  "aqua",
  "mathqa",
  "demo",
)


@pytest.mark.parametrize("task", TASK_FILES)
def test_every_variant_runs_on_every_task(task):
  """`--config=configs/<task>.py:<variant>` validates and changes exactly what it says (each
  variant compared with the task's defaults key by key)."""
  from markovian_jax.configs import base

  module = importlib.import_module(f"configs.{task}")
  default = module.get_config()
  config_validation.validate(default)  # which resolves prompt.format=auto, as for each variant
  default = default.to_dict()
  flat = lambda d, p="": {
    k2: v2
    for k, v in d.items()
    for k2, v2 in (  # noqa: E731
      flat(v, f"{p}{k}.").items() if isinstance(v, dict) else {f"{p}{k}": v}.items()
    )
  }
  g, q = default["train"]["group_size"], default["train"]["questions_per_step"]
  want = {
    "markovian": {},
    "non_markovian": {"prompt.markovian": False},
    "no_reward_grad": {"objective.reward_scorer": "base", "eval.reader": "base"},
    "unnormalised": {"objective.normalize_reward": False},
    "ema": {"objective.baseline": "ema", "train.questions_per_step": q * g, "train.group_size": 1},
    "ei": {"objective.ei_std": 1.0},
    "paper_reward_grad": {"objective.reward_grad": "paper"},
    "ppo_base": {"objective.kind": "ppo", "objective.ppo_ratio_reference": "base"},
  }
  # The answer-likelihood family (docs/answer-likelihood.md's methods table): each method and its
  # twin set the method, whether the question is hidden, no base-score normalisation, the scorer.
  # NOVER's scorer is its EMA-lagged adapter copy (objective.reward_scorer='ema').
  scorers = {
    "verifree": "actor",
    "rlpr": "actor",
    "jepo": "actor",
    "latro": "actor",
    "nover": "ema",
    "vrcli": "base",
    "dro": "actor",
  }
  base_values = flat(default)
  for method, scorer in scorers.items():
    for hidden in (False, True):
      name = method + ("_markovian" if hidden else "")
      sets = {
        "objective.method": name,
        "prompt.markovian": hidden,
        "objective.normalize_reward": False,
        "objective.reward_scorer": scorer,
      }
      want[name] = {k: v for k, v in sets.items() if v != base_values[k]}
  assert set(want) == set(base.VARIANTS) and set(base.TABLE_VARIANTS) <= set(want)
  for name, changes in want.items():
    c = module.get_config(name)
    config_validation.validate(c)
    got = flat(c.to_dict())
    diff = {k: v for k, v in got.items() if v != flat(default)[k]}
    assert diff == {**changes, "variant": name}, (name, diff)


def test_the_wiki_temperatures_say_where_each_comes_from():
  """1.0 (the default), 1.5 (`t1.5`) and the appendix's 1.2-1.4 differ by source; the config's
  documentation names the source of each, beside the values the config really sets."""
  wiki = importlib.import_module("configs.wiki_continuation")
  sources = {}
  for line in wiki.__doc__.splitlines():
    value, _, source = line.strip().partition(" ")
    if value in ("1.0", "1.5", "1.2-1.4"):
      sources[value] = " ".join(source.split())
  assert sources["1.0"].startswith("the default: the reference code's command-line default")
  assert sources["1.5"].startswith("option `t1.5`: what the production")
  assert sources["1.2-1.4"].startswith("what the paper's appendix table lists")
  assert wiki.get_config().sampling.temperature == 1.0
  assert wiki.get_config("t1.5").sampling.temperature == 1.5


def test_variant_errors_and_the_wiki_temperature_option():
  from markovian_jax.configs import base

  wiki = importlib.import_module("configs.wiki_continuation")
  assert wiki.get_config().sampling.temperature == 1.0  # the reference code's default
  c = wiki.get_config("ei,t1.5")
  assert (c.sampling.temperature, c.variant, c.objective.ei_std) == (1.5, "ei", 1.0)
  with pytest.raises(InvalidConfig, match="'eii' is not a known variant"):
    importlib.import_module("configs.gsm8k").get_config("eii")
  with pytest.raises(InvalidConfig, match="one per run"):
    importlib.import_module("configs.gsm8k").get_config("ei,ema")
  c = importlib.import_module("configs.gsm8k").get_config()
  c.variant = "eii"
  with pytest.raises(InvalidConfig, match="config.variant: unknown 'eii'"):
    config_validation.validate(c)
  assert base.get_config("gsm8k").variant == ""


def test_variant_reaches_get_config_through_the_config_flag():
  from absl import flags
  from ml_collections import config_flags

  from markovian_jax.runtime import cli

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  fv(["prog", f"--config={cli.config_path('configs/svamp.py:non_markovian')}"])
  assert (fv.config.task, fv.config.variant, fv.config.prompt.markovian) == (
    "svamp",
    "non_markovian",
    False,
  )
