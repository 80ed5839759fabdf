"""wiki_continuation: reference defaults (50-token context and target, G = 16, CoTs at 1.0).

  --config=configs/wiki_continuation.py[:VARIANT][,t1.5]

Where each CoT temperature comes from:
  1.0      the default: the reference code's command-line default.
  1.5      option `t1.5`: what the production wiki-continuation runs behind the published
           results sampled at (their logged hyperparameters).
  1.2-1.4  what the paper's appendix table lists for its wiki runs; no option: none of the runs
           analysed used them (`--config.sampling.temperature=1.3` sets one).
Evaluation samples at the training temperature unless eval.temperature says otherwise.
"""

from markovian_jax.configs import base


def _published_temperature(c):
  c.sampling.temperature = 1.5


OPTIONS = {"t1.5": _published_temperature}


def get_config(arg: str = ""):
  """`arg`: a variant name (base.VARIANTS) and/or `t1.5`, comma-separated."""
  return base.task_config("wiki_continuation", arg, OPTIONS)
