"""TPU v5e-8 (one host, 8 chips of 16 GB): mesh (2, 1, 4), the base split over tensor=4 (4 GB per
chip), rows over data=2; Q=1 x G=12 = 12 rows, 6 per 4-chip group.

  --config=configs/presets/v5e-8.py[:task]   (task: gsm8k by default)
"""

from markovian_jax.configs import base


def get_config(task: str = "gsm8k"):
  return base.with_preset(base.get_config(task), "v5e-8")
