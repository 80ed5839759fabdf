"""Hardware presets: the mesh a setup runs, the device memory the plan assumes, the batch implied.

    preset    chips (hosts)  chip        GiB/chip  mesh (data, fsdp, tensor)  Q at G=12, rows
    1xh100    1              H100 80GB   79.6      (1, 1, 1)                  1: 12
    8xh100    8              H100 80GB   79.6      (8, 1, 1)                  2: 24, 3 per GPU
    2x8xh100  16 (2)         H100 80GB   79.6      (16, 1, 1)                 4: 48, 3 per GPU
    v5e-8     8              TPU v5e     16        (2, 1, 4)                  1: 12, 6 per 4 chips
    v5e-32    32 (8)         TPU v5e     16        (8, 1, 4)                  2: 24, 3 per 4 chips
    v5p-8     4              TPU v5p     95        (4, 1, 1)                  1: 12, 3 per chip
    v5p-64    32 (8)         TPU v5p     95        (32, 1, 1)                 8: 96, 3 per chip

Why these meshes: LoRA leaves the 16 GB bf16 base frozen, so where it fits a chip (H100, v5p) the
base is replicated and every axis splits rows (no weight traffic at all). A 16 GB v5e chip cannot
hold it: tensor=4 splits it Megatron-style inside a host (heads, mlp, vocab; Llama 3's 8 kv heads
divide by 4), which also decodes without moving weights, and data takes the rest.

Q is the smallest questions_per_step whose Q x G rows split over data x fsdp (`questions_for`).
`memory_gib` is the chip's HBM; GPUs let JAX take `usable_fraction` of it by default
(XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75), TPUs all of it. "1xgpu" and "cpu" are mesh-only presets
(memory read from the device, if it reports any).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

GPU_DEFAULT_FRACTION = 0.75  # JAX's default GPU preallocation (XLA_PYTHON_CLIENT_MEM_FRACTION)


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  mesh: tuple  # (data, fsdp, tensor); -1 fills with the available devices
  chip: str = ""
  memory_gib: float = 0.0  # HBM per chip; 0 = unknown (read from the device)
  hosts: int = 1
  gpu: bool = False

  @property
  def devices(self) -> int:
    return math.prod(self.mesh) if -1 not in self.mesh else 0

  def usable_gib(self) -> float:
    """What JAX can allocate per chip by default (0 = unknown)."""
    return self.memory_gib * (gpu_fraction() if self.gpu else 1.0)


_H100 = dict(chip="H100 80GB", memory_gib=79.6, gpu=True)  # 81559 MiB as nvidia-smi reports
_V5E = dict(chip="TPU v5e", memory_gib=16.0)
_V5P = dict(chip="TPU v5p", memory_gib=95.0)

PRESETS = {
  p.name: p
  for p in (
    Preset("1xh100", (1, 1, 1), **_H100),
    Preset("8xh100", (8, 1, 1), **_H100),
    Preset("2x8xh100", (16, 1, 1), hosts=2, **_H100),
    Preset("v5e-8", (2, 1, 4), **_V5E),
    Preset("v5e-32", (8, 1, 4), hosts=8, **_V5E),
    Preset("v5p-8", (4, 1, 1), **_V5P),
    Preset("v5p-64", (32, 1, 1), hosts=8, **_V5P),
    Preset("1xgpu", (1, 1, 1)),
    Preset("cpu", (-1, 1, 1)),
  )
}


def gpu_fraction() -> float:
  """The fraction of a GPU's memory JAX preallocates (env XLA_PYTHON_CLIENT_MEM_FRACTION)."""
  if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0"):
    return 1.0
  try:
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_DEFAULT_FRACTION))
  except ValueError:
    return GPU_DEFAULT_FRACTION


def row_split(mesh_shape) -> int:
  """How many ways the training rows are split: data x fsdp."""
  return int(mesh_shape[0]) * int(mesh_shape[1])


def questions_for(mesh_shape, group_size: int, minibatches: int = 1) -> int:
  """The smallest questions_per_step Q whose Q x G rows (per minibatch) split over data x fsdp."""
  need = row_split(mesh_shape) * int(minibatches)
  return need // math.gcd(int(group_size), need)


def get(name: str) -> Optional[Preset]:
  return PRESETS.get(name) if name else None
