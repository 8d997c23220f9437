"""The KV cache: each layer's rotated keys and values of the positions seen so far, stacked on L.

Layout: `(k_LBSKH, v_LBSKH)`, a plain pair the layer scan slices along L (each Block gets its
`(k_BSKH, v_BSKH)` and returns it written). Slot s of row b holds the key/value of the token at index s
of that row, so a cache is as long as the longest row it will hold (prompt + new tokens).

Writing T new tokens of a row at row indices start_b .. start_b + T - 1 (consecutive; start_b may differ
per row) is a select over S, not a scatter: elementwise, it shards like the cache (B over the batch axes,
K over `tensor`) with no communication. Slots past a row's current index hold zeros or stale values from
padding; the causal mask (kv index <= query index) never lets a query see them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from llama_jax.config import ModelConfig

# Logical axes of one layer's k_BSKH / v_BSKH, and of the stacked cache (mapped in parallel/sharding.py).
LAYER_AXES = ("cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim")
AXES = ("layers",) + LAYER_AXES

Cache = tuple[Float[Array, "L B S K H"], Float[Array, "L B S K H"]]


def init(config: ModelConfig, batch: int, length: int) -> Cache:
  """An empty cache for `batch` rows of up to `length` tokens, in the compute dtype (inside a jit under
  `sharding.use`, it is laid out as the rules table says)."""
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  zeros = jnp.zeros(shape, config.dtype)
  return (nn.with_logical_constraint(zeros, AXES), nn.with_logical_constraint(zeros, AXES))


def write(cache_BSKH: Float[Array, "B S K H"], new_BTKH: Float[Array, "B T K H"],
          start_B: Int[Array, "B"]) -> Float[Array, "B S K H"]:
  """`cache_BSKH` with row b's slots start_b .. start_b + T - 1 replaced by new_BTKH[b]."""
  s, t = cache_BSKH.shape[1], new_BTKH.shape[1]
  offset_BS = jnp.arange(s)[None, :] - start_B[:, None]  # which new token (if any) lands in slot s
  inside_BS = (offset_BS >= 0) & (offset_BS < t)
  picked_BSKH = jnp.take_along_axis(new_BTKH, jnp.clip(offset_BS, 0, t - 1)[:, :, None, None], axis=1)
  out_BSKH = jnp.where(inside_BS[:, :, None, None], picked_BSKH.astype(cache_BSKH.dtype), cache_BSKH)
  return nn.with_logical_constraint(out_BSKH, LAYER_AXES)
