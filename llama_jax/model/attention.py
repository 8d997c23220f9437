"""Attention kernels behind one function. The plain einsum version is the default and the test oracle.

Shapes: q_BTKGH, k_BSKH, v_BSKH, a `MaskInfo` (the mask *description*) → out_BTKGH.

Attention receives a description of who may see whom, never a [B, T, S] mask: each implementation
derives its own masking (only the einsum oracle and the library call below build a [B, T, S] array, inside
themselves; at 128K tokens that array is 16 GiB per row, so a blockwise kernel must not receive one).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row stays NaN-free


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
  def self_attention(cls, segment_ids_BT: Int[Array, "B T"] | None = None, causal: bool = True
                     ) -> "MaskInfo":
    """Queries and keys are the same tokens of the row (training, scoring, cache-less sampling)."""
    return cls(q_segment_BT=segment_ids_BT, kv_segment_BS=segment_ids_BT, causal=causal)


def _mask_BTS(info: MaskInfo, b: int, t: int, s: int) -> Bool[Array, "B T S"]:
  """The materialized mask, for the implementations that need one (private: the oracle and the library)."""
  mask_BTS = jnp.ones((b, t, s), bool)
  if info.causal:
    q_BT = jnp.broadcast_to(jnp.arange(t), (b, t)) if info.q_index_BT is None else info.q_index_BT
    kv_BS = jnp.broadcast_to(jnp.arange(s), (b, s)) if info.kv_index_BS is None else info.kv_index_BS
    mask_BTS &= kv_BS[:, None, :] <= q_BT[:, :, None]
  if info.q_segment_BT is not None:
    mask_BTS &= info.q_segment_BT[:, :, None] == info.kv_segment_BS[:, None, :]
  return mask_BTS


def _einsum_attention(q_BTKGH, k_BSKH, v_BSKH, info: MaskInfo):
  b, t, _, _, h = q_BTKGH.shape
  mask_BTS = _mask_BTS(info, b, t, k_BSKH.shape[1])
  # Logits accumulated and returned in fp32 whatever the compute dtype (a bf16 result would round logits
  # of ~100 to steps of 0.5), and the softmax in fp32.
  logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  logits_BKGTS = logits_BKGTS / jnp.sqrt(jnp.float32(h))
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASKED)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)


def _library_attention(q_BTKGH, k_BSKH, v_BSKH, info: MaskInfo, implementation):
  b, t, k, g, h = q_BTKGH.shape
  # jax.nn.dot_product_attention takes N = K*G query heads, kv head of query head n being n // G.
  q_BTNH = q_BTKGH.reshape(b, t, k * g, h)
  # It has no segment ids (jax 0.10.2: mask, is_causal, sequence lengths, windows), so the mask is built
  # here, for this call only.
  mask_BTS = _mask_BTS(info, b, t, k_BSKH.shape[1])
  out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                          implementation=implementation)
  return out_BTNH.reshape(b, t, k, g, h)


def attention(q_BTKGH: Float[Array, "B T K G H"], k_BSKH: Float[Array, "B S K H"],
              v_BSKH: Float[Array, "B S K H"], info: MaskInfo,
              impl: str = "einsum") -> Float[Array, "B T K G H"]:
  """Grouped-query softmax attention with scale 1/sqrt(H), masked as `info` describes.

  impl: 'einsum' (plain, any backend), 'xla' (jax.nn.dot_product_attention), 'cudnn' (fused GPU kernel,
  needs bf16/fp16 inputs on a GPU).
  """
  if impl == "einsum":
    return _einsum_attention(q_BTKGH, k_BSKH, v_BSKH, info)
  if impl in ("xla", "cudnn"):
    return _library_attention(q_BTKGH, k_BSKH, v_BSKH, info, impl)
  raise ValueError(f"attention impl {impl!r}: choose 'einsum', 'xla' or 'cudnn'.")
