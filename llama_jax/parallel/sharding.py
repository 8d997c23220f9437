"""The one place where logical axis names meet mesh axes.

Model code names logical axes only; this table maps them onto the named device mesh
(data, fsdp, context, tensor). Layouts, in Scaling Book notation (subscript = mesh axes a dim is split over):

  embedding   E[V_tensor, D_fsdp]                 lm_head   W[D_fsdp, V_tensor]
  attention   Wq[D_fsdp, K_tensor, G, H]          Wk, Wv    [D_fsdp, K_tensor, H]
              Wo[K_tensor, G, H, D_fsdp]          (G_tensor instead when K < tensor, e.g. MQA)
  MLP         W_gate, W_up[D_fsdp, F_tensor]      W_down[F_tensor, D_fsdp]
  norms       scale[D] (replicated); stacked layers add a leading unsharded L
  activations x[B_(data,fsdp), T_context, D]   h[B_(data,fsdp), T_context, F_tensor]
              logits[B_(data,fsdp), T_context, V_tensor]
              q[B_(data,fsdp), T_context, K_tensor, G, H]   k, v[B_(data,fsdp), S, K_tensor, H]
  KV cache    k, v[L, B_(data,fsdp), S, K_tensor, H]  (as the layer's k, v: a decode step needs no
              communication beyond the model's own; S whole, each step writes one slot of every row)

FSDP shards parameters over `fsdp` and the batch over (data, fsdp); XLA all-gathers weights per
layer inside the scan and reduce-scatters their gradients. `context` splits the sequence (size 1
unless long context asks for it): rank i holds chunks i and 2·CP−1−i of the row (parallel/context.py)
and K, V are all-gathered across it, as Llama 3 §3.3.2 does. Meshes come from the topology (mesh_utils), not a reshape of
jax.devices(): devices are ordered so that the inner axes (tensor, context, fsdp) stay on the fast
links; with several slices (TPU multislice), `data` goes across slices (DCN) and the rest inside one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax.errors import ConfigError
from llama_jax.config import ModelConfig

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]


def logical_rules(config: ModelConfig, mesh: Mesh | None = None) -> Rules:
  """The rules table. Heads go on `tensor` by KV head, or by query group when K is too small."""
  tensor = mesh.shape["tensor"] if mesh is not None else 1
  heads_on_k = config.num_kv_heads % tensor == 0
  heads = "tensor" if heads_on_k else None
  groups = None if heads_on_k else "tensor"
  params = (
      ("layers", None),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("kv_heads", heads),
      ("q_per_kv", groups),
      ("head_dim", None),
      ("norm", None),
  )
  activations = (
      ("act_batch", BATCH_AXES),
      ("act_seq", "context"),
      ("act_kv_seq", None),  # K/V whole along S: all-gathered across `context` before attention
      ("act_embed", None),
      ("act_mlp", "tensor"),
      ("act_kv_heads", heads),
      ("act_q_per_kv", groups),
      ("act_head_dim", None),
      ("act_vocab", "tensor"),
  )
  kv_cache = (
      ("cache_batch", BATCH_AXES),
      ("cache_seq", None),
      ("cache_kv_heads", heads),
      ("cache_head_dim", None),
  )
  return params + activations + kv_cache


def _slices(devices: Sequence[Any]) -> int:
  """How many slices (ICI islands joined by DCN) the devices span; 1 where devices carry no slice_index."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(*, data: int = 1, fsdp: int = -1, context: int = 1, tensor: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, context, tensor) mesh over `devices`, ordered by the topology; fsdp=-1 fills in."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}
  for axis, v in sizes.items():
    if v < 1 and not (axis == "fsdp" and v == -1):
      raise ConfigError(f"--mesh_{axis}={v}: must be >= 1" + (" (or -1: the rest)." if axis == "fsdp" else "."))
  # Errors name only the degrees set (not 1), so each flag named exists in the entry point used.
  named = lambda: " x ".join(f"--mesh_{a}={v}" for a, v in sizes.items() if v != 1 or a == "fsdp")
  if fsdp == -1:
    if n % (data * context * tensor):
      raise ConfigError(f"{named()} does not divide the {n} devices; choose degrees whose product "
                        f"divides {n}.")
    fsdp = n // (data * context * tensor)
  elif data * fsdp * context * tensor != n:
    raise ConfigError(f"{named()} = {data * fsdp * context * tensor} devices, but {n} are available; "
                      f"choose degrees whose product is {n} (--mesh_fsdp=-1 fills in the rest).")
  # Auto axes: shardings come from our rules table, not from explicit-sharding types.
  auto = (AxisType.Auto,) * len(MESH_AXES)
  slices = _slices(devices)
  if slices == 1:
    return jax.make_mesh((data, fsdp, context, tensor), MESH_AXES, axis_types=auto, devices=devices)
  # Several slices: data parallelism crosses them over DCN; fsdp, context and tensor stay on ICI.
  if data % slices:
    raise ConfigError(f"--mesh_data={data}: the devices span {slices} slices and data parallelism goes "
                      f"across them; use a multiple of {slices}.")
  grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, context, tensor), (slices, 1, 1, 1),
                                              devices)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def validate(config: ModelConfig, mesh: Mesh) -> None:
  """Check that the model's dimensions split evenly over the mesh, with errors that say the fix."""
  t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
  k, g = config.num_kv_heads, config.q_per_kv
  if k % t and g % t:
    raise ConfigError(
        f"--mesh_tensor={t} can split neither num_kv_heads={k} nor the {g} query heads per KV head; "
        f"use a --mesh_tensor that divides {k} (e.g. {np.gcd(k, t)}), and put the rest on --mesh_fsdp.")
  for field, size, axis, degree in (("mlp_dim", config.mlp_dim, "tensor", t),
                                    ("vocab_size", config.vocab_size, "tensor", t),
                                    ("dim", config.dim, "fsdp", f)):
    if size % degree:
      raise ConfigError(
          f"ModelConfig.{field}={size} is not divisible by --mesh_{axis}={degree}; "
          f"choose a --mesh_{axis} that divides {size}.")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, T, ...] input batch: B over (data, fsdp)."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def check_batch(batch_size: int, mesh: Mesh, flag: str = "--batch_size") -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ConfigError(
        f"{flag}={batch_size} does not divide over the {n} data-parallel devices "
        f"(mesh data x fsdp); use a multiple of {n}.")


def shardings_of(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of (boxed) logical-partitioned values, e.g. from jax.eval_shape."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


@contextlib.contextmanager
def use(mesh: Mesh, rules: Rules):
  """Context in which the model's activation constraints resolve onto `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def check_divisible(shape: Sequence[int], logical_axes: Sequence[str]) -> None:
  """Raise if a dim cannot split evenly over the mesh axes its logical name maps to in this context.

  XLA pads uneven splits; under activation constraints that was seen to give wrong gradients on CPU,
  so an uneven batch is an error here rather than a silent pad. Outside `use(...)` it checks nothing.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), nn.get_logical_axis_rules())
  for size, axes, name in zip(shape, spec, logical_axes):
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    n = int(np.prod([mesh.shape[a] for a in axes]))
    if size % n:
      raise ConfigError(f"{name.removeprefix('act_')} size {size} does not divide over mesh axes {axes} "
                        f"({n} devices); use a multiple of {n} (e.g. --batch_size).")


def activation_spec(logical_axes: Sequence[str]) -> PartitionSpec | None:
  """The PartitionSpec of an activation with these logical axes in this context (for the shard_map of a
  kernel, which must name mesh axes); None outside `use(...)` (no mesh: nothing to map over)."""
  if jax.sharding.get_abstract_mesh().empty:
    return None
  return nn.logical_to_mesh_axes(tuple(logical_axes), nn.get_logical_axis_rules())


def spec_devices(entry: Any) -> int:
  """How many devices one PartitionSpec entry (None, an axis or a tuple of axes) splits a dimension over."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = (entry,) if isinstance(entry, str) else (entry or ())
  return int(np.prod([mesh.shape[a] for a in axes]))
