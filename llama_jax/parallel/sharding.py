"""The one place where logical axis names meet mesh axes.

Model code names logical axes only; this table maps them onto the named device mesh
(data, fsdp, tensor). Layouts, in Scaling Book notation (subscript = mesh axes a dim is split over):

  embedding   E[V_tensor, D_fsdp]                 lm_head   W[D_fsdp, V_tensor]
  attention   Wq[D_fsdp, K_tensor, G, H]          Wk, Wv    [D_fsdp, K_tensor, H]
              Wo[K_tensor, G, H, D_fsdp]          (G_tensor instead when K < tensor, e.g. MQA)
  MLP         W_gate, W_up[D_fsdp, F_tensor]      W_down[F_tensor, D_fsdp]
  norms       scale[D] (replicated); stacked layers add a leading unsharded L
  activations x[B_(data,fsdp), T, D]   h[B_(data,fsdp), T, F_tensor]   logits[B_(data,fsdp), T, V_tensor]

FSDP shards parameters over `fsdp` and the batch over (data, fsdp); XLA all-gathers weights per
layer inside the scan and reduce-scatters their gradients.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.errors import ConfigError
from llama_jax.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
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
      ("act_seq", None),
      ("act_embed", None),
      ("act_mlp", "tensor"),
      ("act_kv_heads", heads),
      ("act_q_per_kv", groups),
      ("act_head_dim", None),
      ("act_vocab", "tensor"),
  )
  return params + activations


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices`; fsdp=-1 takes all devices left over."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for flag, v in (("--mesh_data", data), ("--mesh_tensor", tensor)):
    if v < 1:
      raise ConfigError(f"{flag}={v}: must be >= 1.")
  if fsdp == -1:
    if n % (data * tensor):
      raise ConfigError(
          f"--mesh_data={data} x --mesh_tensor={tensor} does not divide the {n} devices; "
          f"choose degrees whose product divides {n}.")
    fsdp = n // (data * tensor)
  if fsdp < 1 or data * fsdp * tensor != n:
    raise ConfigError(
        f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, but "
        f"{n} are available; set --mesh_data/--mesh_fsdp/--mesh_tensor so the product is {n} "
        "(--mesh_fsdp=-1 fills in the rest).")
  return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


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
