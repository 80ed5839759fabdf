"""Fixtures of the one-step comparisons against the float64 PyTorch reference
(test_step_reference.py, test_bf16.py): the reference module, and the adapter and fixed samples
both sides step on. Module-scoped, so a module that overrides `tiny_model_dir` (test_bf16.py's
bfloat16-rounded weights) gets its own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests.step_reference import ALPHA, RANK, G, K, Q


@pytest.fixture(scope="module")
def torch_mod():
  torch = helpers.require("torch")
  helpers.require("transformers")
  helpers.require("peft")
  torch.set_num_threads(1)
  from tests import torch_markovian

  return torch_markovian


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory, torch_mod):
  """(our LoraAdapter, the torch reference on its PEFT export, examples, CoT ids, CoT' ids)."""
  from markovian_jax import data as data_lib
  from markovian_jax.models import hf, init_lora, load_checkpoint

  config, _ = load_checkpoint(tiny_model_dir)
  lora = init_lora(config, jax.random.PRNGKey(1), rank=RANK, alpha=ALPHA, dropout=0.0)
  rng = np.random.RandomState(3)
  lora = lora.replace(
    params=jax.tree_util.tree_map_with_path(
      lambda p, x: x + jnp.asarray(0.5 * rng.randn(*x.shape), x.dtype) if p[-1].key == "b" else x,
      lora.params,
    )
  )
  adapter_dir = str(tmp_path_factory.mktemp("step_reference_adapter"))
  hf.save_peft_adapter(lora, config, adapter_dir)
  ref = torch_mod.TorchMarkovian(tiny_model_dir, adapter_dir, task="arithmetic")

  examples = data_lib.load_task("arithmetic", "train", num_terms=6)[:Q]
  # CoT tokens: random ordinary tokens that decode to printable ASCII (both sides decode them and
  # re-tokenize the text inside the answer row). The policy terms use the ids themselves.
  tok = ref.tokenizer
  special = set(tok.all_special_ids)
  good = [
    i
    for i in range(len(tok))
    if i not in special
    and (t := tok.decode([i])).isascii()
    and t.isprintable()
    and t.strip()
    and "Answer" not in t
  ]
  ids = np.random.default_rng(3)  # a draw whose groups' rewards spread by > 0.02 nats
  cot = ids.choice(good, (Q * G, K)).astype(np.int32)
  base_cot = ids.choice(good, (Q, K)).astype(np.int32)
  return lora, ref, examples, cot, base_cot
