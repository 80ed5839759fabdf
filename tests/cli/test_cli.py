"""`python -m markovian_jax.train` itself, as a user runs it: two steps, a refused re-run, a resume,
and bad input that exits 2 with one `error:` line before any model weights load."""

import os
import shutil

import pytest

from tests.helpers import demo_args, make_config, one_error_line, run_train


@pytest.mark.slow
def test_train_cli_runs_refuses_to_mix_runs_and_resumes(tiny_model_dir, tmp_path):
  work = tmp_path / "run"
  done = run_train(*demo_args(tiny_model_dir, work))
  assert done.returncode == 0, done.stderr[-3000:]
  assert sorted(os.listdir(work / "checkpoints")) == ["2"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(work))
  again = one_error_line(run_train(*demo_args(tiny_model_dir, work)))
  assert "config.train.resume" in again and "steps [2]" in again and "--config.workdir" in again
  more = run_train(
    *demo_args(
      tiny_model_dir,
      work,
      "--config.train.resume=True",
      "--config.train.num_steps=3",
      "--config.train.checkpoint_every=3",
    )
  )
  assert more.returncode == 0, more.stderr[-3000:]
  assert "3" in os.listdir(work / "checkpoints")


@pytest.fixture(scope="module")
def weightless_model_dir(tiny_model_dir, tmp_path_factory):
  """The tiny model's tokenizer and config without its weights: a run that reached the model
  load would fail there, so errors about anything else prove they came first."""
  d = tmp_path_factory.mktemp("no_weights")
  for name in os.listdir(tiny_model_dir):
    if not name.endswith(".safetensors") and not name.endswith(".index.json"):
      shutil.copy(os.path.join(tiny_model_dir, name), d)
  return str(d)


# A user's process for one mistyped flag and one refused value; the rest of the refusals are
# checked in-process below (the same code raises them; the CLI prints any of them the same way).
@pytest.mark.parametrize(
  "extra,expected",
  [
    (
      ["--config.train.num_step=3"],
      "--config.train.num_step: unknown config key; did you mean --config.train.num_steps?",
    ),
    (
      ["--config.data.path=/no/such/dir", "--config.task=gsm8k"],
      "config.data.path: /no/such/dir: no such file or directory",
    ),
  ],
)
@pytest.mark.slow
def test_bad_input_exits_2_with_one_line_before_the_model_loads(
  weightless_model_dir, tmp_path, extra, expected
):
  line = one_error_line(
    run_train(*demo_args(weightless_model_dir, tmp_path / "w", *extra), timeout=120)
  )
  assert expected in line, line
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_an_unknown_flag_is_named_with_the_closest_key():
  from markovian_jax.runtime import cli

  argv = [
    "train",
    "--config=configs/demo.py",
    "--config.train.bogus_knob=1",
    "--config.train.num_step=3",
  ]
  assert cli._explain(argv, KeyError("bogus_knob")).startswith(
    "--config.train.bogus_knob: unknown config key"
  )  # the first unknown one is named
  assert cli._explain(argv[:2] + argv[3:], KeyError("num_step")) == (
    "--config.train.num_step: unknown config key; did you mean --config.train.num_steps?"
  )


def test_an_unknown_variant_is_one_line_naming_it_and_the_known_ones():
  """config_flags wraps the config file's error in its whole traceback; the CLI's line is ours:
  the flag, the name and the variants there are."""
  from absl import flags
  from ml_collections import config_flags

  from markovian_jax.configs.base import VARIANTS
  from markovian_jax.runtime import cli

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  argv = ["train", "--config=configs/demo.py:no_such"]
  with pytest.raises(flags.Error) as raised:
    fv(argv)
  line = cli._explain(argv, raised.value)
  assert line == (
    "--config=configs/demo.py:no_such: 'no_such' is not a known variant "
    f"(variants: {', '.join(VARIANTS)})"
  ), line


@pytest.mark.parametrize(
  "overrides,expected",
  [
    ({"train.text_every": 0}, "config.train.text_every: must be a positive integer"),
    ({"lora.targets": ("q", "attention")}, "config.lora.targets: ['q', 'attention']"),
    ({"objective.ppo_minibatches": 2}, "config.objective.ppo_minibatches: PPO passes"),
    (
      {"lora.init_from": "/no/such/adapter"},
      "config.lora.init_from: /no/such/adapter is not a PEFT adapter directory",
    ),
  ],
)
def test_bad_values_are_refused_before_the_model_loads(
  weightless_model_dir, tmp_path, overrides, expected
):
  """What the CLI prints as its one `error:` line (any UserError): raised by the Trainer before it
  reads a weight (this model directory has none) or writes a checkpoint."""
  from markovian_jax.runtime.errors import UserError
  from markovian_jax.trainer import Trainer

  with pytest.raises(UserError) as raised:
    Trainer(make_config(weightless_model_dir, tmp_path / "w", **overrides))
  assert expected in " ".join(str(raised.value).split()), raised.value
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.slow
def test_malformed_data_record_is_one_line_naming_file_and_line(weightless_model_dir, tmp_path):
  data = tmp_path / "gsm8k"
  data.mkdir()
  good = '{"question": "1+1?", "answer": "so #### 2"}\n'
  (data / "train.jsonl").write_text(good + '{"question": "2+2?"\n')
  (data / "test.jsonl").write_text(good)
  line = one_error_line(
    run_train(
      *demo_args(
        weightless_model_dir,
        tmp_path / "w",
        "--config.task=gsm8k",
        f"--config.data.path={tmp_path}",
      ),
      timeout=120,
    )
  )
  assert "train.jsonl:2" in line, line
