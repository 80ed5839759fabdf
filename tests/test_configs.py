"""Every config file loads, validates, and fails early with a message naming a bad key."""

import importlib
import pathlib

import pytest

from markovian_jax.training import config_validation
from markovian_jax.training.config_validation import InvalidConfig

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
                 if p.stem not in ("__init__", "base"))


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


@pytest.mark.parametrize("key,value,message", [
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
    ("objective.ppo_minibatches", 2, "config.objective.ppo_minibatches: PPO passes need "
     "objective.kind='ppo'"),
    ("objective.ppo_epochs", 2, "config.objective.ppo_epochs: PPO passes"),
    ("optim.lr", float("inf"), "config.optim.lr: must be a finite number"),
    ("optim.schedule", "linear", "config.optim.schedule: 'linear' is not one of"),
    ("data.mmlu_train_splits", ("test",), "config.data.mmlu_train_splits"),
    ("train.collapse_action", "panic", "config.train.collapse_action"),
    ("eval.reader", "critic", "config.eval.reader"),
    ("host_allocator", "jemalloc", "config.host_allocator"),
])
def test_invalid_values_name_the_key(key, value, message):
  c = importlib.import_module("configs.gsm8k").get_config()
  section, _, leaf = key.rpartition(".")
  (c[section] if section else c)[leaf] = value
  with pytest.raises(InvalidConfig) as e:
    config_validation.validate(c)
  assert str(e.value).startswith("config.") and message in str(e.value), str(e.value)


def test_unknown_key_is_rejected_by_the_cli_override():
  from ml_collections import config_flags
  from absl import flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  path = str(pathlib.Path(__file__).parents[1] / "configs" / "gsm8k.py")
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
  assert spec.data.task_options("mmlu") == {"subject": "anatomy",
                                            "train_splits": ("dev", "auxiliary_train")}
