"""The shipped run configs (ml-collections), installed with the package.

  schema.py                 every key, typed: its default and description, written once
  base.py                   get_config(task) (built from schema.py), variants, with_preset(...)
  <task>.py, demo.py        one file per task (`--config=gsm8k`, `--config=configs/gsm8k.py`)
  presets/<name>.py[:task]  a hardware preset with the batch it implies (`--config=presets/8xh100`)

A config file of your own, anywhere, starts from the same defaults:

  from markovian_jax.configs import base
  def get_config():
    c = base.get_config("gsm8k"); c.train.num_steps = 500; return c

May import: runtime.
"""
