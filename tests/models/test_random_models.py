"""`config.model.path=random:<name>`: the published shapes with random weights and SmolLM2's
tokenizer (no download), the ids beyond the tokenizer masked out of every softmax, and the same
memory plan as the real checkpoint. (`train --config.model.path=random:tiny` for three steps:
tests/benchmarks/test_gpu_first_run.py.)"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from markovian_jax.models import ConfigError, decoder, random_models
from markovian_jax.planning import plan
from markovian_jax.training import config_validation
from tests import helpers

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def test_the_contract_names_build_the_published_shapes():
  """random:llama-3.1-8b and random:qwen3-4b are the published configs (8,030,261,248 and
  4,022,468,096 parameters by hand from config.json), with the ids past SmolLM2's 49,152
  masked; random:tiny fits the tokenizer exactly (nothing masked)."""
  llama8 = random_models.random_config("random:llama-3.1-8b")
  assert llama8.num_params == 8_030_261_248
  assert (
    llama8.vocab_size,
    llama8.num_layers,
    llama8.hidden_size,
    llama8.num_kv_heads,
    llama8.rope_scaling.factor,
  ) == (128256, 32, 4096, 8, 8.0)
  assert llama8.usable_vocab == 49152 and llama8.eos_token_ids == (128001, 128008, 128009)
  qwen = random_models.random_config("random:qwen3-4b")
  # embed 151936*2560 (tied) + 36 * (attn 2560*4096*2 + 2560*1024*2 + mlp 3*2560*9728
  # + norms 2*2560 + qk norms 2*128) + final norm 2560
  layer = 2560 * 4096 * 2 + 2560 * 1024 * 2 + 3 * 2560 * 9728 + 2 * 2560 + 2 * 128
  assert qwen.num_params == 151936 * 2560 + 36 * layer + 2560 == 4_022_468_096
  assert (qwen.model_type, qwen.qk_norm, qwen.tie_word_embeddings) == ("qwen3", True, True)
  tiny = random_models.random_config("random:tiny", "float32")
  assert tiny.vocab_size == 49152 and tiny.usable_vocab is None
  with pytest.raises(
    ConfigError,
    match=r"^config.model.path='random:llama-9b': unknown random "
    r"model; choose one of \[.*'random:llama-3.1-8b'.*'random:tiny'\]$",
  ):
    random_models.random_config("random:llama-9b")


def test_masked_ids_are_never_sampled_and_carry_no_probability():
  """A head that makes the masked ids the largest logits: `project` gives them MASKED_LOGIT, the
  log-softmax over the rest equals numpy's over the usable ids alone, and greedy / sampled
  tokens stay below usable_vocab."""
  from markovian_jax import sampling

  c = helpers.tiny_config(param_dtype="float32", dtype="float32", usable_vocab=100)
  params = decoder.init_params(c, jax.random.PRNGKey(0))
  head = np.asarray(params["lm_head"]["kernel"]).copy()
  head[:, 100:] *= 50.0  # unmasked, ids >= 100 would win nearly every draw
  params["lm_head"]["kernel"] = jnp.asarray(head)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, 12)), jnp.int32)
  logits = jax.jit(decoder.logits, static_argnums=0)
  got = np.asarray(logits(c, params, tokens))
  raw = np.asarray(logits(c.replace(usable_vocab=None), params, tokens), np.float64)
  assert (got[..., 100:] == decoder.MASKED_LOGIT).all()
  ref = (
    raw[..., :100]
    - np.log(np.exp(raw[..., :100] - raw[..., :100].max(-1, keepdims=True)).sum(-1, keepdims=True))
    - raw[..., :100].max(-1, keepdims=True)
  )
  lsm = np.asarray(jax.nn.log_softmax(jnp.asarray(got), axis=-1), np.float64)
  np.testing.assert_allclose(lsm[..., :100], ref, rtol=helpers.ulps(16))
  assert (raw[..., 100:].max(-1) > raw[..., :100].max(-1)).mean() > 0.9  # the mask matters
  out = sampling.generate(
    c, params, np.asarray(tokens), max_new_tokens=16, rng=0, temperature=1.0, eos_ids=()
  )
  assert np.asarray(out.tokens).max() < 100


@pytest.mark.parametrize("preset", ["1xh100", "8xh100"])
def test_plan_of_random_8b_is_the_plan_of_the_real_8b(preset):
  """`plan --config.model.path=random:llama-3.1-8b` gives the plan of Llama-3.1-8B-Instruct's
  published config: the same items byte for byte, peak and verdict."""
  base = importlib.import_module("configs.base")

  def make(path):
    c = base.with_preset(base.get_config("gsm8k"), preset)
    c.model.path = path
    return plan.make_plan(config_validation.validate(c))

  rand, real = make("random:llama-3.1-8b"), make(LLAMA_8B)
  assert [(i.name, i.bytes) for i in rand.memory.items] == [
    (i.name, i.bytes) for i in real.memory.items
  ]
  assert (rand.memory.peak, rand.fits, tuple(rand.mesh), rand.fixes, rand.notes, rand.workload) == (
    real.memory.peak,
    real.fits,
    tuple(real.mesh),
    real.fixes,
    real.notes,
    real.workload,
  )
  assert rand.memory.peak > 16e9  # the 8B's weights are in it
  # What `plan` prints: the same, but for the model line's source.
  text = lambda p: [
    ln
    for ln in plan.describe(p).splitlines()  # noqa: E731
    if not ln.startswith("model ")
  ]
  assert text(rand) == text(real)
  assert "random weights with the published shapes of " + LLAMA_8B in rand.model_source
