"""Every model family against transformers' own implementation, in float32 on CPU.

transformers writes a tiny random checkpoint of each family (no download); its biases and norm
weights are randomised too (transformers initialises them to 0 / 1, which would hide a dropped
bias or a swapped norm). Checks per family:
  - logits of a left-padded ragged batch, long enough to pass the original context where the
    family scales RoPE (Phi-3's longrope switches to its long factors there) and Mistral's sliding
    window: max |diff| <= 64 float32 ulps of max|logit| (two implementations: measured <= 13);
  - greedy generation through our KV-cache sampler equals transformers' `generate`;
  - KV-cache decode, one token at a time, equals the full recompute;
  - a PEFT adapter we export loads in transformers + peft and reproduces our logits, and reads
    back into the same adapter (LoRA on each family's own module names);
  - our full-weight writer (plain and with the adapter merged) loads in transformers;
  - `sample --lora` (GPT-2, Phi-3) prints transformers + peft's greedy continuation;
  - the Qwen3-4B/8B memory plans, and `train` refusing an unsupported model_type in one line.
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from markovian_jax.models import (
  ConfigError,
  DecoderConfig,
  decoder,
  hf,
  init_lora,
  load_checkpoint,
  logits,
  positions_from_mask,
)
from markovian_jax.models import lora as lora_lib
from markovian_jax.sampling import generate
from tests import helpers
from tests.family_cases import FAMILIES, torch_model

SEQ = 48  # past the 32-token original context of the longrope model, 6x Mistral's window of 8


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
  """(family, checkpoint dir, torch model, our config, our params)."""
  name = request.param
  path = str(tmp_path_factory.mktemp(name))
  model = torch_model(name, path)
  config, params = load_checkpoint(path)
  return name, path, model, config, params


def _torch_logits(model, ids, mask, positions):
  torch = helpers.require("torch")
  with torch.no_grad():
    return (
      model(
        torch.tensor(np.asarray(ids)),
        attention_mask=torch.tensor(np.asarray(mask, int)),
        position_ids=torch.tensor(np.asarray(positions)),
      )
      .logits.float()
      .numpy()
    )


def _ragged_batch(vocab, lengths, seq=SEQ, seed=1):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (len(lengths), seq))
  mask = np.arange(seq)[None, :] >= seq - np.array(lengths)[:, None]
  return np.where(mask, ids, 0), mask


def test_config_names_the_family(family):
  name, _, _, config, _ = family
  assert config.model_type == name
  expected = {
    "qwen3": dict(qk_norm=True, head_dim=24, tie_word_embeddings=True),
    "qwen2": dict(qkv_bias=True, tie_word_embeddings=False),
    "mistral": dict(sliding_window=8),
    "phi3": dict(fused_qkv=True, fused_gate_up=True),
    "gpt2": dict(
      position_kind="learned",
      norm_kind="layer",
      mlp_kind="gelu_tanh",
      fused_qkv=True,
      qkv_bias=True,
      out_bias=True,
      mlp_bias=True,
    ),
    "llama": dict(qkv_bias=False, qk_norm=False),
  }[name]
  assert {k: getattr(config, k) for k in expected} == expected
  # num_params counts exactly the loaded leaves.
  assert config.num_params == sum(x.size for x in jax.tree.leaves(family[4]))


def test_left_padded_logits_match_torch(family):
  name, _, model, config, params = family
  ids, mask = _ragged_batch(config.vocab_size, [SEQ, 37, 20])
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  out = np.asarray(logits(config, params, ids, attention_mask=mask))
  expected = _torch_logits(model, ids, mask, positions)
  assert np.abs(expected[mask]).max() > 1.0  # logits of the size of real ones
  np.testing.assert_allclose(
    out[mask], expected[mask], atol=helpers.ulps(64, of=expected[mask]), rtol=0
  )
  if name == "phi3":
    # Inside the original context the short factors apply: a batch that stays within it.
    ids, mask = _ragged_batch(config.vocab_size, [30, 12], seq=30)
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    out = np.asarray(logits(config, params, ids, attention_mask=mask))
    np.testing.assert_allclose(
      out[mask],
      _torch_logits(model, ids, mask, positions)[mask],
      atol=helpers.ulps(64, of=out[mask]),
      rtol=0,
    )


# What sets a family apart in the comparison above, where it has such a feature.
DISTINGUISHING = {
  "mistral": dict(sliding_window=None),
  "phi3": dict(rope_scaling=None),
  "qwen3": dict(qk_norm=False),
}


@pytest.mark.parametrize("family", list(DISTINGUISHING), indirect=True)
def test_sliding_window_and_longrope_are_what_the_comparison_sees(family):
  """Dropping the family's distinguishing feature changes the logits beyond the tolerance."""
  name, _, _, config, params = family
  ids, _ = _ragged_batch(config.vocab_size, [SEQ])
  changed = config.replace(**DISTINGUISHING[name])
  full = np.asarray(logits(config, params, ids))
  other = np.asarray(logits(changed, _drop_unused(changed, params), ids))
  assert np.abs(full - other).max() > 1e-2


def _drop_unused(config, params):
  want = jax.eval_shape(lambda: decoder.init_params(config, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda w, p: p, want, _subtree(params, want))


def _subtree(tree, like):
  if isinstance(like, dict):
    return {k: _subtree(tree[k], v) for k, v in like.items()}
  return tree


def test_greedy_generation_matches_torch(family):
  torch = helpers.require("torch")
  _, _, model, config, params = family
  prompts = [[1, 17, 45, 9, 120, 33], [1, 88, 5]]
  new = 12
  ours = generate(config, params, prompts, max_new_tokens=new, temperature=0.0, bucket=8)
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      theirs = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
      )[0, len(prompt) :].numpy()
    np.testing.assert_array_equal(np.asarray(ours.tokens[row]), theirs)


def test_cache_decode_equals_full_recompute(family):
  _, _, _, config, params = family
  ids, mask = _ragged_batch(config.vocab_size, [24, 15], seq=24, seed=3)
  full = np.asarray(logits(config, params, ids, attention_mask=mask))
  b, t = ids.shape
  cache = tuple(jnp.zeros(s, jnp.float32) for s in decoder.cache_shape(config, b, t))
  positions = positions_from_mask(jnp.asarray(mask))
  prefill = 10
  h, cache = decoder.forward(
    config,
    params,
    jnp.asarray(ids[:, :prefill]),
    attention_mask=jnp.asarray(mask[:, :prefill]),
    positions=positions[:, :prefill],
    cache=cache,
    cache_index=0,
    cache_mask=jnp.asarray(np.pad(mask[:, :prefill], ((0, 0), (0, t - prefill)))),
  )
  steps = [np.asarray(decoder.project(config, params, h))]

  @jax.jit  # one compile for every step: the slot is a traced index, as in the sampler
  def step(params, tok, tok_mask, pos, cache, index, valid):
    h, cache = decoder.forward(
      config,
      params,
      tok,
      attention_mask=tok_mask,
      positions=pos,
      cache=cache,
      cache_index=index,
      cache_mask=valid,
    )
    return decoder.project(config, params, h), cache

  for i in range(prefill, t):
    valid = np.pad(mask[:, : i + 1], ((0, 0), (0, t - i - 1)))
    out, cache = step(
      params,
      jnp.asarray(ids[:, i : i + 1]),
      jnp.asarray(mask[:, i : i + 1]),
      positions[:, i : i + 1],
      cache,
      jnp.int32(i),
      jnp.asarray(valid),
    )
    steps.append(np.asarray(out))
  decoded = np.concatenate(steps, axis=1)
  np.testing.assert_allclose(
    decoded[mask], full[mask], atol=helpers.ulps(64, of=full[mask]), rtol=0
  )


def _random_adapter(config):
  lora = init_lora(config, jax.random.PRNGKey(1), rank=4, alpha=8.0, dropout=0.0)
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key == "b" else x,
    lora.params,
  )
  return lora.replace(params=params)


PEFT_NAMES = {
  "qwen3": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
  "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
  "gpt2": ["c_attn", "c_fc", "c_proj"],
}


def test_peft_export_reproduces_our_logits_in_transformers(family, tmp_path):
  helpers.require("torch")
  peft = helpers.require("peft")
  name, path, model, config, params = family
  lora = _random_adapter(config)
  out = str(tmp_path / "adapter")
  hf.save_peft_adapter(lora, config, out, base_model_name_or_path=path)
  with open(os.path.join(out, hf.ADAPTER_CONFIG_NAME)) as f:
    target_modules = json.load(f)["target_modules"]
  if name in PEFT_NAMES:
    assert target_modules == PEFT_NAMES[name]
  ids, mask = _ragged_batch(config.vocab_size, [SEQ, 30], seed=4)
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  ours = np.asarray(logits(config, params, ids, lora, attention_mask=mask))
  base = np.asarray(logits(config, params, ids, attention_mask=mask))
  assert np.abs(ours - base)[mask].max() > 1e-2  # the adapter matters
  peft_model = peft.PeftModel.from_pretrained(model, out).eval()
  try:
    theirs = _torch_logits(peft_model, ids, mask, positions)
  finally:
    peft_model.unload()  # give the module-scoped torch model back without adapters
  np.testing.assert_allclose(
    ours[mask], theirs[mask], atol=helpers.ulps(64, of=theirs[mask]), rtol=0
  )
  back = hf.load_peft_adapter(out, config)
  assert back.targets == lora.targets
  chex.assert_trees_all_equal(back.params, lora.params)  # the same tree, leaf for leaf


def test_save_hf_round_trips_through_transformers(family, tmp_path):
  """Our writer's directory loads in the family's transformers class with the same logits."""
  transformers = helpers.require("transformers")
  name, _, model, config, params = family
  out = str(tmp_path / "saved")
  hf.save_hf(config, params, out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  ids, mask = _ragged_batch(config.vocab_size, [20, 11], seq=20, seed=5)
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  np.testing.assert_allclose(
    _torch_logits(reloaded.eval(), ids, mask, positions)[mask],
    _torch_logits(model, ids, mask, positions)[mask],
    atol=1e-5,
    rtol=0,
  )


def test_merged_export_loads_in_transformers(family, tmp_path):
  """`export --format=merged`'s writer: base + adapter folded, read by the family's transformers
  class, gives our base + LoRA logits."""
  transformers = helpers.require("transformers")
  _, _, _, config, params = family
  lora = _random_adapter(config)
  out = str(tmp_path / "merged")
  hf.save_merged_hf(config, params, lora, out)
  merged = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  ids, mask = _ragged_batch(config.vocab_size, [20, 11], seq=20, seed=6)
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  ours = np.asarray(logits(config, params, ids, lora, attention_mask=mask))
  np.testing.assert_allclose(
    _torch_logits(merged.eval(), ids, mask, positions)[mask],
    ours[mask],
    atol=helpers.ulps(64, of=ours[mask]),
    rtol=0,
  )


@pytest.mark.slow  # a sample subprocess per family
@pytest.mark.parametrize("name", ["gpt2", "phi3"])
def test_sample_cli_with_a_peft_adapter(name, tmp_path, smollm2_path):
  """`sample --checkpoint=<family dir> --lora=<PEFT dir> --temperature=0` prints transformers +
  peft's greedy continuation."""
  torch = helpers.require("torch")
  peft = helpers.require("peft")
  from markovian_jax.models import load_tokenizer

  tok = load_tokenizer(smollm2_path)
  path = str(tmp_path / name)
  model = torch_model(
    name, path, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
  )
  tok.save_pretrained(path)
  config, _ = load_checkpoint(path)
  adapter = str(tmp_path / "adapter")
  hf.save_peft_adapter(_random_adapter(config), config, adapter)
  prompt = "The capital of France is"
  proc = helpers.run_module(
    "markovian_jax.sample",
    f"--checkpoint={path}",
    f"--lora={adapter}",
    f"--prompt={prompt}",
    "--temperature=0",
    "--max_new_tokens=6",
    "--min_new_tokens=6",
    "--compilation_cache_dir=",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  ids = tok(prompt)["input_ids"]
  with torch.no_grad():
    theirs = (
      peft.PeftModel.from_pretrained(model, adapter)
      .eval()
      .generate(
        torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
      )[0, len(ids) :]
    )
  assert tok.decode(theirs, skip_special_tokens=True) in proc.stdout


def test_gpt2_original_upload_layout(tmp_path):
  """The original `gpt2` upload names its tensors without "transformer." and keeps the causal-mask
  buffers (h.{i}.attn.bias): both load into the same model."""
  import shutil

  from safetensors.numpy import load_file, save_file

  path = str(tmp_path / "gpt2")
  torch_model("gpt2", path)
  config, params = load_checkpoint(path)
  out = str(tmp_path / "gpt2_upload")
  shutil.copytree(path, out)
  tensors = load_file(os.path.join(out, hf.WEIGHTS_NAME))
  renamed = {
    k[len("transformer.") :]: v for k, v in tensors.items() if k.startswith("transformer.")
  }
  assert len(renamed) == len(tensors)
  for i in range(config.num_layers):
    renamed[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
  save_file(renamed, os.path.join(out, hf.WEIGHTS_NAME), metadata={"format": "pt"})
  _, loaded = load_checkpoint(out)
  chex.assert_trees_all_equal(loaded, params)  # the same tree, leaf for leaf


def test_lora_targets_follow_the_family():
  def cfg(**kw):
    return DecoderConfig(
      vocab_size=8,
      hidden_size=8,
      intermediate_size=12,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=4,
      **kw,
    )

  assert set(lora_lib.target_shapes(cfg(), lora_lib.ALL_LINEAR)) == {
    ("attn", n) for n in "qkvo"
  } | {("mlp", n) for n in ("gate", "up", "down")}
  phi = cfg(fused_qkv=True, fused_gate_up=True)
  assert lora_lib.target_shapes(phi, ("q", "v", "up")) == {
    ("attn", "qkv"): (8, 16),
    ("mlp", "gate_up"): (8, 24),
  }
  gpt2 = cfg(fused_qkv=True, mlp_kind="gelu_tanh")
  assert set(lora_lib.target_shapes(gpt2, lora_lib.ALL_LINEAR)) == {
    ("attn", "qkv"),
    ("attn", "o"),
    ("mlp", "up"),
    ("mlp", "down"),
  }
  with pytest.raises(ValueError, match="name no linear layer"):
    lora_lib.target_shapes(gpt2, ("gate",))


def test_unsupported_model_type_names_the_supported_families():
  with pytest.raises(
    ConfigError,
    match="model_type='gemma3'.*supported model types: llama, mistral, qwen2, qwen3, phi3, gpt2",
  ):
    DecoderConfig.from_hf({"model_type": "gemma3", "architectures": ["Gemma3ForCausalLM"]})


@pytest.mark.parametrize(
  "hub_id, num_params, tied",
  [("Qwen/Qwen3-4B", 4_022_468_096, True), ("Qwen/Qwen3-8B", 8_190_735_360, False)],
)
def test_qwen3_memory_plan_on_one_h100(hub_id, num_params, tied):
  """The paper's Qwen3 policy plans offline from its published shapes (the parameter counts of
  the published safetensors: 8,044,936,192 and 16,381,470,720 bytes of bf16) and fits one H100."""
  from markovian_jax.configs import base
  from markovian_jax.planning import plan
  from markovian_jax.training import config_validation

  c = base.with_preset(base.get_config("gsm8k"), "1xh100")
  c.model.path = hub_id
  p = plan.make_plan(config_validation.validate(c))
  assert p.model.model_type == "qwen3" and p.model.tie_word_embeddings == tied
  assert p.model.num_params == num_params
  items = {i.name: i.bytes for i in p.memory.items}
  assert items["base weights"] == 2 * num_params  # bf16, one device
  # LoRA r8 on all seven projections: 36 layers x 8 x sum(in + out), fp32.
  d, f, q, kv = p.model.hidden_size, p.model.intermediate_size, 32 * 128, 8 * 128
  per_layer = (d + q) * 2 + (d + kv) * 2 + (d + f) * 3
  assert items["LoRA params (fp32)"] == 4 * 36 * 8 * per_layer
  assert p.fits


@pytest.mark.slow  # a train subprocess
def test_train_refuses_an_unsupported_model_type_before_loading(tmp_path, smollm2_path):
  """`train --config.model.path=<dir>` with an unsupported model_type: one line, exit 2, before
  any weight is read (the weights file here is not even safetensors)."""
  from markovian_jax.models import load_tokenizer

  model = tmp_path / "gemma"
  model.mkdir()
  load_tokenizer(smollm2_path).save_pretrained(str(model))
  (model / "config.json").write_text(
    json.dumps(
      {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
      }
    )
  )
  (model / "model.safetensors").write_bytes(b"not a tensor file")
  line = helpers.one_error_line(helpers.run_train(*helpers.demo_args(model, tmp_path / "run")))
  assert "model_type='gemma3'" in line and "llama, mistral, qwen2, qwen3, phi3, gpt2" in line
  assert str(model) in line
