"""TPU v5e-32 (8 hosts of 4 chips, 16 GB each; launch/tpu_pod.sh): mesh (8, 1, 4), the base split
over tensor=4 inside each host, rows over data=8; Q=2 x G=12 = 24 rows, 3 per 4-chip group.

  --config=configs/presets/v5e-32.py[:task]   (task: gsm8k by default)
"""

from markovian_jax.configs import base


def get_config(task: str = "gsm8k"):
  return base.with_preset(base.get_config(task), "v5e-32")
