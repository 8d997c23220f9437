"""Which global batch rows this process feeds, and the global arrays it builds from them.

A batch x[B_(data,fsdp), T] is split over the batch axes only: every device of a tensor group holds the
same rows, and a tensor group may span processes (one process per GPU with --mesh_tensor=2; a TPU mesh
whose tensor group crosses hosts). So "process p feeds rows p::P" is wrong: the rows a process must feed
are those of the shards its devices hold, and processes holding the same shard must feed the same rows.
Here they are computed from the sharding itself (`devices_indices_map`), and the data pipeline is asked
for exactly those global rows.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax.parallel import sharding


def local_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """Sorted global row indices of a [batch_size, ...] batch held by this process's devices."""
  sh = sharding.batch_sharding(mesh, ndim=1)
  rows = set()
  for device, (idx,) in sh.devices_indices_map((batch_size,)).items():
    if device.process_index == jax.process_index():
      rows.update(range(*idx.indices(batch_size)))
  return np.asarray(sorted(rows), np.int64)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host arrays of the whole [B, ...] batch → one global array each, split over (data, fsdp).

  Only the rows of this process's devices are read (`local_rows`); the others may hold anything.
  """
  out = {}
  for k, v in batch.items():
    sh = sharding.batch_sharding(mesh, ndim=v.ndim)
    out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
  return out
