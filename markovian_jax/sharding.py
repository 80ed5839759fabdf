"""Sharding rules: the whole parallelism policy as two small tables.

1. `PARAM_AXES`: every weight's dims named with *logical* axes (what the dim means).
2. `DEFAULT_RULES`: logical axis -> mesh axes of the `('data', 'fsdp', 'tensor')` mesh.

    logical axis   mesh axes          why
    batch          (data, fsdp)       data parallelism; FSDP is data parallelism with sharded weights
    embed          fsdp               the model dim of every weight: FSDP shards it
    q_heads        tensor             Megatron-style attention: heads split across tensor ranks
    kv_heads       tensor
    mlp            tensor             gate/up column-split, down row-split
    vocab          tensor             embedding and LM head split over the vocabulary
    layers, norm, lora_rank  --       replicated (small, or scanned over)
    cache_batch    (data, fsdp)       KV cache follows the batch ...
    cache_kv_heads tensor             ... and the kv heads

With mesh (N, 1, 1) the frozen base is replicated and only the batch is split (the right choice for
LoRA on 8xH100, where the 16 GB base fits each GPU); on 16 GB TPU chips put the base on `tensor`
and/or `fsdp`. A dim that a mesh axis does not divide is left replicated on that axis rather than
failing, so tiny test models run on any mesh.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: Mapping[str, Optional[tuple]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": None,
    "norm": None,
    "lora_rank": None,
    "cache_batch": ("data", "fsdp"),
    "cache_seq": None,
    "cache_kv_heads": ("tensor",),
    "head_dim": None,
}

# (path regex, logical axes of the kernel). Paths are '/'-joined keys of the params tree.
PARAM_AXES = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"layers/attn/q/kernel$", ("layers", "embed", "q_heads")),
    (r"layers/attn/(k|v)/kernel$", ("layers", "embed", "kv_heads")),
    (r"layers/attn/o/kernel$", ("layers", "q_heads", "embed")),
    (r"layers/mlp/(gate|up)/kernel$", ("layers", "embed", "mlp")),
    (r"layers/mlp/down/kernel$", ("layers", "mlp", "embed")),
    (r"layers/\w+_norm/scale$", ("layers", "norm")),
    (r"final_norm/scale$", ("norm",)),
)

# Mesh shapes (data, fsdp, tensor) by hardware, selected with config.mesh.preset.
MESH_PRESETS = {
    "1xgpu": (1, 1, 1),
    "cpu": (-1, 1, 1),
    # LoRA on 8xH100: the 16 GB bf16 base fits each GPU; replicate it and split only the batch.
    "8xh100": (8, 1, 1),
    # v5e chips have 16 GB: the 8B base must be split; tensor=4 inside a host, data over the rest.
    "v5e-8": (2, 1, 4),
    "v5e-32": (8, 1, 4),
    # v5p (95 GB/chip): replicate like H100.
    "v5p-8": (4, 1, 1),
    "v5p-64": (32, 1, 1),
}

# Keys [L, B, Hkv, Dh, S] and values [L, B, Hkv, S, Dh] (models/llama.py: cache_shape).
KEY_CACHE_AXES = ("layers", "cache_batch", "cache_kv_heads", "head_dim", "cache_seq")
VALUE_CACHE_AXES = ("layers", "cache_batch", "cache_kv_heads", "cache_seq", "head_dim")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills at most one -1 with the remaining devices; a smaller explicit mesh uses the first
  devices (e.g. (1, 1, 1) on an 8-GPU host)."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: use positive sizes and at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) > num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes (jax 0.10 defaults to Explicit, which breaks
  `with_sharding_constraint`)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  devices = devices[:math.prod(shape)]
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_logical_axes(path: str, ndim: int) -> tuple:
  """Logical axes of a base weight (by path) or of a LoRA `a`/`b` leaf (from its target kernel)."""
  lora = re.search(r"/(a|b)$", path)
  kernel_path = re.sub(r"/(a|b)$", "/kernel", path) if lora else path
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, kernel_path):
      if lora:
        layers, n_in, n_out = axes
        axes = (layers, n_in, "lora_rank") if lora.group(1) == "a" else (layers, "lora_rank", n_out)
      if len(axes) != ndim:
        raise ValueError(f"{path}: rank {ndim} does not match logical axes {axes}")
      return axes
  raise KeyError(f"no sharding rule for parameter {path!r}")


def logical_to_spec(axes: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
                    mesh: Optional[Mesh] = None,
                    rules: Mapping[str, Optional[tuple]] = DEFAULT_RULES) -> P:
  """PartitionSpec for logical axes; with `shape` and `mesh`, a mesh axis that does not divide its
  dim (or is already used by an earlier dim) is dropped."""
  used: set = set()
  out = []
  for i, name in enumerate(axes):
    mesh_axes = tuple(rules.get(name) or ()) if name is not None else ()
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
    keep = []
    for ax in mesh_axes:
      if ax in used:
        continue
      if mesh is not None and shape is not None:
        size = math.prod(mesh.shape[a] for a in keep + [ax])
        if shape[i] % size:
          continue
      keep.append(ax)
    used.update(keep)
    out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return P(*out)


def named_sharding(mesh: Mesh, axes, shape, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def param_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of a base-params or LoRA-params tree (arrays or shape structs)."""
  def one(path, leaf):
    return named_sharding(mesh, param_logical_axes(path_str(path), leaf.ndim), leaf.shape, rules)
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules=DEFAULT_RULES) -> NamedSharding:
  """Shards the leading (batch) dim over the batch mesh axes; other dims replicated."""
  return named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape, rules)


def cache_sharding(mesh: Mesh, shape: Sequence[int], rules=DEFAULT_RULES, *,
                   values: bool = False) -> NamedSharding:
  """Sharding of the key cache (or, with `values`, the value cache)."""
  return named_sharding(mesh, VALUE_CACHE_AXES if values else KEY_CACHE_AXES, shape, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_tree(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """Places a params/LoRA tree on the mesh according to the rules."""
  return jax.device_put(tree, param_shardings(tree, mesh, rules))
