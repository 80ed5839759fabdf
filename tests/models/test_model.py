"""Model, LoRA and sharding behaviour that needs no external reference."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from markovian_jax.models import (
  ConfigError,
  DecoderConfig,
  init_lora,
  init_params,
  logits,
  merge,
  rope,
)
from markovian_jax.models.lora import num_params
from markovian_jax.runtime import sharding
from tests import helpers

# Logits and hidden states of two float32 programs (merged weights, padding, sharding, a shared
# prefix): elements near 0 carry the rounding of sums whose terms are as large as the largest
# element, so 32 float32 ulps of max|value| (measured: <= 5).
ULPS = 32

# The published Meta-Llama-3.1-8B config.json (fields that matter to the architecture).
LLAMA31_8B_CONFIG = json.loads("""{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256}""")


@pytest.fixture(scope="module")
def model(tiny_config):
  params = init_params(tiny_config, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, tiny_config.vocab_size)
  return tiny_config, params, ids


def _perturbed_lora(config, seed=2):
  lora = init_lora(config, jax.random.PRNGKey(seed))
  return jax.tree.map(
    lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), lora
  )


def test_llama31_8b_shapes_without_allocation(tmp_path):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(LLAMA31_8B_CONFIG))
  config = DecoderConfig.from_json_file(str(path), param_dtype="bfloat16", dtype="bfloat16")
  assert config.rope_scaling.factor == 8.0 and config.rope_theta == 500000.0
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  assert num_params(shapes) == 8_030_261_248 == config.num_params
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype("bfloat16")}
  lora = jax.eval_shape(lambda: init_lora(config, jax.random.PRNGKey(0), rank=8))
  assert num_params(lora) == 20_971_520


def test_llama3_rope_scaling_matches_hand_computation():
  # head_dim 8, theta 1e4 -> frequencies [1, .1, .01, .001], wavelengths [6.3, 62.8, 628, 6283].
  # Original context 128, low 1, high 4: wavelengths > 128 are divided by 8, < 32 kept, and
  # 62.8 lies in the medium band, interpolated with smooth = (128 / 62.8 - 1) / (4 - 1).
  from markovian_jax.models import RopeScaling

  cfg = DecoderConfig(
    vocab_size=8,
    hidden_size=8,
    intermediate_size=8,
    num_layers=1,
    num_heads=1,
    num_kv_heads=1,
    head_dim=8,
    rope_theta=10000.0,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 128),
  )
  base = np.array([1.0, 0.1, 0.01, 0.001])
  smooth = (128 / (2 * np.pi / 0.1) - 1) / 3
  expected = np.array([1.0, (1 - smooth) * 0.1 / 8 + smooth * 0.1, 0.01 / 8, 0.001 / 8])
  np.testing.assert_allclose(rope.inverse_frequencies(cfg), expected, rtol=1e-12)
  np.testing.assert_allclose(
    rope.inverse_frequencies(cfg.replace(rope_scaling=None)), base, rtol=1e-12
  )


def test_zero_b_adapter_is_the_base_model(model):
  config, params, ids = model
  base = logits(config, params, ids)
  fresh = init_lora(config, jax.random.PRNGKey(3))
  assert all(
    np.all(np.asarray(l["b"]) == 0) for g in fresh.params["layers"].values() for l in g.values()
  )
  np.testing.assert_array_equal(np.asarray(logits(config, params, ids, fresh)), np.asarray(base))


def test_merge_equals_unmerged_forward(model):
  config, params, ids = model
  lora = _perturbed_lora(config)
  unmerged = logits(config, params, ids, lora)
  merged = logits(config, merge(params, lora), ids)
  assert float(jnp.abs(unmerged - logits(config, params, ids)).max()) > 1e-2  # the adapter matters
  np.testing.assert_allclose(merged, unmerged, rtol=0, atol=helpers.ulps(ULPS, of=unmerged))


def test_lora_dropout_only_in_train_mode(model):
  from markovian_jax.models import forward

  config, params, ids = model
  lora = _perturbed_lora(config)
  h1, _ = forward(config, params, ids, lora=lora)
  h2, _ = forward(config, params, ids, lora=lora)
  h3, _ = forward(config, params, ids, lora=lora, dropout_rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(h1), np.asarray(h2))
  assert float(jnp.abs(h3 - h1).max()) > 1e-4


def test_left_padding_is_exact(model):
  config, params, ids = model
  full = logits(config, params, ids)
  pad = 5
  padded = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), ids[:, :-pad]], axis=1)
  mask = jnp.arange(padded.shape[1])[None, :] >= pad
  out = logits(config, params, padded, attention_mask=jnp.broadcast_to(mask, padded.shape))
  np.testing.assert_allclose(
    np.asarray(out[:, pad:]), np.asarray(full[:, :-pad]), rtol=0, atol=helpers.ulps(ULPS, of=full)
  )


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_forward_matches_single_device(model, shape):
  config, params, ids = model
  ids8 = jnp.tile(ids, (4, 1))  # batch 8 so every batch sharding divides it
  lora = _perturbed_lora(config)
  expected = np.asarray(logits(config, params, ids8, lora))
  mesh = sharding.make_mesh(shape)
  p_sh = sharding.param_shardings(params, mesh)
  sharded = jax.device_put(params, p_sh)
  sharded_lora = jax.device_put(lora, sharding.param_shardings(lora, mesh))
  # Parameters really are laid out as the rules table says.
  for path, leaf in jax.tree_util.tree_leaves_with_path(sharded):
    axes = sharding.param_logical_axes(sharding.path_str(path), leaf.ndim)
    assert leaf.sharding.spec == sharding.logical_to_spec(axes, leaf.shape, mesh)
  q = sharded["layers"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (
    q.shape[0],
    q.shape[1] // shape[1],
    q.shape[2] // shape[2],
  )
  ids_sh = jax.device_put(ids8, sharding.batch_sharding(mesh, ids8.shape))
  fn = jax.jit(lambda p, l, t: logits(config, p, t, l))
  out = fn(sharded, sharded_lora, ids_sh)
  np.testing.assert_allclose(
    np.asarray(out), expected, rtol=0, atol=helpers.ulps(ULPS, of=expected)
  )


def test_mesh_shape_resolution_and_errors():
  assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.resolve_mesh_shape((4, 2, 2), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.resolve_mesh_shape((-1, -1, 1), 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.resolve_mesh_shape((3, -1, 1), 8)


def test_config_errors():
  with pytest.raises(ConfigError, match="model_type='gemma3'"):
    DecoderConfig.from_hf({"model_type": "gemma3", "vocab_size": 8})
  with pytest.raises(ConfigError, match="missing required keys"):
    DecoderConfig.from_hf({"model_type": "llama", "vocab_size": 8})
  bad_rope = dict(LLAMA31_8B_CONFIG, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  with pytest.raises(ConfigError, match="yarn"):
    DecoderConfig.from_hf(bad_rope)
  with pytest.raises(FileNotFoundError):
    DecoderConfig.from_json_file("/nonexistent/config.json")


def test_both_rope_layouts_give_the_same_config():
  v5 = dict(LLAMA31_8B_CONFIG)
  scaling = v5.pop("rope_scaling")
  v5["rope_parameters"] = {**scaling, "rope_theta": v5.pop("rope_theta")}
  assert DecoderConfig.from_hf(v5) == DecoderConfig.from_hf(LLAMA31_8B_CONFIG)
  # to_hf round-trips.
  c = DecoderConfig.from_hf(LLAMA31_8B_CONFIG)
  assert DecoderConfig.from_hf(c.to_hf()) == c


def test_forward_with_prefix_equals_forward_on_concatenated_rows(model):
  """G continuations of Q ragged prompts through the shared-prefix path give the hidden states,
  and the LoRA gradient, of `forward` on [prompt; continuation] rows (fp32)."""
  from markovian_jax.models import decoder

  config, params, _ = model
  lora = _perturbed_lora(config)
  q, g, p, t = 2, 3, 9, 6
  rng = np.random.default_rng(0)
  prefix = rng.integers(3, config.vocab_size, (q, p)).astype(np.int32)
  pmask = np.ones((q, p), bool)
  pmask[1, :4] = False  # a shorter, left-padded second prompt
  cont = rng.integers(3, config.vocab_size, (q * g, t)).astype(np.int32)
  cmask = np.ones((q * g, t), bool)
  cmask[4, -2:] = False  # a continuation that ended early (right padding)
  full = np.concatenate([np.repeat(prefix, g, axis=0), cont], axis=1)
  fmask = np.concatenate([np.repeat(pmask, g, axis=0), cmask], axis=1)
  ct = jnp.asarray(rng.normal(size=(q * g, t, config.hidden_size)), jnp.float32)
  ct_pre = jnp.asarray(rng.normal(size=(q, p, config.hidden_size)), jnp.float32)

  def ours(lora):
    hp, h = decoder.forward_with_prefix(
      config, params, prefix, pmask, cont, attention_mask=cmask, lora=lora
    )
    return hp, h

  def reference(lora):
    h, _ = decoder.forward(config, params, full, attention_mask=fmask, lora=lora)
    return h[::g, :p], h[:, p:]

  def loss(fn, lora):
    hp, h = fn(lora)
    return jnp.sum(jnp.where(cmask[..., None], h, 0) * ct) + jnp.sum(
      jnp.where(pmask[..., None], hp, 0) * ct_pre
    )

  # Jitted, as training runs them (op-by-op, every primitive would compile on its own).
  (hp, h), (hp_ref, h_ref) = jax.jit(ours)(lora), jax.jit(reference)(lora)
  np.testing.assert_allclose(
    np.asarray(h)[cmask], np.asarray(h_ref)[cmask], rtol=0, atol=helpers.ulps(ULPS, of=h_ref)
  )
  np.testing.assert_allclose(
    np.asarray(hp)[pmask], np.asarray(hp_ref)[pmask], rtol=0, atol=helpers.ulps(ULPS, of=hp_ref)
  )
  grad = jax.jit(jax.grad(lambda l: loss(ours, l)))(lora)
  grad_ref = jax.jit(jax.grad(lambda l: loss(reference, l)))(lora)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(b))))
  with pytest.raises(ValueError, match="Q dividing"):
    decoder.forward_with_prefix(config, params, prefix, pmask, cont[:5])
