"""Every device does work: the rows rule, the presets' batches, the sampler's padded rows and decode
layout, and a train step on each preset's layout scaled to 8 fake CPU devices."""

import functools
import importlib
import math
import re

import jax
import numpy as np
import pytest

from markovian_jax.runtime import presets, sharding
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.training import config_validation
from tests import helpers


def gsm8k(**overrides):
  c = importlib.import_module("configs.gsm8k").get_config()
  for k, v in overrides.items():
    section, _, leaf = k.rpartition(".")
    c[section][leaf] = v
  return c


# ------------------------------------------------------------------ tables and rules


def test_shard_shape_unsplit_and_padding():
  sizes = (2, 2, 4)
  q = ("layers", "embed", "q_heads")
  assert sharding.shard_shape(q, (3, 64, 32), sizes) == (3, 32, 8)
  assert sharding.unsplit(q, (3, 64, 32), sizes) == []
  # 2 kv heads * 16 = 32 columns split by tensor=4, but 6 does not: reported, not dropped silently.
  assert sharding.unsplit(q, (3, 64, 6), sizes) == [(2, "q_heads", "tensor", 4)]
  assert sharding.shard_shape(q, (3, 64, 6), sizes) == (3, 32, 6)
  # Decode layout: fsdp joins tensor on the heads, the model dim stays whole.
  assert sharding.shard_shape(q, (3, 64, 32), sizes, sharding.DECODE_RULES) == (3, 64, 4)
  assert sharding.batch_split(sizes) == 4
  assert sharding.batch_split(sizes, sharding.DECODE_RULES) == 2
  assert sharding.pad_rows(13, (8, 1, 1), sharding.DECODE_RULES) == 16
  assert sharding.pad_rows(12, (8, 1, 1), sharding.DECODE_RULES) == 16
  assert sharding.pad_rows(26, (2, 4, 1), sharding.DECODE_RULES) == 26


def test_presets_imply_batches_that_split():
  base = importlib.import_module("configs.base")
  want = {"1xh100": 1, "8xh100": 2, "2x8xh100": 4, "v5e-8": 1, "v5e-32": 2, "v5p-8": 1, "v5p-64": 8}
  for name, q in want.items():
    spec = config_validation.validate(base.with_preset(base.get_config("gsm8k"), name))
    split = presets.row_split(spec.mesh.resolved)
    assert spec.train.questions_per_step == q and spec.train.group_size == 12, name
    assert spec.train.rows % split == 0 and spec.train.rows // split >= 1, name
    # The preset config files are the same thing.
    path = helpers.REPO / "configs" / "presets" / f"{name}.py"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    module.__spec__.loader.exec_module(module)
    assert module.get_config("svamp").train.questions_per_step == q
  assert presets.questions_for((8, 1, 1), 16) == 1  # wiki_continuation's G=16 splits already


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      {"mesh.preset": "8xh100"},
      "config.train.questions_per_step: 12 rows (questions_per_step=1 x group_size=12) do not "
      "split over data*fsdp=8 (mesh.preset=8xh100 (8, 1, 1)): set train.questions_per_step to a "
      "multiple of 2",
    ),
    (
      {"mesh.shape": (4, 8, 1)},
      "config.train.questions_per_step: 12 rows (questions_per_step=1 x group_size=12) do not "
      "split over data*fsdp=32 (mesh.shape=(4, 8, 1)): set train.questions_per_step to a multiple "
      "of 8",
    ),
    (
      {
        "mesh.preset": "8xh100",
        "train.questions_per_step": 2,
        "objective.kind": "ppo",
        "objective.ppo_minibatches": 4,
      },
      "config.objective.ppo_minibatches: 4 minibatches of 6 rows do not split over data*fsdp=8",
    ),
  ],
)
def test_rows_that_do_not_split_are_refused(overrides, message):
  with pytest.raises(InvalidConfig) as e:
    config_validation.validate(gsm8k(**overrides))
  assert str(e.value).startswith(message), str(e.value)


def test_rows_rule_lenient_only_when_asked(caplog):
  config_validation.validate(gsm8k(**{"mesh.preset": "8xh100", "train.questions_per_step": 2}))
  config_validation.validate(
    gsm8k(**{"mesh.preset": "8xh100", "train.group_size": 8, "train.questions_per_step": 2})
  )  # Q=2, G=8 trains
  with caplog.at_level("WARNING"):
    config_validation.validate(gsm8k(**{"mesh.preset": "8xh100", "mesh.allow_replication": True}))
  assert "do not split over data*fsdp=8" in caplog.text
  # A mesh that counts its devices (-1) is checked once they are known (plan.check).
  config_validation.validate(gsm8k())


# ------------------------------------------------------------------ the sampler


@pytest.fixture(scope="module")
def model():
  config = helpers.tiny_config(num_heads=8, num_kv_heads=4)
  return (config, *helpers.random_model(config))


def test_sampler_pads_the_reference_rows_and_splits_them(model):
  """Q=2 x G=4 policy rows + 2 CoT' rows = 10, which data=4 does not divide: padded to 12, and
  every output is what one device samples."""
  from markovian_jax import sampling

  config, params, lora = model
  prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
  kw = dict(
    lora=lora,
    max_new_tokens=6,
    rng=jax.random.PRNGKey(3),
    temperature=0.8,
    num_samples=4,
    eos_ids=(2,),
  )
  one, one_ref = sampling.generate_with_reference(config, params, prompts, **kw)
  mesh = sharding.make_mesh((4, 1, 2))
  sharded = jax.device_put(params, sharding.param_shardings(params, mesh))
  lora_sh = lora.replace(
    params=jax.device_put(lora.params, sharding.param_shardings(lora.params, mesh))
  )
  out, ref = sampling.generate_with_reference(config, sharded, prompts, **{**kw, "lora": lora_sh})
  assert {s.data.shape for s in out.tokens.addressable_shards} == {(2, 6)}  # 8 rows / data=4
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(one.tokens))
  np.testing.assert_array_equal(np.asarray(ref.tokens), np.asarray(one_ref.tokens))
  np.testing.assert_allclose(
    np.asarray(out.logprobs), np.asarray(one.logprobs), rtol=helpers.ulps(16)
  )  # log-probs (~ -6) of two float32 programs
  np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(one.lengths))


def _loop_all_gathers(text: str) -> list:
  """Bytes of every all-gather inside a while loop body (or what it calls) of an HLO module."""
  blocks = dict(re.findall(r"\n(?:ENTRY )?%([\w.-]+) [^\n]*\{\n(.*?)\n\}", text, re.S))
  todo = [b for body in re.findall(r"body=%([\w.-]+)", text) for b in [body]]
  seen, out = set(), []
  while todo:
    name = todo.pop()
    if name in seen or name not in blocks:
      continue
    seen.add(name)
    todo += re.findall(r"(?:calls|body|condition|to_apply)=%([\w.-]+)", blocks[name])
    for dt, dims in re.findall(r"= (f32|bf16)\[([0-9,]*)\]\S* all-gather", blocks[name]):
      out.append((4 if dt == "f32" else 2) * math.prod(int(d) for d in dims.split(",") if d))
  return out


@pytest.mark.slow
def test_decode_does_not_all_gather_weights(monkeypatch):
  """With fsdp=4 the decode loop moves activations only: its largest all-gather is far below one
  layer's weight matrix. The control, the train layout (rows over data x fsdp, weights split on
  the model dim), gathers weights inside the loop."""
  from markovian_jax.planning import compile as plan_compile
  from markovian_jax.planning import memory as plan_memory
  from markovian_jax.sampling import sampler

  config = helpers.tiny_config(
    hidden_size=256, intermediate_size=1024, num_heads=8, num_kv_heads=8, head_dim=32
  )
  spec = config_validation.validate(gsm8k(**{"train.group_size": 2}))
  mesh = sharding.make_mesh((1, 4, 2))
  weight = 256 * 1024 * 4 // 2  # one mlp kernel, split by tensor=2
  work = functools.partial(plan_memory.Workload, group=2, cot=4, prompt=16, answer=32, window=8)
  decode = _loop_all_gathers(
    plan_compile.compile_phases(spec, config, mesh, work(questions=2), phases=("sample",))[
      "sample"
    ].as_text()
  )
  assert max(decode, default=0) < weight // 8, decode
  monkeypatch.setattr(sampler, "_RULES", sharding.DEFAULT_RULES)
  control = _loop_all_gathers(
    plan_compile.compile_phases(spec, config, mesh, work(questions=4), phases=("sample",))[
      "sample"
    ].as_text()
  )
  assert max(control) >= weight // 4, control


# ------------------------------------------------------------------ a train step per layout

# Each preset's layout on 8 devices: 8xh100 / 2x8xh100 / v5p-64 (data only), v5p-8 (4 devices),
# v5e-8 / v5e-32 (tensor=4), and FSDP with tensor (the sampler then decodes in its own layout).
LAYOUTS = [(8, 1, 1), (4, 1, 1), (2, 1, 4), (2, 2, 2)]
Q, G = 2, 4  # 8 rows: every layout's data x fsdp divides them


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_path):
  """A tiny random Llama with 4 kv heads (tensor=4 splits them) and SmolLM2's tokenizer."""
  from markovian_jax.models import hf, init_params, load_tokenizer

  tok = load_tokenizer(smollm2_path)
  config = helpers.tiny_config(
    vocab_size=len(tok),
    bos_token_id=tok.bos_token_id,
    eos_token_ids=(tok.eos_token_id,),
    rope_scaling=None,
    num_heads=8,
    num_kv_heads=4,
  )
  d = str(tmp_path_factory.mktemp("tiny_llama_kv4"))
  hf.save_hf(config, init_params(config, jax.random.PRNGKey(0)), d, tokenizer=tok)
  return d


def _trainer(model_dir, workdir, shape):
  from markovian_jax.trainer import Trainer
  from tests.helpers import make_config

  return Trainer(
    make_config(
      model_dir,
      workdir,
      **{"mesh.shape": shape, "train.questions_per_step": Q, "train.group_size": G},
    )
  )


def _step(trainer):
  """The step's rollout, update batch, the sampler's device output, and the loss and LoRA
  gradient on the batch before any optimizer step."""
  from markovian_jax import sampling
  from markovian_jax.training import pipeline, train_step

  ctx, spec = trainer.ctx, trainer.spec
  examples = trainer.train_stream.take(Q)
  key = jax.random.PRNGKey(7)
  ro = pipeline.rollout(ctx, spec, trainer.lora, None, examples, key)
  # The same call rollout made (a cache hit), to look at the sampler's device arrays.
  k, s = spec.sampling.cot_length, spec.sampling
  samples, _ = sampling.generate_with_reference(
    ctx.model,
    ctx.params,
    [ctx.cot_prompt_ids(ex) for ex in examples],
    lora=trainer.lora,
    max_new_tokens=k,
    min_new_tokens=k,
    eos_ids=ctx.eos_ids,
    rng=key,
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
    num_samples=G,
  )
  sc = pipeline.score(ctx, trainer.programs, trainer.lora, None, ro)
  tg, _, _ = pipeline.targets(ctx, trainer.programs, sc, trainer.baseline_state)
  batch = pipeline.policy_batch(ctx, ro, sc)
  fn = jax.jit(functools.partial(train_step.loss_and_grads, trainer.settings))
  loss, _, grads = fn(ctx.params, trainer.lora, batch, tg)
  return ro, batch, samples, float(loss), [np.asarray(g) for g in jax.tree.leaves(grads.params)]


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
  return _step(_trainer(model_dir, tmp_path_factory.mktemp("one"), (1, 1, 1)))


def _row_slices(x: jax.Array) -> dict:
  """{device: (start, stop)} of the rows each device holds."""
  return {
    s.device: (s.index[0].start or 0, s.index[0].stop or x.shape[0]) for s in x.addressable_shards
  }


@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.slow
def test_train_step_splits_rows_and_weights(model_dir, tmp_path, single, shape):
  """Every data x fsdp shard holds its own rows of every row array (shard shapes asserted), the
  base weights shrink by fsdp x tensor per device, and the loss and LoRA gradient before the
  optimizer equal the 1-device run: |loss difference| <= 1e-5 x max(1, |loss|), gradients within
  rtol 1e-3 + 1e-4 x the largest gradient (reduction order is all sharding may change)."""
  d, f, t = shape
  trainer = _trainer(model_dir, tmp_path, shape)
  ro, batch, samples, loss, grads = _step(trainer)
  ro1, _, _, loss1, grads1 = single
  n = Q * G
  # Rows: the update's batch, split over data x fsdp (tensor peers share theirs).
  for name in (
    "cot_tokens",
    "cot_mask",
    "behaviour_logprobs",
    "answer_tokens",
    "answer_span",
    "answer_logprobs",
    "baseline_scores",
  ):
    x = getattr(batch, name)
    slices = _row_slices(x)
    assert {s.data.shape[0] for s in x.addressable_shards} == {n // (d * f)}, name
    assert len(set(slices.values())) == d * f, name
    assert sorted(set(slices.values())) == [
      (i * n // (d * f), (i + 1) * n // (d * f)) for i in range(d * f)
    ], name
  # The sampler's rows (decode layout: split over data; fsdp and tensor split the weights).
  assert {s.data.shape[0] for s in samples.tokens.addressable_shards} == {n // d}
  assert len(set(_row_slices(samples.tokens).values())) == d
  # Weights: every kernel holds 1 / (fsdp x tensor) of itself on each device (the norms' scales
  # stay whole: 0.2% of the bytes).
  full = shard = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.ctx.params):
    if not sharding.path_str(path).endswith("/scale"):
      per_device = {s.data.nbytes for s in leaf.addressable_shards}
      assert per_device == {leaf.nbytes // (f * t)}, sharding.path_str(path)
      full += leaf.nbytes
      shard += per_device.pop()
  assert shard * f * t == full
  # The same step as on one device.
  np.testing.assert_array_equal(ro.cot_tokens, ro1.cot_tokens)
  assert abs(loss - loss1) <= 1e-5 * max(1.0, abs(loss1))
  scale = max(np.abs(g).max() for g in grads1)
  for a, b in zip(grads1, grads):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * scale)
