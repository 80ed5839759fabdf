"""The PyTorch peer's model: transformers' `LlamaForCausalLM` + peft's LoRA in bf16 holding our
random weights and adapter, copied from JAX through DLPack (with a checksum of every leaf)."""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from benchmarks.accelerator import ours as ours_side
from benchmarks.accelerator import workload as wl


def sync(dev):
  import torch

  if dev.type == "cuda":
    torch.cuda.synchronize(dev)


def reset_peak(dev):
  import torch

  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev)


def torch_peak(dev) -> Optional[int]:
  import torch

  return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None


def torch_model(w: wl.Workload, dev, ours_sums: Optional[dict]):
  """peft(LlamaForCausalLM) in bf16 on `dev` holding our random weights and adapter.

  The weights are made by the same jitted `init_params` as in our worker (same key, same
  program: the same numbers), then copied into torch one stacked leaf at a time through DLPack,
  each JAX leaf freed after its copy (this worker runs JAX with the platform allocator, so a
  freed buffer goes back to the device)."""
  import peft
  import torch
  import transformers

  c = w.config
  hf = {
    k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")
  }
  hf_config = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)
  try:
    with torch.device(dev):
      model = transformers.LlamaForCausalLM(hf_config)
  finally:
    torch.set_default_dtype(default)
  model.requires_grad_(False)
  params = ours_side.init_params_on_device(c)
  ours = ours_side.leaf_sums(params) if ours_sums is None else ours_sums
  targets = _hf_targets(model, c)
  mine = {}
  for path, leaf in _named_leaves(params):
    src = _to_torch(leaf, dev)
    total = 0.0
    for param, index, transpose in targets[path]:
      x = src if index is None else src[index]
      with torch.no_grad():
        param.copy_(x.T if transpose else x)
      total += float(param.float().sum())
    mine[path] = total
    del src
    leaf.delete()
  del params
  rel = max(abs(mine[k] - ours[k]) / max(abs(ours[k]), 1.0) for k in ours)

  lora = ours_side.init_adapter(c, w)
  model = peft.get_peft_model(
    model,
    peft.LoraConfig(
      r=w.lora_rank,
      lora_alpha=w.lora_alpha,
      lora_dropout=w.lora_dropout,
      target_modules="all-linear",
      task_type="CAUSAL_LM",
    ),
  )
  _copy_lora(model, lora, dev)
  return model, {"weight_sums_max_rel_diff": rel, "leaves": len(mine)}


def _named_leaves(params):
  import jax

  from markovian_jax.runtime import sharding

  return [(sharding.path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]


def _to_torch(x, dev):
  import torch

  t = torch.from_dlpack(x)
  return t if t.device == dev else t.to(dev)


_HF_LAYER = {
  "attn_norm/scale": ("input_layernorm", False),
  "mlp_norm/scale": ("post_attention_layernorm", False),
  "attn/q/kernel": ("self_attn.q_proj", True),
  "attn/k/kernel": ("self_attn.k_proj", True),
  "attn/v/kernel": ("self_attn.v_proj", True),
  "attn/o/kernel": ("self_attn.o_proj", True),
  "mlp/gate/kernel": ("mlp.gate_proj", True),
  "mlp/up/kernel": ("mlp.up_proj", True),
  "mlp/down/kernel": ("mlp.down_proj", True),
}


def _hf_targets(model, c) -> dict:
  """{our leaf path: [(torch parameter, layer index or None, transpose)]}."""
  m = model.model
  out = {
    "embed/embedding": [(m.embed_tokens.weight, None, False)],
    "final_norm/scale": [(m.norm.weight, None, False)],
    "lm_head/kernel": [(model.lm_head.weight, None, True)],
  }
  for leaf, (name, transpose) in _HF_LAYER.items():
    module = lambda i, n=name: m.layers[i].get_submodule(n)  # noqa: E731
    out["layers/" + leaf] = [(module(i).weight, i, transpose) for i in range(c.num_layers)]
  return out


def _copy_lora(model, lora, dev):
  """Our adapter into peft's: lora_A.weight [r, in] = a[l].T, lora_B.weight [out, r] = b[l].T."""
  import torch

  layers = lora.params["layers"]
  pattern = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj$")
  copied = 0
  for name, module in model.named_modules():
    match = pattern.search(name)
    if not match or not hasattr(module, "lora_A"):
      continue
    i, group, proj = int(match.group(1)), match.group(2), match.group(3)
    ab = layers["attn" if group == "self_attn" else "mlp"][proj]
    with torch.no_grad():
      for key, mod in (("a", module.lora_A["default"]), ("b", module.lora_B["default"])):
        src = torch.from_numpy(np.array(ab[key][i], np.float32)).to(dev)
        mod.weight.copy_(src.T)
    copied += 1
  if copied != 7 * len(layers["attn"]["q"]["a"]):
    raise RuntimeError(f"copied {copied} LoRA pairs into peft, expected 7 per layer")
