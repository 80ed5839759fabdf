"""HF Llama directories load into logits that match transformers' PyTorch Llama.

The reference checkpoint is written by transformers itself (sharded safetensors), then its
config.json is rewritten to the published Llama-3.1 layout (top-level rope_theta + rope_scaling) so
both config layouts are exercised. Sequences are longer than the 32-token original context, where a
dropped llama3 rope scaling would show.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from markovian_jax.models import (
  ConfigError,
  hf,
  init_params,
  load_checkpoint,
  load_tokenizer,
  logits,
  positions_from_mask,
)
from markovian_jax.runtime import sharding
from tests import helpers

# Our float32 logits against transformers' float32 ones (other kernels, other summation orders):
# logits near 0 carry the rounding of sums as large as the largest logit, so 64 float32 ulps of
# max|logit| (measured: <= 8).
LOGIT_ULPS = 64


def _same_logits(actual, desired):
  np.testing.assert_allclose(actual, desired, rtol=0, atol=helpers.ulps(LOGIT_ULPS, of=desired))


SEQ = 96  # > original_max_position_embeddings (32) of helpers.tiny_config


def _torch_llama(tmp_path_factory, name, tie=False, max_shard_size="200KB"):
  """A random transformers Llama matching helpers.tiny_config, saved with save_pretrained."""
  torch = helpers.require("torch")
  transformers = helpers.require("transformers")
  c = helpers.tiny_config(tie_word_embeddings=tie)
  hf_config = transformers.LlamaConfig(
    vocab_size=c.vocab_size,
    hidden_size=c.hidden_size,
    intermediate_size=c.intermediate_size,
    num_hidden_layers=c.num_layers,
    num_attention_heads=c.num_heads,
    num_key_value_heads=c.num_kv_heads,
    head_dim=c.head_dim,
    rms_norm_eps=c.rms_norm_eps,
    max_position_embeddings=c.max_position_embeddings,
    rope_theta=c.rope_theta,
    rope_scaling=dict(
      rope_type="llama3",
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=32,
    ),
    tie_word_embeddings=tie,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.08,
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():  # unit norms would hide a swapped attn/mlp norm
    for n, p in model.named_parameters():
      if n.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path, max_shard_size=max_shard_size)
  return str(path), model


def _torch_logits(model, ids, mask=None, positions=None):
  torch = helpers.require("torch")
  kw = {}
  if mask is not None:
    kw = dict(
      attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
      position_ids=torch.tensor(np.asarray(positions), dtype=torch.long),
    )
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(dir in the published-3.1 layout, torch model, the transformers-5 config it was saved with)."""
  path, model = _torch_llama(tmp_path_factory, "llama31")
  config_file = os.path.join(path, "config.json")
  with open(config_file) as f:
    v5 = json.load(f)
  published = dict(v5)
  rope = dict(published.pop("rope_parameters"))
  published["rope_theta"] = rope.pop("rope_theta")
  published["rope_scaling"] = rope
  assert rope["rope_type"] == "llama3"
  with open(config_file, "w") as f:
    json.dump(published, f)
  return path, model, v5


@pytest.fixture(scope="module")
def loaded(checkpoint):
  path, model, _ = checkpoint
  config, params = load_checkpoint(path)
  ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, SEQ))
  return config, params, ids, _torch_logits(model, ids)


def _copy(checkpoint, tmp_path):
  dst = str(tmp_path / "ckpt")
  shutil.copytree(checkpoint[0], dst)
  return dst


def _edit_json(path, **changes):
  with open(path) as f:
    data = json.load(f)
  data.update(changes)
  with open(path, "w") as f:
    json.dump(data, f)


def _rewrite_tensor(path, name, fn):
  """Replaces tensor `name` in its shard by fn(tensor) (or drops it when fn returns None)."""
  with open(os.path.join(path, hf.INDEX_NAME)) as f:
    file = os.path.join(path, json.load(f)["weight_map"][name])
  with safe_open(file, framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  new = fn(tensors.pop(name))
  if new is not None:
    tensors[name] = new
  save_file(tensors, file, metadata={"format": "pt"})


def test_sharded_published_layout_matches_torch_beyond_original_context(checkpoint, loaded):
  path, _, _ = checkpoint
  config, params, ids, expected = loaded
  shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
  assert len(shards) >= 3 and os.path.isfile(os.path.join(path, hf.INDEX_NAME))
  assert config == helpers.tiny_config()
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  out = np.asarray(logits(config, params, ids))
  assert np.abs(expected).max() > 1.0  # logits of the size of real ones
  _same_logits(out, expected)
  # The comparison would catch a dropped llama3 scaling (position 0 has no rotation either way).
  unscaled = np.asarray(logits(config.replace(rope_scaling=None), params, ids))
  assert np.abs(unscaled - expected).max() > 1e-2
  _same_logits(unscaled[:, 0], expected[:, 0])


def test_left_padded_ragged_batch_matches_torch(checkpoint, loaded):
  _, model, _ = checkpoint
  config, params, _, _ = loaded
  lengths = [SEQ, 70, 41]
  rng = np.random.RandomState(1)
  ids = rng.randint(0, config.vocab_size, (len(lengths), SEQ))
  mask = np.arange(SEQ)[None, :] >= SEQ - np.array(lengths)[:, None]
  ids = np.where(mask, ids, 0)
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  assert positions[2, SEQ - 41] == 0 and positions[2, -1] == 40
  out = np.asarray(logits(config, params, ids, attention_mask=mask))
  expected = _torch_logits(model, ids, mask, positions)
  _same_logits(out[mask], expected[mask])
  # Each padded row equals its unpadded sequence run alone.
  alone = np.asarray(logits(config, params, ids[2:, SEQ - 41 :]))
  _same_logits(out[2, SEQ - 41 :], alone[0])


def test_bfloat16_load_against_torch_fp32(checkpoint, loaded):
  path, _, _ = checkpoint
  _, _, ids, expected = loaded
  config, params = load_checkpoint(path, dtype="bfloat16")
  assert config.param_dtype == config.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  out = np.asarray(logits(config, params, ids))
  err = np.abs(out - expected).max()
  # Measured: 0.048 max abs error on logits up to 3.2 in magnitude (bf16 keeps 8 mantissa bits),
  # top-1 agreement 97%.
  assert err < 0.1, err
  assert np.mean(out.argmax(-1) == expected.argmax(-1)) > 0.9


def test_transformers5_rope_parameters_layout_gives_same_model(checkpoint, loaded, tmp_path):
  _, _, v5 = checkpoint
  config, params, _, _ = loaded
  assert "rope_parameters" in v5 and "rope_scaling" not in v5
  path = _copy(checkpoint, tmp_path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(v5, f)
  config5, params5 = load_checkpoint(path)
  assert config5 == config
  jax.tree.map(np.testing.assert_array_equal, params5, params)


def test_tied_single_file_checkpoint(tmp_path_factory):
  path, model = _torch_llama(tmp_path_factory, "tied", tie=True, max_shard_size="50MB")
  assert os.path.isfile(os.path.join(path, hf.WEIGHTS_NAME))
  assert not os.path.exists(os.path.join(path, hf.INDEX_NAME))
  config, params = load_checkpoint(path)
  assert config.tie_word_embeddings and "lm_head" not in params
  ids = np.random.RandomState(2).randint(0, config.vocab_size, (1, SEQ))
  _same_logits(np.asarray(logits(config, params, ids)), _torch_logits(model, ids))


def test_load_onto_mesh_follows_sharding_rules(checkpoint, loaded):
  path, _, _ = checkpoint
  config, params, ids, expected = loaded
  mesh = sharding.make_mesh((2, 2, 2))
  config_m, sharded = load_checkpoint(path, mesh=mesh)
  assert config_m == config
  abstract = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  want = sharding.param_shardings(abstract, mesh)
  for leaf, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(want)):
    assert leaf.sharding == s, (leaf.sharding, s)
  q = sharded["layers"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (config.num_layers, 32, 32)
  # Every shard holds exactly its slice of the single-device weights.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded), jax.device_get(params))
  out = jax.jit(functools.partial(logits, config))(sharded, jnp.asarray(ids, jnp.int32))
  _same_logits(np.asarray(out), expected)


def test_tokenizer_loads_offline(tmp_path):
  helpers.require("tokenizers")
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
  )
  with_config = tmp_path / "with_config"
  fast.save_pretrained(with_config)
  loaded = load_tokenizer(with_config)
  assert loaded("hello world", add_special_tokens=False)["input_ids"] == [3, 4]
  assert loaded.eos_token_id == 2 and loaded.bos_token_id == 1
  bare = tmp_path / "bare"
  bare.mkdir()
  tok.save(str(bare / "tokenizer.json"))
  assert load_tokenizer(bare)("world hello")["input_ids"] == [4, 3]
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    load_tokenizer(empty)


def test_a_generic_tokenizer_is_autotokenizers_without_torch(tiny_model_dir, tmp_path):
  """A directory whose tokenizer_config.json names the generic class (our saves) loads as
  transformers' AutoTokenizer loads it: the same class, ids, special tokens, chat template and
  decoding; and in a fresh process without importing torch. A model's own class still goes
  through AutoTokenizer."""
  import json
  import pathlib
  import subprocess
  import sys

  from transformers import AutoTokenizer

  tiny_model_dir = pathlib.Path(tiny_model_dir)
  ours = load_tokenizer(tiny_model_dir)
  auto = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
  assert type(ours) is type(auto)
  texts = ["What is 12 + 7?", " 19\nAnswer: 19", "<|im_start|>user\nhi<|im_end|>", ""]
  for text in texts:
    for special in (True, False):
      assert (
        ours(text, add_special_tokens=special)["input_ids"]
        == auto(text, add_special_tokens=special)["input_ids"]
      )
  ids = auto("x = 3 * (4 + 5)")["input_ids"]
  assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
  assert ours.all_special_tokens == auto.all_special_tokens and len(ours) == len(auto)
  assert (ours.bos_token_id, ours.eos_token_id) == (auto.bos_token_id, auto.eos_token_id)
  assert ours.chat_template == auto.chat_template
  code = (
    "import sys; from markovian_jax.models import load_tokenizer; "
    f"load_tokenizer({str(tiny_model_dir)!r}); print('torch' in sys.modules)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=helpers.REPO, timeout=120
  )
  assert out.returncode == 0 and out.stdout.split()[-1] == "False", out.stderr[-2000:]
  # A model's own class in the config (GPT-2's here): AutoTokenizer builds that class.
  other = tmp_path / "other"
  other.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (other / name).write_bytes((tiny_model_dir / name).read_bytes())
  cfg = json.loads((other / "tokenizer_config.json").read_text())
  (other / "tokenizer_config.json").write_text(
    json.dumps(dict(cfg, tokenizer_class="GPT2Tokenizer"))
  )
  own = load_tokenizer(other)
  assert type(own) is type(AutoTokenizer.from_pretrained(other, local_files_only=True))
  assert type(own) is not type(auto)


# ------------------------------------------------------------------ bad input


def test_missing_directory_and_config(checkpoint, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_checkpoint(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load_hf(tmp_path / "nowhere")
  path = _copy(checkpoint, tmp_path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_checkpoint(path)
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(checkpoint[0], "config.json"), empty)
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    load_checkpoint(empty)


def test_missing_shard_is_named(checkpoint, tmp_path):
  path = _copy(checkpoint, tmp_path)
  shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
  os.remove(os.path.join(path, shard))
  with pytest.raises(FileNotFoundError, match=shard):
    load_checkpoint(path)


@pytest.mark.parametrize(
  "model_type, arch", [("gemma3", "Gemma3ForCausalLM"), ("phi", "PhiForCausalLM")]
)
def test_other_architecture_is_rejected(checkpoint, tmp_path, model_type, arch):
  path = _copy(checkpoint, tmp_path)
  _edit_json(os.path.join(path, "config.json"), model_type=model_type, architectures=[arch])
  with pytest.raises(
    ConfigError,
    match=f"model_type='{model_type}'.*supported model types: "
    "llama, mistral, qwen2, qwen3, phi3, gpt2",
  ):
    load_checkpoint(path)


def test_config_of_another_family_over_llama_tensors_names_them(checkpoint, tmp_path):
  path = _copy(checkpoint, tmp_path)
  _edit_json(
    os.path.join(path, "config.json"), model_type="qwen3", architectures=["Qwen3ForCausalLM"]
  )
  with pytest.raises(hf.CheckpointError, match=r"self_attn\.[qk]_norm\.weight is missing"):
    load_checkpoint(path)


def test_shape_mismatch_names_the_tensor(checkpoint, tmp_path):
  path = _copy(checkpoint, tmp_path)
  name = "model.layers.1.self_attn.k_proj.weight"
  _rewrite_tensor(path, name, lambda t: t[:24])
  with pytest.raises(hf.CheckpointError, match=rf"{name}.*\[24, 64\].*\[32, 64\]"):
    load_checkpoint(path)


def test_missing_tensor_is_named(checkpoint, tmp_path):
  path = _copy(checkpoint, tmp_path)
  name = "model.layers.0.post_attention_layernorm.weight"
  _rewrite_tensor(path, name, lambda t: None)
  with pytest.raises(hf.CheckpointError, match=f"{name} is missing"):
    load_checkpoint(path)


def test_config_with_fewer_layers_than_the_weights(checkpoint, tmp_path):
  path = _copy(checkpoint, tmp_path)
  _edit_json(os.path.join(path, "config.json"), num_hidden_layers=1)
  with pytest.raises(hf.CheckpointError, match=r"model\.layers\.1\..*num_hidden_layers=1"):
    load_checkpoint(path)
