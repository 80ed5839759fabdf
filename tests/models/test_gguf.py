"""GGUF loading: SmolLM2-135M-Instruct (Q4_1) against transformers' own GGUF load, and tiny
synthetic GGUF files (written with `gguf.GGUFWriter`) for exact round trips and bad input."""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from markovian_jax.models import init_params, load_checkpoint, load_tokenizer, logits
from markovian_jax.models.config import ConfigError, RopeScaling
from markovian_jax.models.gguf import GGUFError, load_gguf, load_gguf_tokenizer
from markovian_jax.runtime import sharding
from tests import helpers

BUFFER = 64  # one jitted shape for every SmolLM2 forward in this file

TOKENIZER_STRINGS = [
  "Hello world",
  "The year 2024 had 366 days; 3.14159 is close to pi.",
  "h\u00e9llo w\u00f6rld \u2014 na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \U0001f642",
  "def f(x):\n    return x**2  # square\n\n",
  "<|im_start|>user\nHi there<|im_end|>\n",
]
# Two or more spaces before a digit: SmolLM2's own tokenizer (and llama.cpp's 'smollm' rule) split
# every digit off before GPT-2's pattern, so the spaces stay one pre-token; transformers' GGUF
# tokenizer applies GPT-2's pattern alone, which attaches the last space to the digit.
DIGIT_SPACING_STRINGS = ["a  5", "x   12 apples", "3 + 4 =  7", "I have  10\n\n  20 apples"]


# ------------------------------------------------------------------ SmolLM2 fixtures


@pytest.fixture(scope="module")
def gguf_path():
  return helpers.smollm2_gguf_path()


@pytest.fixture(scope="module")
def smollm2(smollm2_model):
  return smollm2_model


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
  return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def forward(smollm2):
  config, _ = smollm2
  return jax.jit(lambda params, ids: logits(config, params, ids))


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
  helpers.require("torch")  # transformers' GGUF reader imports torch
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(
    os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
  )


@pytest.fixture(scope="module")
def hf_model(gguf_path):
  torch = helpers.require("torch")
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
  )
  return model.eval()


def _padded(ids):
  buf = np.zeros((1, BUFFER), np.int32)
  buf[0, : len(ids)] = ids
  return buf


def _chat_ids(tok, question):
  out = tok.apply_chat_template(
    [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
  )
  return list(out["input_ids"] if hasattr(out, "keys") else out)


# ------------------------------------------------------------------ SmolLM2 tests


@pytest.mark.slow
def test_smollm2_config_from_metadata(smollm2):
  config, params = smollm2
  # The file's metadata (as gguf.GGUFReader reads it): 30 layers, d=576, ffn 1536, 9/3 heads, vocab
  # 49152, theta 1e5, eps 1e-5, no output.weight; BOS <|im_start|>=1, EOS <|im_end|>=2.
  assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
  assert (config.vocab_size, config.rope_theta, config.rms_norm_eps) == (49152, 1e5, 1e-5)
  assert config.rope_scaling is None and config.tie_word_embeddings and "lm_head" not in params
  assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
  assert config.max_position_embeddings == 8192
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
    lambda x: (x.shape, x.dtype), shapes
  )
  assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params == 134_515_008


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_tokenizer(tokenizer, hf_tokenizer):
  for text in TOKENIZER_STRINGS:
    ours = tokenizer(text)["input_ids"]
    assert ours == hf_tokenizer(text)["input_ids"], text
    assert tokenizer.decode(ours) == text == hf_tokenizer.decode(ours)
  # No BOS is prepended, as transformers does for this file (tokenizer.ggml.add_bos_token=false).
  assert tokenizer("Hello")["input_ids"] == [19556] and not tokenizer.add_bos_token
  assert (
    tokenizer.special_tokens_map
    == hf_tokenizer.special_tokens_map
    == {
      "bos_token": "<|im_start|>",
      "eos_token": "<|im_end|>",
      "unk_token": "<|endoftext|>",
      "pad_token": "<|im_end|>",
    }
  )
  assert tokenizer.all_special_ids == hf_tokenizer.all_special_ids == [1, 2, 0]
  # Every CONTROL token (ids 0..16) is special: kept whole in text, dropped by skip_special_tokens.
  assert tokenizer("<repo_name>Hello<empty_output>")["input_ids"] == [3, 19556, 16]
  assert (
    tokenizer.decode([3, 19556, 16], skip_special_tokens=True)
    == "Hello"
    == (hf_tokenizer.decode([3, 19556, 16], skip_special_tokens=True))
  )
  text = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True, tokenize=False
  )
  assert text == hf_tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True, tokenize=False
  )
  assert text.endswith("<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n")
  assert _chat_ids(tokenizer, "What is 12 + 30?") == _chat_ids(hf_tokenizer, "What is 12 + 30?")
  plain = tokenizer.decode(_chat_ids(tokenizer, "Hi"), skip_special_tokens=True)
  assert plain.endswith("Hi\nassistant\n")


def test_tokenizer_splits_digits_off_like_smollm2(tokenizer, hf_tokenizer):
  # Reference: llama.cpp's 'smollm' pre-tokenizer = split off each digit, then GPT-2's pattern on
  # each piece; transformers' tokenizer is exactly GPT-2's pattern + the same BPE on a piece.
  for text in DIGIT_SPACING_STRINGS:
    pieces = [p for p in re.split(r"(\d)", text) if p]
    expected = [i for p in pieces for i in hf_tokenizer(p, add_special_tokens=False)["input_ids"]]
    assert tokenizer(text)["input_ids"] == expected, text
  assert tokenizer("a  5")["input_ids"] == [81, 256, 37]  # 'a', 'ĠĠ', '5'


@pytest.mark.slow
def test_logits_match_transformers_gguf_model(smollm2, tokenizer, forward, hf_model):
  torch = helpers.require("torch")
  ids = tokenizer("In 1969, Apollo 11 landed on the Moon; the crew walked for about two hours.")[
    "input_ids"
  ]
  assert 18 <= len(ids) <= 30
  _, params = smollm2
  ours = np.asarray(forward(params, _padded(ids)))[0, : len(ids)]
  with torch.no_grad():
    ref = hf_model(torch.tensor([ids])).logits[0].float().numpy()
  diff = float(np.abs(ours - ref).max())
  print(f"max |logit diff| vs transformers GGUF (fp32, {len(ids)} tokens): {diff:.2e}")
  assert diff < 1e-3
  assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_greedy_chat_answer_names_paris(smollm2, tokenizer, forward):
  _, params = smollm2
  ids = _chat_ids(tokenizer, "What is the capital of France?")
  prompt_len = len(ids)
  for _ in range(12):
    out = forward(params, _padded(ids))  # right padding: causal rows before it are unaffected
    ids.append(int(jnp.argmax(out[0, len(ids) - 1])))
    if ids[-1] == tokenizer.eos_token_id:
      break
  answer = tokenizer.decode(ids[prompt_len:], skip_special_tokens=True)
  assert "Paris" in answer, answer


# ------------------------------------------------------------------ tiny synthetic GGUF files


def _to_gguf_rows(w, n_head):
  """llama.cpp's converter permutation (HF rotate-half rows -> interleaved pairs), w: [out, in]."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _llama3_divisors(config):
  """Per-frequency divisors as llama.cpp's converter computes them for Llama 3.1 (rope_freqs)."""
  s = config.rope_scaling
  out = []
  for i in range(0, config.head_dim, 2):
    wavelen = 2 * math.pi * config.rope_theta ** (i / config.head_dim)
    if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
      out.append(1.0)
    elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
      out.append(s.factor)
    else:
      smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
      )
      out.append(1 / ((1 - smooth) / s.factor + smooth))
  return np.array(out, np.float32)


def _write_model_gguf(path, config, params, *, arch="llama", drop=(), extra=None, ffn=None):
  import gguf

  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(config.num_layers)
  w.add_context_length(config.max_position_embeddings)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(ffn or config.intermediate_size)
  w.add_head_count(config.num_heads)
  w.add_head_count_kv(config.num_kv_heads)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_rope_freq_base(config.rope_theta)
  w.add_rope_dimension_count(config.head_dim)
  w.add_vocab_size(config.vocab_size)
  w.add_bos_token_id(config.bos_token_id)
  w.add_eos_token_id(config.eos_token_ids[0])
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
  tensors = {
    "token_embd.weight": f32(params["embed"]["embedding"]),
    "output_norm.weight": f32(params["final_norm"]["scale"]),
  }
  if "lm_head" in params:
    tensors["output.weight"] = f32(params["lm_head"]["kernel"]).T
  if config.rope_scaling is not None:
    w.add_rope_scaling_orig_ctx_len(config.rope_scaling.original_max_position_embeddings)
    tensors["rope_freqs.weight"] = _llama3_divisors(config)
  layers = params["layers"]
  for i in range(config.num_layers):
    hf = {name: f32(layers["attn"][name]["kernel"][i]).T for name in "qkvo"}
    tensors.update(
      {
        f"blk.{i}.attn_norm.weight": f32(layers["attn_norm"]["scale"][i]),
        f"blk.{i}.attn_q.weight": _to_gguf_rows(hf["q"], config.num_heads),
        f"blk.{i}.attn_k.weight": _to_gguf_rows(hf["k"], config.num_kv_heads),
        f"blk.{i}.attn_v.weight": hf["v"],
        f"blk.{i}.attn_output.weight": hf["o"],
        f"blk.{i}.ffn_norm.weight": f32(layers["mlp_norm"]["scale"][i]),
        **{
          f"blk.{i}.ffn_{name}.weight": f32(layers["mlp"][name]["kernel"][i]).T
          for name in ("gate", "up", "down")
        },
      }
    )
  tensors.update(extra or {})
  for name, value in tensors.items():
    if name not in drop:
      w.add_tensor(name, np.ascontiguousarray(value))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  config = helpers.tiny_config()
  # Random weights in numpy (flax init would cost a compile); norms away from 1, so a swapped or
  # misplaced norm cannot pass.
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  params = jax.tree_util.tree_map_with_path(
    lambda p, s: (
      (1.0 if "norm" in sharding.path_str(p) else 0.0) + 0.1 * rng.standard_normal(s.shape)
    ).astype(np.float32),
    shapes,
  )
  path = _write_model_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", config, params)
  return config, params, path


def test_tiny_gguf_round_trip_is_exact(tiny):
  config, params, path = tiny
  loaded_config, loaded = load_checkpoint(path)
  # Untied head, GQA q/k un-permuted, llama3 scaling recovered from the rope_freqs tensor.
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_tiny_gguf_bfloat16_on_a_mesh(tiny):
  config, params, path = tiny
  mesh = sharding.make_mesh((2, 2, 2))
  loaded_config, loaded = load_gguf(path, dtype="bfloat16", mesh=mesh, compute_dtype="float32")
  assert (loaded_config.param_dtype, loaded_config.dtype) == ("bfloat16", "float32")
  expected = sharding.param_shardings(loaded, mesh)
  leaves = jax.tree_util.tree_leaves_with_path(loaded)
  for (p, leaf), want in zip(leaves, jax.tree.leaves(expected)):
    assert leaf.dtype == jnp.bfloat16 and leaf.sharding == want, sharding.path_str(p)
  assert loaded["layers"]["attn"]["q"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
    None, "fsdp", "tensor"
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(jnp.asarray(b, jnp.bfloat16))
    ),
    loaded,
    params,
  )


def test_tiny_gguf_tied_embeddings(tiny, tmp_path):
  config, params, _ = tiny
  tied = config.replace(tie_word_embeddings=True)
  params = {k: v for k, v in params.items() if k != "lm_head"}
  loaded_config, loaded = load_gguf(_write_model_gguf(tmp_path / "t.gguf", tied, params))
  assert loaded_config == tied and "lm_head" not in loaded
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_not_a_gguf_file(tmp_path):
  bad = tmp_path / "model.gguf"
  bad.write_text('{"this": "is json"}')
  with pytest.raises(GGUFError, match=r"is not a GGUF file: it starts with b'\{\"th'"):
    load_checkpoint(str(bad))
  with pytest.raises(GGUFError, match="is not a GGUF file"):
    load_tokenizer(str(bad))
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(b"GGUF\x03\x00")
  with pytest.raises(GGUFError, match="malformed GGUF"):
    load_gguf(str(truncated))


def test_bad_model_files_name_the_problem(tiny, tmp_path):
  config, params, _ = tiny
  with pytest.raises(GGUFError, match="architecture 'gemma' is not supported"):
    load_gguf(_write_model_gguf(tmp_path / "a.gguf", config, params, arch="gemma"))
  with pytest.raises(GGUFError, match=r"tensor 'blk\.1\.ffn_up\.weight' is missing"):
    load_gguf(_write_model_gguf(tmp_path / "b.gguf", config, params, drop={"blk.1.ffn_up.weight"}))
  with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.ffn_(down|gate|up)\.weight' has shape"):
    load_gguf(_write_model_gguf(tmp_path / "c.gguf", config, params, ffn=96))
  bias = {"blk.0.attn_q.bias": np.zeros(64, np.float32)}
  with pytest.raises(GGUFError, match=r"does not use: \['blk\.0\.attn_q\.bias'\]"):
    load_gguf(_write_model_gguf(tmp_path / "d.gguf", config, params, extra=bias))
  scaled = config.replace(rope_scaling=RopeScaling(8.0, 2.0, 4.0, 32))
  with pytest.raises(ConfigError, match="rope_freqs"):
    # low_freq_factor 2 is not the band the loader accepts: refused, not silently mis-scaled.
    load_gguf(_write_model_gguf(tmp_path / "e.gguf", scaled, params))


# ------------------------------------------------------------------ tiny tokenizers vs tiktoken

_MERGES = [
  ("1", "2"),
  ("12", "3"),
  ("123", "4"),
  ("4", "5"),
  ("\u0120", "t"),
  ("h", "e"),
  ("\u0120t", "he"),
  ("'", "s"),
  ("\u010a", "\u010a"),
  ("\u0120", "\u0120"),
  ("c", "a"),
  ("ca", "t"),
  ("\u0120", "1"),
]
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TINY_TEXTS = [
  "the 12345 cat's  1234\n\n  45 he",
  "x   123 'll<|end|>12",
  "h\u00e9llo  \u65e5\u672c 7",
  " 1 12 123 1234 12345 123456",
]


def _tiny_vocab():
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  spelling = bytes_to_unicode()
  tokens = [spelling[b] for b in range(256)] + ["".join(m) for m in _MERGES]
  decode = {c: b for b, c in spelling.items()}
  # Each merged token has exactly one split into two vocabulary tokens, so tiktoken's
  # rank-of-the-concatenation BPE and the merge-list BPE must agree.
  for token in tokens[256:]:
    splits = [
      (token[:k], token[k:])
      for k in range(1, len(token))
      if token[:k] in tokens and token[k:] in tokens
    ]
    assert len(splits) == 1, (token, splits)
  return tokens, {bytes(decode[c] for c in t): i for i, t in enumerate(tokens)}


def _write_tokenizer_gguf(path, pre, model="gpt2", add_bos=False):
  import gguf

  tokens, _ = _tiny_vocab()
  tokens = tokens + ["<|end|>", "<|begin|>"]
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
  w.add_token_merges([" ".join(m) for m in _MERGES])
  w.add_bos_token_id(len(tokens) - 1)
  w.add_eos_token_id(len(tokens) - 2)
  w.add_add_bos_token(add_bos)
  w.add_chat_template("{% for m in messages %}<|begin|>{{ m['content'] }}<|end|>{% endfor %}")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe"])
def test_tiny_tokenizer_matches_tiktoken(pre, tmp_path):
  tiktoken = helpers.require("tiktoken")
  tokens, ranks = _tiny_vocab()
  specials = {"<|end|>": len(tokens), "<|begin|>": len(tokens) + 1}
  pattern = _LLAMA3_PATTERN if pre == "llama-bpe" else _GPT2_PATTERN
  enc = tiktoken.Encoding(
    name=f"tiny-{pre}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
  )

  def reference(text):
    if pre != "smollm":
      return enc.encode(text, allowed_special="all")
    # llama.cpp's 'smollm' rule: every digit is its own piece before GPT-2's pattern runs.
    return [
      i
      for piece in re.split(r"(\d)", text)
      if piece
      for i in enc.encode(piece, allowed_special="all")
    ]

  add_bos = pre == "llama-bpe"
  tok = load_gguf_tokenizer(_write_tokenizer_gguf(tmp_path / "tok.gguf", pre, add_bos=add_bos))
  bos = [specials["<|begin|>"]] if add_bos else []
  for text in _TINY_TEXTS:
    assert tok(text)["input_ids"] == bos + reference(text), text
    assert (
      tok.decode(tok(text)["input_ids"], skip_special_tokens=False)
      == ("<|begin|>" if add_bos else "") + text
    )
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin|>", "<|end|>", None)
  assert tok.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False) == (
    "<|begin|>the cat<|end|>"
  )


def test_unsupported_tokenizers_name_the_problem(tmp_path):
  with pytest.raises(GGUFError, match="tokenizer model 'llama' is not supported"):
    load_gguf_tokenizer(_write_tokenizer_gguf(tmp_path / "spm.gguf", "default", model="llama"))
  with pytest.raises(GGUFError, match="pre-tokenizer 'qwen2' is not supported"):
    load_gguf_tokenizer(_write_tokenizer_gguf(tmp_path / "qwen.gguf", "qwen2"))


def test_a_tokenizer_is_read_once_per_file_version(tmp_path, monkeypatch):
  """Each call returns its own tokenizer object (padding set on one does not leak), the header is
  read once per file, and a file rewritten in place is read again."""
  from markovian_jax.models import gguf as gguf_lib

  path = _write_tokenizer_gguf(tmp_path / "tok.gguf", "gpt2")
  opened = []
  real_open = gguf_lib._open
  monkeypatch.setattr(gguf_lib, "_open", lambda p: opened.append(p) or real_open(p))
  first, second = load_gguf_tokenizer(path), load_gguf_tokenizer(path)
  assert len(opened) == 1 and first is not second
  first.padding_side = "left"
  assert second.padding_side == "right"
  assert first("the cat 12")["input_ids"] == second("the cat 12")["input_ids"]
  assert second.chat_template == first.chat_template and second.bos_token == "<|begin|>"
  # Rewritten with llama.cpp's 'smollm' rule, which splits every digit off.
  _write_tokenizer_gguf(tmp_path / "tok.gguf", "smollm")
  third = load_gguf_tokenizer(path)
  assert len(opened) == 2
  assert len(third("12")["input_ids"]) == 2 != len(first("12")["input_ids"])
