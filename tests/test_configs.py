"""Every config file loads, validates, and fails early with a message naming a bad key."""

import importlib
import pathlib

import pytest

from markovian_jax import config_validation
from markovian_jax.config_validation import InvalidConfig

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
    ("train.group_size", 1, "train.group_size: is 1, but objective.baseline='group'"),
    ("objective.kl_estimator", "k9", "objective.kl_estimator: 'k9' is not one of"),
    ("task", "gsm9k", "config.task: unknown task 'gsm9k'"),
    ("sampling.cot_length", 0, "sampling.cot_length: must be a positive integer"),
    ("mesh.shape", (-1, -1, 1), "config.mesh.shape"),
    ("lora.reference", "initial_adapter", "needs lora.init_from"),
])
def test_invalid_values_name_the_key(key, value, message):
  c = importlib.import_module("configs.gsm8k").get_config()
  section, _, leaf = key.rpartition(".")
  (c[section] if section else c)[leaf] = value
  with pytest.raises(InvalidConfig, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_validation.validate(c)


def test_unknown_key_is_rejected_by_the_cli_override():
  from ml_collections import config_flags
  from absl import flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  path = str(pathlib.Path(__file__).parents[1] / "configs" / "gsm8k.py")
  with pytest.raises(Exception, match="no_such_key"):
    fv(["prog", f"--config={path}", "--config.train.no_such_key=3"])
