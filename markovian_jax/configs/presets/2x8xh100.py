"""Two 8xH100 hosts (launch/gpu_multinode.sh): mesh (16, 1, 1), the base replicated, rows
split 16 ways; Q=4 x G=12 = 48 rows, 3 per GPU.

  --config=configs/presets/2x8xh100.py[:task]   (task: gsm8k by default)
"""

from markovian_jax.configs import base


def get_config(task: str = "gsm8k"):
  return base.with_preset(base.get_config(task), "2x8xh100")
