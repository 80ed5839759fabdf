"""One 8xH100 host: mesh (8, 1, 1), the base replicated (it fits each GPU), rows split 8
ways; Q=2 x G=12 = 24 rows, 3 per GPU (12 rows would not split over 8).

  --config=configs/presets/8xh100.py[:task]   (task: gsm8k by default)
"""

from markovian_jax.configs import base


def get_config(task: str = "gsm8k"):
  return base.with_preset(base.get_config(task), "8xh100")
