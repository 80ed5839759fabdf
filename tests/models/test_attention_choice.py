"""`config.model.attention = auto | cudnn | xla`: on CPU auto picks XLA's attention and says why,
a cuDNN preflight that fails (here: no cuDNN) falls back under auto and refuses under cudnn, and
`cudnn` on a CPU run is one `error:` line, exit 2, before the weights load."""

import pytest

from markovian_jax.models import attention_choice
from markovian_jax.runtime.errors import InvalidConfig
from tests import helpers
from tests.helpers import make_config, one_error_line, run_train


def _config():
  return helpers.tiny_config(param_dtype="bfloat16", dtype="bfloat16")


def test_auto_on_cpu_is_xla_with_the_reason():
  impl, why = attention_choice.resolve("auto", _config(), backend="cpu")
  assert impl == "auto"  # the CPU's default path (einsum), never cuDNN
  assert why == "attention: xla (auto: cuDNN attention is GPU only; JAX runs on cpu)"
  assert attention_choice.resolve("xla", _config(), backend="gpu") == (
    "dot_product",
    "attention: xla (requested)",
  )
  with pytest.raises(InvalidConfig, match="^config.model.attention: 'cudnn' needs a GPU"):
    attention_choice.resolve("cudnn", _config(), backend="cpu")


def test_a_failing_preflight_falls_back_under_auto_and_refuses_under_cudnn():
  """The GPU path on this CPU: the cuDNN preflight really runs and fails (no cuDNN here), which
  auto turns into XLA's attention with the failure as the reason, and cudnn into a refusal."""
  why = attention_choice.preflight(_config())
  assert why is not None and why.startswith("cudnn attention failed at "), why
  assert attention_choice.preflight(_config(), kernel="xla") is None
  impl, line = attention_choice.resolve("auto", _config(), backend="gpu")
  assert impl == "dot_product"
  assert line.startswith("attention: xla (auto: cudnn attention failed at "), line
  with pytest.raises(
    InvalidConfig,
    match=r"^config.model.attention: 'cudnn' failed its "
    r"preflight \(cudnn attention failed at ",
  ):
    attention_choice.resolve("cudnn", _config(), backend="gpu")


def test_cudnn_on_cpu_is_refused_before_loading(tmp_path):
  """Before the tokenizer and the weights (random:tiny's need nothing else here); the run's
  logged choice on CPU is checked by test_random_models' training run."""
  from markovian_jax.training import config_validation
  from markovian_jax.training.run_context import RunContext

  c = make_config("random:tiny", tmp_path / "b", **{"model.attention": "cudnn"})
  with pytest.raises(InvalidConfig, match="^config.model.attention: 'cudnn' needs a GPU"):
    RunContext.create(config_validation.validate(c))
  c = make_config("random:tiny", tmp_path / "c", **{"model.attention": "flash"})
  with pytest.raises(InvalidConfig, match=r"^config.model.attention: 'flash' is not one of "):
    RunContext.create(config_validation.validate(c))


@pytest.mark.slow
def test_cudnn_on_a_cpu_run_is_one_error_line(tmp_path, smollm2_path):
  del smollm2_path
  line = one_error_line(
    run_train(
      "--config=configs/demo.py",
      "--config.model.path=random:tiny",
      f"--config.workdir={tmp_path / 'run'}",
      "--config.host_allocator=system",
      "--config.compilation_cache_dir=",
      "--config.model.attention=cudnn",
    )
  )
  assert line == (
    "error: config.model.attention: 'cudnn' needs a GPU, and JAX runs on cpu; use 'auto' or 'xla'"
  )
