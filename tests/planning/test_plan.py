"""The memory plan: offline model shapes, the 8B arithmetic by hand, the verdicts and knobs, the
CLI's exit codes, and agreement with the compiler's memory_analysis() on small configs."""

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from markovian_jax.configs import base
from markovian_jax.planning import plan
from markovian_jax.planning import shapes as plan_shapes
from markovian_jax.planning.memory import GIB
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.training import config_validation
from tests import helpers

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
BASE_8B_BF16 = 16_060_522_496  # 8,030,261,248 params x 2 bytes: "16.06 GB"
NORMS_8B_BF16 = (2 * 32 * 4096 + 4096) * 2  # RMSNorm scales: replicated on every mesh
# 32 layers x rank 8 x (in + out): q, o 4096 + 4096; k, v 4096 + 1024; gate, up, down 4096 + 14336
LORA_R8_ALL_LINEAR = 20_971_520


def preset_spec(name: str, **overrides):
  base = importlib.import_module("configs.base")
  c = base.with_preset(base.get_config("gsm8k"), name)
  for k, v in overrides.items():
    section, _, leaf = k.rpartition(".")
    c[section][leaf] = v
  return config_validation.validate(c)


def test_model_shapes_without_weights(smollm2_path, tiny_model_dir):
  c, source = plan_shapes.model_config(LLAMA_8B)  # no network, no cache: the published shapes
  assert "published" in source and c.num_params == 8_030_261_248
  gguf_config, source = plan_shapes.model_config(smollm2_path, "float32")
  assert "GGUF header" in source and (
    gguf_config.num_layers,
    gguf_config.hidden_size,
    gguf_config.vocab_size,
  ) == (30, 576, 49152)
  local, source = plan_shapes.model_config(tiny_model_dir)
  assert source.endswith("config.json") and local.num_layers == 2
  with pytest.raises(InvalidConfig, match="^config.model.path: someone/unknown-model is a hub id"):
    plan_shapes.model_config("someone/unknown-model")


@pytest.mark.parametrize(
  "preset, per_device_base, budget",
  [
    ("1xh100", BASE_8B_BF16, 0.9 * 0.75 * 79.6),
    ("8xh100", BASE_8B_BF16, 0.9 * 0.75 * 79.6),
    ("v5e-8", (BASE_8B_BF16 - NORMS_8B_BF16) // 4 + NORMS_8B_BF16, 0.9 * 16),
    ("v5p-8", BASE_8B_BF16, 0.9 * 95),
  ],
)
def test_8b_presets_by_hand(preset, per_device_base, budget):
  """Base 16.06 GB bf16 (split by tensor=4 on v5e-8); LoRA r8 all-linear 20,971,520 fp32 params
  (v5e-8: the q/k/v/gate/up `b` and the o/down `a` halves split by 4) and two AdamW moments."""
  p = plan.make_plan(preset_spec(preset))
  items = {i.name: i.bytes for i in p.memory.items}
  assert items["base weights"] == per_device_base
  lora = items["LoRA params (fp32)"]
  if preset == "v5e-8":  # a: [L, in, 8], b: [L, 8, out]; out of q/k/v/gate/up and in of o/down
    split = 32 * 8 * (4096 + 1024 + 1024 + 14336 + 14336 + 4096 + 14336) // 4
    whole = 32 * 8 * (4096 * 5 + 4096 + 4096)
    assert lora == 4 * (split + whole)
  else:
    assert lora == 4 * LORA_R8_ALL_LINEAR
  assert items["AdamW state (fp32)"] == 2 * lora
  assert p.usable_gib * plan.HEADROOM == pytest.approx(budget)
  assert p.fits and p.memory.peak / GIB < budget


def test_what_does_not_fit_names_the_knobs():
  # The 8B base replicated on 16 GB chips: 14.96 GiB of weights alone.
  spec = preset_spec(
    "8xh100", **{"mesh.preset": "", "mesh.shape": (8, 1, 1), "mesh.device_memory_gib": 16.0}
  )
  p = plan.make_plan(spec)
  assert p.fits is False
  assert p.fixes[0].startswith("mesh.shape=(4, 1, 2) (tensor=2")
  assert any(f.startswith("mesh.shape=(2, 4, 1) (fsdp=4") for f in p.fixes)
  with pytest.raises(InvalidConfig) as e:
    plan.check(spec, log=False)
  msg = str(e.value)
  assert msg.startswith("config.mesh.shape: the step needs ") and "14.40 GiB is usable" in msg
  # remat=none on one H100 with many questions: remat first, then fewer questions.
  spec = preset_spec("1xh100", **{"model.remat": "none", "train.questions_per_step": 8})
  p = plan.make_plan(spec)
  assert p.fits is False and p.fixes[0].startswith("model.remat=full")


def test_weights_that_do_not_split_are_refused():
  spec = preset_spec(
    "1xh100", **{"mesh.preset": "", "mesh.shape": (1, 1, 3), "mesh.device_memory_gib": 80.0}
  )
  with pytest.raises(InvalidConfig) as e:
    plan.make_plan(spec)
  assert str(e.value) == (
    "config.mesh.shape: the base weights do not split over mesh (1, 1, 3): "
    "layers/attn/k/kernel (32, 4096, 1024): its kv_heads dim (1024) does not split over "
    "tensor=3; use a tensor size that divides 1024 (or mesh.allow_replication=True for a test "
    "model)"
  )
  allowed = preset_spec(
    "1xh100",
    **{
      "mesh.preset": "",
      "mesh.shape": (1, 1, 3),
      "mesh.device_memory_gib": 80.0,
      "mesh.allow_replication": True,
    },
  )
  assert plan.make_plan(allowed).fits


def run_plan(*args):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "markovian_jax.plan", *args],
    cwd=helpers.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_cli_exit_codes():
  fits = run_plan("--config=configs/presets/v5e-8.py")
  assert fits.returncode == 0, fits.stderr[-2000:]
  assert "verdict   fits: " in fits.stdout and "base weights" in fits.stdout
  tight = run_plan(
    "--config=configs/gsm8k.py",
    "--config.mesh.shape=(8,1,1)",
    "--config.train.questions_per_step=2",
    "--device_memory_gib=16",
  )
  errors = [ln for ln in tight.stderr.splitlines() if ln.startswith("error:")]
  assert tight.returncode == 2 and len(errors) == 1 and "Traceback" not in tight.stderr
  assert errors[0].startswith("error: config.mesh.shape: the step needs ")
  assert "verdict   does not fit" in tight.stdout
  negative = run_plan("--config=configs/gsm8k.py", "--device_memory_gib=-1")
  assert helpers.one_error_line(negative) == (
    "error: flag --device_memory_gib=-1: -1.0 is not a non-negative number"
  )
  rows = run_plan("--config=configs/gsm8k.py", "--config.mesh.preset=8xh100")
  assert rows.returncode == 2 and rows.stderr.strip().splitlines()[-1] == (
    "error: config.train.questions_per_step: 12 rows (questions_per_step=1 x group_size=12) do "
    "not split over data*fsdp=8 (mesh.preset=8xh100 (8, 1, 1)): set train.questions_per_step "
    "to a multiple of 2"
  )


@pytest.fixture(scope="module")
def weightless_8b(tiny_model_dir, tmp_path_factory):
  """Llama-3.1-8B's config.json with a tokenizer and no weights: whatever reaches the model load
  fails there, so a refusal proves it came first."""
  d = tmp_path_factory.mktemp("weightless_8b")
  for name in os.listdir(tiny_model_dir):
    if not name.endswith((".safetensors", ".index.json")) and name != "config.json":
      shutil.copy(os.path.join(tiny_model_dir, name), d)
  c, _ = plan_shapes.model_config(LLAMA_8B)
  (d / "config.json").write_text(json.dumps(c.to_hf()))
  return str(d)


def test_check_refuses_what_cannot_fit_before_loading(weightless_8b, tmp_path, monkeypatch):
  from tests.helpers import make_config

  c = make_config(
    weightless_8b,
    tmp_path,
    **{
      "mesh.shape": (8, 1, 1),
      "train.group_size": 8,
      "mesh.device_memory_gib": 16.0,
      "model.dtype": "bfloat16",
    },
  )
  spec = config_validation.validate(c)
  with pytest.raises(InvalidConfig, match="^config.mesh.shape: the step needs"):
    plan.check(spec, log=False)
  from markovian_jax.trainer import Trainer
  from markovian_jax.training.run_context import RunContext

  # The wiring: the Trainer refuses the same config through the plan check, before it loads the
  # model. A Trainer that stopped calling the check (or called it after the load) reaches the
  # load, which fails here with an AssertionError, not the plan's InvalidConfig.
  checked, real = [], plan.check
  monkeypatch.setattr(plan, "check", lambda *a, **k: checked.append(1) or real(*a, **k))

  def load(*args, **kwargs):
    raise AssertionError("the Trainer loaded the base model before the plan check refused it")

  monkeypatch.setattr(RunContext, "create", load)
  with pytest.raises(InvalidConfig, match="^config.mesh.shape: the step needs"):
    Trainer(c)
  assert checked == [1]


# ------------------------------------------------------------------ against the compiler

# Stated margins, per device, on the small fp32 configs below (XLA:CPU): the arguments are the
# layout itself; the temporaries are what the plan models.
ARGUMENTS_MARGIN = 0.01
TEMPORARIES_RATIO = (0.6, 1.4)
TOTAL_MARGIN = 0.2
# An update that back-propagates through the answer rows too (a method's answer term, the paper's
# reward gradient) is planned short: its answer pass keeps about what `remat=none` would (measured
# on the dots case: plan / compiler temporaries 0.63 for verifree, 0.66 for reward_grad='paper';
# 0.43 before the plan counted those rows at all). A known gap of the plan, bounded here so that it
# cannot widen unseen.
ANSWER_GRAD_TEMPORARIES_RATIO = (0.55, 1.4)
ANSWER_GRAD_TOTAL_MARGIN = 0.35


def _small(remat="full", method=""):
  from markovian_jax.models.config import DecoderConfig
  from markovian_jax.planning.memory import Workload

  model = DecoderConfig(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
    max_position_embeddings=1024,
    param_dtype="float32",
    dtype="float32",
    remat=remat,
    eos_token_ids=(2,),
  )
  w = Workload(questions=2, group=4, cot=64, prompt=64, answer=96, window=8, remat=remat)
  c = importlib.import_module("configs.gsm8k").get_config()
  c.model.dtype, c.model.remat = "float32", remat
  c.train.questions_per_step, c.train.group_size = 2, 4
  return config_validation.validate(base.apply_arg(c, method)), model, w


@pytest.mark.parametrize(
  "shape, remat, phases, method",
  [
    ((1, 1, 1), "full", ("sample", "score", "update"), ""),
    ((8, 1, 1), "full", ("sample", "score", "update"), ""),
    ((2, 1, 4), "full", ("sample", "score", "update"), ""),
    ((2, 2, 2), "full", ("sample", "score", "update"), ""),
    ((1, 1, 1), "none", ("update",), ""),
    # An answer-likelihood method's update (its targets, its answer term) on the same margins.
    ((1, 1, 1), "dots", ("update",), "verifree"),
  ],
  ids=lambda x: (
    "x".join(map(str, x))
    if isinstance(x, tuple) and isinstance(x[0], int)
    else (x or "paper" if isinstance(x, str) else "+".join(x))
  ),
)
@pytest.mark.slow
def test_plan_agrees_with_memory_analysis(shape, remat, phases, method):
  from markovian_jax.planning import compile as plan_compile
  from markovian_jax.planning import memory as plan_memory
  from markovian_jax.runtime import sharding

  spec, model, w = _small(remat, method)
  # The step's answer-row backward as the plan reads it from the config (a method's answer term).
  w = dataclasses.replace(w, reward_grad=plan.workload(spec)[0].reward_grad)
  assert w.reward_grad is bool(method)
  mesh = sharding.make_mesh(shape)
  p = plan_memory.plan(model, w, mesh)
  persistent = {i.name: i.bytes for i in p.items if i.phase == "persistent"}
  for phase, compiled in plan_compile.compile_phases(spec, model, mesh, w, phases).items():
    got = plan_compile.compiler_bytes(compiled)
    args = persistent["base weights"] + persistent["LoRA params (fp32)"]
    args += persistent["AdamW state (fp32)"] if phase == "update" else 0
    temps = got["temporaries"] + got["outputs"] - got["aliased"]
    where = f"{phase} on {shape}: plan {args}/{p.total(phase)}, compiler {got}"
    assert abs(args - got["arguments"]) <= ARGUMENTS_MARGIN * got["arguments"], where
    answer_grad = phase == "update" and w.reward_grad
    ratio = ANSWER_GRAD_TEMPORARIES_RATIO if answer_grad else TEMPORARIES_RATIO
    margin = ANSWER_GRAD_TOTAL_MARGIN if answer_grad else TOTAL_MARGIN
    assert ratio[0] <= p.total(phase) / temps <= ratio[1], where
    total = args + p.total(phase)
    assert abs(total - got["arguments"] - temps) <= margin * (got["arguments"] + temps), where


@pytest.mark.parametrize("estimator, full", [("full", True), ("k3", False), ("k1", False)])
def test_workload_is_built_from_the_config(estimator, full):
  """plan.workload reads the step's shapes from the RunSpec: the exact KL's reference logits are
  kept for the backward only with kl_estimator='full' (k1/k2/k3 gather the reference's log-probs
  of the sampled tokens, without gradient); Q, G, K, PPO minibatches, the paper's reward
  gradient and the question in the reader's prompt all follow their keys."""
  c = importlib.import_module("configs.gsm8k").get_config()
  c.objective.kl_estimator = estimator
  w, _ = plan.workload(config_validation.validate(c))
  assert w.kl_full is full
  assert (w.questions, w.group, w.cot, w.minibatches, w.reward_grad) == (1, 12, 100, 1, False)
  c.objective.kind, c.objective.ppo_minibatches, c.train.questions_per_step = "ppo", 2, 2
  c.objective.reward_grad, c.sampling.cot_length = "paper", 40
  w2, _ = plan.workload(config_validation.validate(c), prompt_length=100)
  assert (w2.questions, w2.cot, w2.minibatches, w2.reward_grad, w2.prompt) == (2, 40, 2, True, 128)
  c.prompt.markovian = False  # the non-Markovian reader's rows hold the question's prompt too
  w3, _ = plan.workload(config_validation.validate(c), prompt_length=100)
  assert w3.answer - w2.answer in range(w2.prompt - 31, w2.prompt + 32)


def test_plan_through_a_minus_one_mesh():
  """mesh.shape with a -1 is resolved against the device count given (or present): the rows
  rule, the memory plan, the verdict, the fixes and the notes are those of the explicit mesh,
  on a device that fits the step and on one that does not (so the fixes are computed)."""
  import dataclasses

  c = importlib.import_module("configs.gsm8k").get_config()
  c.model.path = LLAMA_8B

  def make(shape, memory_gib, devices=4):
    c.mesh.shape = shape
    return plan.make_plan(
      config_validation.validate(c), num_devices=devices, device_memory_gib=memory_gib
    )

  for shape, explicit in (((-1, 1, 1), (4, 1, 1)), ((-1, 1, 2), (2, 1, 2))):
    for memory_gib in (80.0, 8.0):
      p, want = make(shape, memory_gib), make(explicit, memory_gib)
      assert tuple(p.mesh) == explicit
      assert dataclasses.replace(p, spec=None) == dataclasses.replace(want, spec=None)
      assert plan.describe(p) == plan.describe(want)
      assert p.fits is (memory_gib == 80.0) and bool(p.fixes) is not p.fits, (shape, p.fixes)
  with pytest.raises(InvalidConfig, match="^config.train.questions_per_step: 12 rows"):
    make((-1, 1, 1), 80.0, devices=8)  # 12 rows over 8 devices


def test_measured_prompt_length_is_the_longest_tokenized_prompt(tiny_model_dir):
  """Repeated questions (a generated task draws the same sum many times) are measured once; the
  result is the longest CoT prompt the tokenizer makes of any example, counted here one by one."""
  from markovian_jax import data as data_lib
  from markovian_jax.data.records import Example
  from markovian_jax.models import load_tokenizer

  tok = load_tokenizer(tiny_model_dir)
  spec = preset_spec("1xh100")
  questions = ["1 + 2", "what is 17 + 3 + 5 + 11?", "1 + 2", "a longer question " * 7, "9 + 9"]
  examples = [Example(question=q, answer="3", id=f"t/{i}") for i, q in enumerate(questions * 50)]
  expected = max(
    len(
      tok(
        data_lib.cot_prompt(
          spec.task,
          q,
          spec.sampling.cot_length,
          target_length=spec.data.target_length,
          prompt_format=spec.prompt.format,
          tokenizer=tok,
        )
      )["input_ids"]
    )
    for q in questions
  )
  assert plan.prompt_length(spec, tok, examples) == expected
  assert plan.prompt_length(spec, tok, examples[:3]) < expected  # the long one is not among them


def test_nover_plans_its_ema_adapter_copy_and_nothing_else():
  """NOVER keeps an EMA copy of the adapter (its scorer and KL reference): the plan of its step
  holds one more persistent item, of exactly the adapter's bytes (the LoRA params alone: the copy
  runs on the shared base weights), and the peak grows by that much. The 8B on one H100, rank 8
  on all seven linear targets, fp32: 32 layers x 8 x (in + out) summed over the targets x 4."""
  import dataclasses

  from markovian_jax.planning import memory

  c = base.apply_arg(base.with_preset(base.get_config("gsm8k"), "1xh100"), "nover")
  p = plan.make_plan(config_validation.validate(c))
  assert p.workload.ema_adapter
  assert not plan.workload(preset_spec("1xh100"))[0].ema_adapter
  in_out = 2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)  # q o, k v, gate up down
  adapter = 32 * 8 * in_out * 4
  without = memory.plan(p.model, dataclasses.replace(p.workload, ema_adapter=False), p.mesh)
  added = [i for i in p.memory.items if i not in without.items]
  assert [(i.phase, i.name, i.bytes) for i in added] == [
    ("persistent", "EMA scorer adapter", adapter)
  ]
  assert p.memory.persistent - without.persistent == adapter
  assert p.memory.peak - without.peak == adapter
  assert "EMA scorer adapter" in plan.describe(p)
