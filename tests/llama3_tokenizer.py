"""The Llama-3 tokenizer, rebuilt offline from the vocabulary that `quicktok-v1` ships.

Meta's tokenizer.json cannot be downloaded here; quicktok ships the same BPE ranks
(the same token ids). We write them as a tiktoken-format file, convert that with transformers'
TikTokenConverter, and add what Meta's tokenizer.json has on top: a BOS post-processor, the 3.1
names of three special tokens and a Llama-3 chat template. Building takes ~4 s, so the result is
cached per process.
"""

from __future__ import annotations

import base64
import functools
import os
import tempfile

from tests import helpers

N_BPE = 128000
BOS = "<|begin_of_text|>"
EOS = "<|eot_id|>"
# quicktok names these with the Llama-3.0 reserved names; Llama 3.1 renamed them.
_LLAMA31_NAMES = {
  128004: "<|finetune_right_pad_id|>",
  128008: "<|eom_id|>",
  128010: "<|python_tag|>",
}
_CHAT_TEMPLATE = (
  "{{ bos_token }}{% for message in messages %}"
  "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
  "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@functools.lru_cache(maxsize=None)
def llama3_tokenizer():
  """A `transformers.PreTrainedTokenizerFast` equal to Llama-3.1's (ids 0..128255, BOS added)."""
  quicktok = helpers.require("quicktok")
  helpers.require("tiktoken")
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast
  from transformers.convert_slow_tokenizer import TikTokenConverter

  enc = quicktok.get_encoding("llama3")
  specials = []
  for i in range(N_BPE, enc.n_vocab):
    name = _LLAMA31_NAMES.get(i) or enc.decode_single_token_bytes(i).decode("utf-8")
    specials.append(name)
  with tempfile.TemporaryDirectory() as tmp:
    vocab = os.path.join(tmp, "llama3.tiktoken")
    with open(vocab, "wb") as f:
      for rank in range(N_BPE):
        f.write(base64.b64encode(enc.decode_single_token_bytes(rank)) + b" %d\n" % rank)
    backend = TikTokenConverter(vocab_file=vocab, extra_special_tokens=specials).converted()
  bos_id = N_BPE
  backend.post_processor = processors.Sequence(
    [
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
      ),
    ]
  )
  tok = PreTrainedTokenizerFast(
    tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS
  )
  tok.chat_template = _CHAT_TEMPLATE
  return tok
