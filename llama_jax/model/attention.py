"""Attention kernels behind one function. The plain einsum version is the default and the test oracle.

Shapes: q_BTKGH, k_BSKH, v_BSKH, mask_BTS (True = may attend) → out_BTKGH.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row stays NaN-free


def make_mask(segment_ids_BT: Int[Array, "B T"] | None, batch: int, length: int) -> Bool[Array, "B T S"]:
  """Causal (by index in the row) and document mask: a token sees earlier tokens of its own segment."""
  idx = jnp.arange(length)
  mask_TS = idx[:, None] >= idx[None, :]
  if segment_ids_BT is None:
    return jnp.broadcast_to(mask_TS, (batch, length, length))
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return mask_TS[None] & same_BTS


def _einsum_attention(q_BTKGH, k_BSKH, v_BSKH, mask_BTS):
  h = q_BTKGH.shape[-1]
  # Logits accumulated and returned in fp32 whatever the compute dtype (a bf16 result would round logits
  # of ~100 to steps of 0.5), and the softmax in fp32.
  logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  logits_BKGTS = logits_BKGTS / jnp.sqrt(jnp.float32(h))
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASKED)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)


def _library_attention(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, implementation):
  b, t, k, g, h = q_BTKGH.shape
  # jax.nn.dot_product_attention takes N = K*G query heads, kv head of query head n being n // G.
  q_BTNH = q_BTKGH.reshape(b, t, k * g, h)
  out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                          implementation=implementation)
  return out_BTNH.reshape(b, t, k, g, h)


def attention(q_BTKGH: Float[Array, "B T K G H"], k_BSKH: Float[Array, "B S K H"],
              v_BSKH: Float[Array, "B S K H"], mask_BTS: Bool[Array, "B T S"],
              impl: str = "einsum") -> Float[Array, "B T K G H"]:
  """Grouped-query softmax attention with scale 1/sqrt(H).

  impl: 'einsum' (plain, any backend), 'xla' (jax.nn.dot_product_attention), 'cudnn' (fused GPU kernel,
  needs bf16/fp16 inputs on a GPU).
  """
  if impl == "einsum":
    return _einsum_attention(q_BTKGH, k_BSKH, v_BSKH, mask_BTS)
  if impl in ("xla", "cudnn"):
    return _library_attention(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, impl)
  raise ValueError(f"attention impl {impl!r}: choose 'einsum', 'xla' or 'cudnn'.")
