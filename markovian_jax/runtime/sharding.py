"""Sharding rules: the whole parallelism policy as two small tables.

1. `PARAM_AXES`: every weight's dims named with *logical* axes (what the dim means).
2. `DEFAULT_RULES`: logical axis -> mesh axes of the `('data', 'fsdp', 'tensor')` mesh.

    logical axis   mesh axes          why
    batch          (data, fsdp)       data parallelism; FSDP: data parallelism, weights sharded
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
and/or `fsdp` (`presets`).

3. `DECODE_RULES`: the sampler's layout. A decode step reads every weight once per token, so an
   FSDP-sharded weight would be all-gathered every token. Decoding uses fsdp as a second
   tensor-parallel axis instead (heads, mlp, vocab and the cache's kv heads over fsdp x tensor;
   rows over data only): the weights stay split as much as in training, and a token costs one
   activation all-reduce per layer instead of a weight all-gather. (Tunix's
   `get_default_sharding(is_sampling=True)` drops fsdp from the sampler's weights instead, which
   replicates them fsdp times: memory 16 GB chips do not have.) With fsdp = 1 both tables give
   the same layout.

`logical_to_spec` leaves a dim replicated on a mesh axis that does not divide it, so tiny test
models run on any mesh; runs do not rely on that: `config_validation` refuses rows that do not
split over data x fsdp and `plan.check` weights that do not split as the mesh intends (`unsplit`),
unless `mesh.allow_replication` asks for the lenient path.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence, Union

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from markovian_jax.runtime import presets

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
  (r"(^|/)embed/embedding$", ("vocab", "embed")),
  (r"lm_head/kernel$", ("embed", "vocab")),
  (r"layers/attn/q/kernel$", ("layers", "embed", "q_heads")),
  (r"layers/attn/(k|v)/kernel$", ("layers", "embed", "kv_heads")),
  (r"layers/attn/o/kernel$", ("layers", "q_heads", "embed")),
  (r"layers/mlp/(gate|up)/kernel$", ("layers", "embed", "mlp")),
  (r"layers/mlp/down/kernel$", ("layers", "mlp", "embed")),
  (r"layers/\w+_norm/(scale|bias)$", ("layers", "norm")),
  (r"final_norm/(scale|bias)$", ("norm",)),
  # Family variants (models/config.py FAMILIES). A fused q|k|v or gate|up kernel splits its
  # output dim like q / gate: numerically exact on any mesh (the q, k, v slices are resharded
  # where a split crosses them); the families that fuse are small readers.
  (r"layers/attn/qkv/kernel$", ("layers", "embed", "q_heads")),
  (r"layers/mlp/gate_up/kernel$", ("layers", "embed", "mlp")),
  (r"layers/attn/(q|qkv)/bias$", ("layers", "q_heads")),
  (r"layers/attn/(k|v)/bias$", ("layers", "kv_heads")),
  (r"layers/mlp/(gate|up|gate_up)/bias$", ("layers", "mlp")),
  (r"layers/(attn/o|mlp/down)/bias$", ("layers", "norm")),
  (r"layers/attn/(q|k)_norm/scale$", ("layers", "head_dim")),
  (r"pos_embed/embedding$", (None, "embed")),
)

# The sampler's layout (module docstring, 3.): rows over data; fsdp joins tensor on the weights.
DECODE_RULES: Mapping[str, Optional[tuple]] = {
  **DEFAULT_RULES,
  "batch": ("data",),
  "embed": None,
  "q_heads": ("fsdp", "tensor"),
  "kv_heads": ("fsdp", "tensor"),
  "mlp": ("fsdp", "tensor"),
  "vocab": ("fsdp", "tensor"),
  "cache_batch": ("data",),
  "cache_kv_heads": ("fsdp", "tensor"),
}

# Mesh shapes (data, fsdp, tensor) by hardware, selected with config.mesh.preset (`presets`).
MESH_PRESETS = {name: p.mesh for name, p in presets.PRESETS.items()}

# Keys [L, B, Hkv, Dh, S] and values [L, B, Hkv, S, Dh] (models/decoder.py: cache_shape).
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
    raise ValueError(
      f"mesh shape {shape} needs {math.prod(shape)} devices, but {num_devices} are available"
    )
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes (jax 0.10 defaults to Explicit, which breaks
  `with_sharding_constraint`)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  devices = devices[: math.prod(shape)]
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(
      shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )
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


MeshLike = Union[Mesh, Mapping[str, int], Sequence[int]]


def axis_sizes(mesh: MeshLike) -> dict:
  """{axis name: size} of a Mesh, a {name: size} mapping or a (data, fsdp, tensor) shape, so that
  layouts can be planned for meshes this host does not have."""
  if isinstance(mesh, Mesh):
    return dict(mesh.shape)
  if isinstance(mesh, Mapping):
    return dict(mesh)
  return dict(zip(MESH_AXES, (int(s) for s in mesh)))


def logical_to_spec(
  axes: Sequence[Optional[str]],
  shape: Optional[Sequence[int]] = None,
  mesh: Optional[MeshLike] = None,
  rules: Mapping[str, Optional[tuple]] = DEFAULT_RULES,
) -> P:
  """PartitionSpec for logical axes; with `shape` and `mesh` (a Mesh or `axis_sizes` input), a
  mesh axis that does not divide its dim (or is already used by an earlier dim) is dropped."""
  sizes = axis_sizes(mesh) if mesh is not None else None
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
      if sizes is not None and shape is not None:
        size = math.prod(sizes[a] for a in keep + [ax])
        if shape[i] % size:
          continue
      keep.append(ax)
    used.update(keep)
    out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return P(*out)


def shard_shape(axes, shape: Sequence[int], mesh: MeshLike, rules=DEFAULT_RULES) -> tuple:
  """The per-device shape of an array with logical `axes` on `mesh`."""
  sizes = axis_sizes(mesh)
  spec = logical_to_spec(axes, shape, sizes, rules)
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    out.append(dim // math.prod(sizes[a] for a in names))
  return tuple(out)


def unsplit(axes, shape: Sequence[int], mesh: MeshLike, rules=DEFAULT_RULES) -> list:
  """[(dim index, logical axis, mesh axis, mesh size)]: the mesh axes of size > 1 that `rules` give
  a dim but that do not divide it, so that the array is replicated on them."""
  sizes = axis_sizes(mesh)
  spec = logical_to_spec(axes, shape, sizes, rules)
  kept = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
  out = []
  for i, name in enumerate(axes):
    for ax in (rules.get(name) or ()) if name is not None else ():
      if sizes.get(ax, 1) > 1 and ax not in kept:
        out.append((i, name, ax, sizes[ax]))
        kept.add(ax)  # report each mesh axis once
  return out


def batch_split(mesh: MeshLike, rules=DEFAULT_RULES) -> int:
  """How many ways the batch (rows) is split: data x fsdp in training, data when decoding."""
  sizes = axis_sizes(mesh)
  return math.prod(sizes[a] for a in rules["batch"] or ())


def pad_rows(rows: int, mesh: MeshLike, rules=DEFAULT_RULES) -> int:
  """`rows` rounded up to a multiple of `batch_split`."""
  split = batch_split(mesh, rules)
  return -(-int(rows) // split) * split


def named_sharding(mesh: Mesh, axes, shape, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def param_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of a base-params or LoRA-params tree (arrays or shape structs)."""

  def one(path, leaf):
    return named_sharding(mesh, param_logical_axes(path_str(path), leaf.ndim), leaf.shape, rules)

  return jax.tree_util.tree_map_with_path(one, tree)


def placement(tree, mesh: Optional[Mesh] = None, rules=None):
  """Where each leaf of a params tree lives: `param_shardings` on a mesh, else the first local
  device (a single-device load with no mesh)."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device, tree)
  return param_shardings(tree, mesh, rules or DEFAULT_RULES)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules=DEFAULT_RULES) -> NamedSharding:
  """Shards the leading (batch) dim over the batch mesh axes; other dims replicated."""
  return named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape, rules)


def cache_sharding(
  mesh: Mesh, shape: Sequence[int], rules=DEFAULT_RULES, *, values: bool = False
) -> NamedSharding:
  """Sharding of the key cache (or, with `values`, the value cache)."""
  return named_sharding(mesh, VALUE_CACHE_AXES if values else KEY_CACHE_AXES, shape, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_tree(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """Places a params/LoRA tree on the mesh according to the rules."""
  return jax.device_put(tree, param_shardings(tree, mesh, rules))
