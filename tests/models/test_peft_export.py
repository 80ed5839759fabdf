"""Exports load in transformers/PEFT and give our logits; PEFT adapters import both ways.

The base checkpoint here is written by our `save_hf` (so transformers reading it tests the export),
and compared against transformers' PyTorch Llama and PEFT's LoRA layers.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from markovian_jax.models import hf, init_lora, init_params, load_checkpoint, load_tokenizer, logits
from markovian_jax.runtime import sharding
from tests import helpers

# Our float32 logits against transformers' float32 ones (other kernels, other summation orders):
# logits near 0 carry the rounding of sums as large as the largest logit, so 64 float32 ulps of
# max|logit| (measured: <= 7).
LOGIT_ULPS = 64


def _same_logits(actual, desired):
  np.testing.assert_allclose(actual, desired, rtol=0, atol=helpers.ulps(LOGIT_ULPS, of=desired))


SEQ = 48


def _torch_logits(model, ids):
  torch = helpers.require("torch")
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def _torch_base(path):
  transformers = helpers.require("transformers")
  helpers.require("torch")
  return transformers.LlamaForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(config, params, sharded HF dir written by save_hf, token ids)."""
  config = helpers.tiny_config()
  params = init_params(config, jax.random.PRNGKey(0))
  # Larger weights than init (logits of order 1) and non-unit norms (a swapped norm would show).
  rng = np.random.RandomState(1)
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: (
      jnp.asarray(1 + 0.2 * rng.randn(*x.shape), x.dtype) if "norm" in str(p) else 4.0 * x
    ),
    params,
  )
  path = str(tmp_path_factory.mktemp("base"))
  hf.save_hf(config, params, path, max_shard_size="200KB")
  ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, SEQ))
  return config, params, path, ids


@pytest.fixture(scope="module")
def lora(base):
  """All-linear rank-4 adapter with nonzero B (a fresh adapter would be the base model)."""
  config = base[0]
  adapter = init_lora(config, jax.random.PRNGKey(2), rank=4, alpha=8.0, dropout=0.05)
  rng = np.random.RandomState(3)
  return adapter.replace(
    params=jax.tree_util.tree_map_with_path(
      lambda p, x: x + jnp.asarray(0.2 * rng.randn(*x.shape), x.dtype) if p[-1].key == "b" else x,
      adapter.params,
    )
  )


@pytest.fixture(scope="module")
def adapter_dir(base, lora, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("adapter"))
  hf.save_peft_adapter(lora, base[0], path, base_model_name_or_path=base[2])
  return path


def _tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(
    models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}, unk_token="<unk>")
  )
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
  )


def test_save_hf_loads_in_transformers_and_round_trips(base):
  config, params, path, ids = base
  assert os.path.isfile(os.path.join(path, hf.INDEX_NAME))
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) >= 3
  with open(os.path.join(path, "config.json")) as f:
    written = json.load(f)
  assert written["rope_scaling"]["rope_type"] == "llama3" and written["rope_theta"] == 10000.0
  ours = np.asarray(logits(config, params, ids))
  assert np.abs(ours).max() > 1.0
  _same_logits(_torch_logits(_torch_base(path), ids), ours)
  config2, params2 = load_checkpoint(path)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_export_keeps_dtype(base, tmp_path):
  config, params, path, _ = base
  config16, params16 = load_checkpoint(path, dtype="bfloat16")
  hf.save_hf(config16, params16, tmp_path)
  with safe_open(str(tmp_path / hf.WEIGHTS_NAME), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  assert not (tmp_path / hf.INDEX_NAME).exists()
  config_back, params_back = load_checkpoint(tmp_path, dtype="bfloat16")
  assert config_back == config16
  jax.tree.map(np.testing.assert_array_equal, params_back, params16)


def test_our_adapter_in_torch_peft_gives_our_logits(base, lora, adapter_dir):
  peft = helpers.require("peft")
  config, params, path, ids = base
  with open(os.path.join(adapter_dir, hf.ADAPTER_CONFIG_NAME)) as f:
    cfg = json.load(f)
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
  assert sorted(cfg["target_modules"]) == sorted(
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  )
  with safe_open(os.path.join(adapter_dir, hf.ADAPTER_WEIGHTS_NAME), framework="numpy") as f:
    shape = f.get_slice("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight").get_shape()
    assert shape == [4, config.intermediate_size]
  ours = np.asarray(logits(config, params, ids, lora))
  assert np.abs(ours - np.asarray(logits(config, params, ids))).max() > 0.1  # the adapter matters
  model = peft.PeftModel.from_pretrained(_torch_base(path), adapter_dir).eval()
  _same_logits(_torch_logits(model, ids), ours)


def test_peft_adapter_round_trips(base, lora, adapter_dir):
  back = hf.load_peft_adapter(adapter_dir, base[0])
  assert (back.rank, back.alpha, back.dropout) == (lora.rank, lora.alpha, lora.dropout)
  assert jax.tree.structure(back) == jax.tree.structure(lora)
  jax.tree.map(np.testing.assert_array_equal, back.params, lora.params)
  mesh = sharding.make_mesh((2, 2, 2))
  placed = hf.load_peft_adapter(adapter_dir, base[0], mesh=mesh)
  want = sharding.param_shardings(lora.params, mesh)
  for leaf, s in zip(jax.tree.leaves(placed.params), jax.tree.leaves(want)):
    assert leaf.sharding == s, (leaf.sharding, s)
  assert placed.params["layers"]["mlp"]["up"]["b"].sharding.spec[2] == "tensor"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(placed.params), lora.params)


def test_merged_export_matches_lora_logits(base, lora, tmp_path):
  config, params, _, ids = base
  hf.save_merged_hf(config, params, lora, tmp_path, tokenizer=_tokenizer())
  ours = np.asarray(logits(config, params, ids, lora))
  torch_merged = _torch_logits(_torch_base(str(tmp_path)), ids)
  _same_logits(torch_merged, ours)
  config_m, merged = load_checkpoint(tmp_path)
  assert config_m == config
  _same_logits(np.asarray(logits(config, merged, ids)), ours)
  assert load_tokenizer(tmp_path)("a b a", add_special_tokens=False)["input_ids"] == [3, 4, 3]


def test_torch_peft_adapter_imports(base, tmp_path):
  peft = helpers.require("peft")
  torch = helpers.require("torch")
  config, params, path, ids = base
  torch.manual_seed(0)
  # init_lora_weights=False draws B at random too, so the adapter changes the logits.
  lora_config = peft.LoraConfig(
    r=3,
    lora_alpha=6,
    lora_dropout=0.0,
    init_lora_weights=False,
    target_modules=["q_proj", "v_proj", "down_proj"],
    task_type="CAUSAL_LM",
  )
  model = peft.get_peft_model(_torch_base(path), lora_config).eval()
  model.save_pretrained(tmp_path)
  adapter = hf.load_peft_adapter(tmp_path, config)
  assert (adapter.rank, adapter.alpha, adapter.dropout) == (3, 6.0, 0.0)
  assert sorted(adapter.targets) == ["down", "q", "v"]
  a = adapter.params["layers"]["attn"]["q"]["a"]
  assert a.shape == (config.num_layers, config.hidden_size, 3) and a.dtype == jnp.float32
  ours = np.asarray(logits(config, params, ids, adapter))
  expected = _torch_logits(model, ids)
  assert np.abs(expected - np.asarray(logits(config, params, ids))).max() > 0.1
  _same_logits(ours, expected)


# ------------------------------------------------------------------ bad input


def _copy_adapter(adapter_dir, tmp_path, **config_changes):
  dst = tmp_path / "adapter"
  dst.mkdir()
  with open(os.path.join(adapter_dir, hf.ADAPTER_CONFIG_NAME)) as f:
    cfg = json.load(f)
  cfg.update(config_changes)
  (dst / hf.ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
  os.symlink(os.path.join(adapter_dir, hf.ADAPTER_WEIGHTS_NAME), dst / hf.ADAPTER_WEIGHTS_NAME)
  return dst


def test_missing_adapter_files(base, adapter_dir, tmp_path):
  config = base[0]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load_peft_adapter(tmp_path / "nowhere", config)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=hf.ADAPTER_CONFIG_NAME):
    hf.load_peft_adapter(tmp_path / "empty", config)
  path = _copy_adapter(adapter_dir, tmp_path)
  os.remove(path / hf.ADAPTER_WEIGHTS_NAME)
  with pytest.raises(FileNotFoundError, match=hf.ADAPTER_WEIGHTS_NAME):
    hf.load_peft_adapter(path, config)


def test_adapter_for_another_model_names_the_tensor(base, adapter_dir):
  config = base[0].replace(intermediate_size=96)
  with pytest.raises(
    hf.CheckpointError,
    match=r"layers\.0\.mlp\.down_proj\.lora_A\.weight has shape \[4, 128\], "
    r"expected \[4, 96\]",
  ):
    hf.load_peft_adapter(adapter_dir, config)
  with pytest.raises(hf.CheckpointError, match=r"model\.layers\.1\..*not LoRA A/B weights"):
    hf.load_peft_adapter(adapter_dir, base[0].replace(num_layers=1))


def test_declared_targets_must_match_the_weights(base, adapter_dir, tmp_path):
  path = _copy_adapter(adapter_dir, tmp_path, target_modules=["q_proj", "v_proj"])
  with pytest.raises(hf.CheckpointError, match=r"target_modules \['q_proj', 'v_proj'\]"):
    hf.load_peft_adapter(path, base[0])


@pytest.mark.parametrize(
  "option", [{"use_dora": True}, {"bias": "all"}, {"use_rslora": True}, {"peft_type": "IA3"}]
)
def test_unsupported_peft_options_are_rejected(base, adapter_dir, tmp_path, option):
  path = _copy_adapter(adapter_dir, tmp_path, **option)
  key = next(iter(option))
  with pytest.raises(hf.CheckpointError, match=key):
    hf.load_peft_adapter(path, base[0])
