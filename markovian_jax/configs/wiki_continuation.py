"""wiki_continuation: reference defaults (the reference code's temperature 1.0, 50-token context
and target, G = 16).

  --config=configs/wiki_continuation.py[:VARIANT][,t1.5]

Option `t1.5`: CoTs sampled at temperature 1.5, the setting of the published wiki-continuation
runs (the reference code's default, kept here, is 1.0). Evaluation samples at the training
temperature unless eval.temperature says otherwise.
"""

from markovian_jax.configs import base


def _published_temperature(c):
  c.sampling.temperature = 1.5


OPTIONS = {"t1.5": _published_temperature}


def get_config(arg: str = ""):
  """`arg`: a variant name (base.VARIANTS) and/or `t1.5`, comma-separated."""
  return base.task_config("wiki_continuation", arg, OPTIONS)
