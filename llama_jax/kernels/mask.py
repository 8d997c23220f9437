"""The mask *description* every attention implementation receives (never a materialized [B, T, S] mask).

It lives below the model so that the kernels and the model's attention function can both import it.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int


# The logit of a masked pair: finite, so a fully masked row stays NaN-free (the oracle and the kernels
# must agree on it).
MASKED = -0.7 * float(np.finfo(np.float32).max)


@flax.struct.dataclass
class MaskInfo:
  """Query t of row b may attend to key s iff q_segment_BT[b, t] == kv_segment_BS[b, s] and, when
  `causal`, kv_index_BS[b, s] <= q_index_BT[b, t].

  Indices are positions *in the row* (not RoPE positions, which restart per packed document): today's
  self-attention uses arange(T) for both (None means that). A KV cache passes the query's offset in the
  cache, and context parallelism each shard's slice of the row, without changing an implementation.
  Segments: the document id of each token (0 = padding, which attends only to padding, so no row is
  fully masked); None = one document.
  """

  q_segment_BT: Int[Array, "B T"] | None = None
  kv_segment_BS: Int[Array, "B S"] | None = None
  q_index_BT: Int[Array, "B T"] | None = None
  kv_index_BS: Int[Array, "B S"] | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def self_attention(cls, segment_ids_BT: Int[Array, "B T"] | None = None, causal: bool = True,
                     row_index_BT: Int[Array, "B T"] | None = None) -> "MaskInfo":
    """Queries and keys are the same tokens of the row (training, scoring, cache-less sampling);
    `row_index_BT`: their indices in the row when the tokens are laid out otherwise (context parallelism)."""
    return cls(q_segment_BT=segment_ids_BT, kv_segment_BS=segment_ids_BT, q_index_BT=row_index_BT,
               kv_index_BS=row_index_BT, causal=causal)

  def indices(self, b: int, t: int, s: int) -> tuple[Int[Array, "B T"], Int[Array, "B S"]]:
    """(q_index_BT, kv_index_BS), arange in the row where None."""
    q_BT = jnp.broadcast_to(jnp.arange(t), (b, t)) if self.q_index_BT is None else self.q_index_BT
    kv_BS = jnp.broadcast_to(jnp.arange(s), (b, s)) if self.kv_index_BS is None else self.kv_index_BS
    return q_BT, kv_BS
