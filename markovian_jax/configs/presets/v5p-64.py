"""TPU v5p-64 (8 hosts, 32 chips of 95 GB; launch/tpu_pod.sh): mesh (32, 1, 1), the base
replicated; Q=8 x G=12 = 96 rows, 3 per chip.

  --config=configs/presets/v5p-64.py[:task]   (task: gsm8k by default)
"""

from markovian_jax.configs import base


def get_config(task: str = "gsm8k"):
  return base.with_preset(base.get_config(task), "v5p-64")
