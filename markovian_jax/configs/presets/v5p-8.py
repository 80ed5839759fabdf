"""TPU v5p-8 (one host, 4 chips of 95 GB): mesh (4, 1, 1), the base replicated; Q=1 x G=12 =
12 rows, 3 per chip.

  --config=configs/presets/v5p-8.py[:task]   (task: gsm8k by default)
"""

from markovian_jax.configs import base


def get_config(task: str = "gsm8k"):
  return base.with_preset(base.get_config(task), "v5p-8")
