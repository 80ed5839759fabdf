"""One Markovian PG step on Qwen3 and GPT-2 against the float64 PyTorch reference.

The reference (tests/torch_markovian.py: transformers' own Qwen3ForCausalLM / GPT2LMHeadModel +
peft + torch.autograd in float64) and our pipeline (tests/step_reference.py `ours`) take the
same fixed CoTs on a tiny random checkpoint of each family written by transformers (random biases
and norms, SmolLM2's tokenizer), with a rank-4 LoRA whose B is not zero, exported through our PEFT
writer (Qwen3: q/k/v/o/gate/up/down_proj; GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj).
Tolerances are those of test_step_reference (float32 against float64): rewards and baselines
2e-5 nats, advantages 2 * 2e-5 / the smallest group std of R, loss 1e-5 + 1e-4 relative,
every LoRA gradient matrix rtol 1e-3 + 1e-3 * max|g|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import family_cases, helpers
from tests import step_reference as sr

pytestmark = pytest.mark.slow  # a checkpoint, a RunContext and a float64 backward per family

MODULES = {"qwen3": 7, "gpt2": 4}  # LoRA'd linear layers per decoder layer


@pytest.fixture(scope="module", params=sorted(MODULES))
def family_step(request, tmp_path_factory, smollm2_path):
  helpers.require("torch")
  helpers.require("peft")
  from markovian_jax import data as data_lib
  from markovian_jax.models import hf, init_lora, load_checkpoint, load_tokenizer
  from tests import torch_markovian

  name = request.param
  tok = load_tokenizer(smollm2_path)
  model_dir = str(tmp_path_factory.mktemp(f"step_{name}"))
  ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  family_cases.torch_model(name, model_dir, vocab_size=len(tok), **ids)
  tok.save_pretrained(model_dir)
  config, _ = load_checkpoint(model_dir)
  assert config.model_type == name
  lora = init_lora(config, jax.random.PRNGKey(1), rank=sr.RANK, alpha=sr.ALPHA, dropout=0.0)
  rng = np.random.RandomState(3)
  lora = lora.replace(
    params=jax.tree_util.tree_map_with_path(
      lambda p, x: x + jnp.asarray(0.5 * rng.randn(*x.shape), x.dtype) if p[-1].key == "b" else x,
      lora.params,
    )
  )
  adapter_dir = str(tmp_path_factory.mktemp(f"step_{name}_adapter"))
  hf.save_peft_adapter(lora, config, adapter_dir)
  ref = torch_markovian.TorchMarkovian(model_dir, adapter_dir, task="arithmetic")
  examples = data_lib.load_task("arithmetic", "train", num_terms=6)[: sr.Q]
  special = set(ref.tokenizer.all_special_ids)
  good = [
    i
    for i in range(len(ref.tokenizer))
    if i not in special
    and (t := ref.tokenizer.decode([i])).isascii()
    and t.isprintable()
    and t.strip()
    and "Answer" not in t
  ]
  draw = np.random.default_rng(3)
  cot = draw.choice(good, (sr.Q * sr.G, sr.K)).astype(np.int32)
  base_cot = draw.choice(good, (sr.Q, sr.K)).astype(np.int32)
  want = ref.step(
    [(e.question, e.answer) for e in examples],
    cot,
    base_cot,
    cot_length=sr.K,
    temperature=sr.TEMPERATURE,
    kl_penalty=sr.KL_PENALTY,
  )
  got = sr.ours(sr.make_config(model_dir), lora, examples, cot, base_cot)
  return name, want, got


def test_pg_step_matches_the_float64_reference(family_step):
  name, want, got = family_step
  assert want.rewards.reshape(sr.Q, sr.G).std(axis=1).min() > 1e-3
  sr.check_rewards(want, got)  # the shared tolerances
  assert want.kl_loss > 1e-3
  sr.check_loss(want, got)
  assert sorted(got.grads) == sorted(want.grads)
  assert len(want.grads) == 2 * MODULES[name] * 2  # A and B of each module in 2 layers
  scale = max(np.abs(g).max() for g in want.grads.values())
  assert scale > 1e-4
  for key, g in want.grads.items():
    np.testing.assert_allclose(got.grads[key], g, rtol=1e-3, atol=1e-3 * scale, err_msg=key)
