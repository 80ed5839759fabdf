"""One H100 80GB: mesh (1, 1, 1), the 16 GB bf16 base on the GPU; Q=1 x G=12 = 12 rows.

--config=configs/presets/1xh100.py[:task]   (task: gsm8k by default)
"""

from markovian_jax.configs import base


def get_config(task: str = "gsm8k"):
  return base.with_preset(base.get_config(task), "1xh100")
