"""The prompt format follows the model family by default (`prompt.format="auto"`), as the
reference picks it from config.json's model_type: Mistral `[INST]`, Qwen2/Qwen3 ChatML, the others
plain text. An explicit format wins; the run's recorded config.json names the resolved format
(validate writes it back into the config the trainer records; tests/data/test_sentencepiece_vocab.py
reads it from a Mistral demo run's config.json)."""

import json

import pytest

from markovian_jax.configs import base
from markovian_jax.training import config_validation
from tests import helpers

# The reference's choice per family, written out by hand.
EXPECTED = {
  "llama": "plain",
  "mistral": "mistral",
  "qwen2": "chatml",
  "qwen3": "chatml",
  "phi3": "plain",
  "gpt2": "plain",
}


def _config(model_path, **prompt):
  c = base.get_config("arithmetic")
  c.model.path = model_path
  c.mesh.shape = (1, 1, 1)
  for k, v in prompt.items():
    c.prompt[k] = v
  return c


def _family_dir(tmp_path, family: str) -> str:
  """A directory with only the config.json of a tiny model of `family`: the format is chosen
  from it before any weights exist."""
  path = tmp_path / family
  path.mkdir()
  config = helpers.tiny_config(model_type=family, rope_scaling=None)
  (path / "config.json").write_text(json.dumps(config.to_hf()))
  return str(path)


def test_default_is_auto():
  assert base.get_config("gsm8k").prompt.format == "auto"


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_auto_follows_the_family_and_is_written_back(tmp_path, family):
  c = _config(_family_dir(tmp_path, family))
  spec = config_validation.validate(c)
  assert spec.prompt.format == EXPECTED[family]
  assert c.prompt.format == EXPECTED[family]  # what the run's config.json records


@pytest.mark.parametrize(
  "path, expected",
  [
    ("Qwen/Qwen3-4B", "chatml"),  # published shapes, no config.json in the HF cache
    ("meta-llama/Llama-3.1-8B-Instruct", "plain"),
    ("random:qwen3-4b", "chatml"),
    ("random:tiny", "plain"),
  ],
)
def test_auto_for_hub_ids_and_random_models(path, expected):
  assert config_validation.validate(_config(path)).prompt.format == expected


def test_auto_for_a_gguf(smollm2_path):
  # A GGUF's family is read without walking its header (the loader reads only llama GGUFs).
  assert config_validation.validate(_config(smollm2_path)).prompt.format == "plain"


@pytest.mark.parametrize("explicit", ["plain", "chat", "mistral"])
def test_explicit_format_wins(tmp_path, explicit):
  c = _config(_family_dir(tmp_path, "qwen3"), format=explicit)
  assert config_validation.validate(c).prompt.format == explicit
  assert c.prompt.format == explicit


def test_unreadable_family_names_the_key(tmp_path):
  invalid = config_validation.InvalidConfig
  with pytest.raises(invalid, match=r"^config\.model\.path: .*prompt\.format"):
    config_validation.validate(_config(str(tmp_path / "missing")))
  with pytest.raises(invalid, match=r"^config\.prompt\.format: 'xml'"):
    config_validation.validate(_config(str(tmp_path), format="xml"))
