"""Attention kernels behind one function. The plain einsum version is the test oracle (and CPU's choice).

Shapes: q_BTKGH, k_BSKH, v_BSKH, a `MaskInfo` (the mask *description*) → out_BTKGH.

Attention receives a description of who may see whom, never a [B, T, S] mask: each implementation
derives its own masking (only the einsum oracle and the library call below build a [B, T, S] array, inside
themselves; at 128K tokens that array is 16 GiB per row, so a blockwise kernel must not receive one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from llama_jax.config import AttentionImpl
from llama_jax.errors import ConfigError
from llama_jax.kernels import blockwise, cudnn, splash
from llama_jax.kernels.mask import MASKED as _MASKED  # finite: a fully masked row stays NaN-free
from llama_jax.kernels.mask import MaskInfo  # re-exported: the model's callers import it from here


def _mask_BTS(info: MaskInfo, b: int, t: int, s: int) -> Bool[Array, "B T S"]:
  """The materialized mask, for the implementations that need one (private: the oracle and the library)."""
  mask_BTS = jnp.ones((b, t, s), bool)
  if info.causal:
    q_BT, kv_BS = info.indices(b, t, s)
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


def _xla_attention(q_BTKGH, k_BSKH, v_BSKH, info: MaskInfo):
  b, t, k, g, h = q_BTKGH.shape
  # jax.nn.dot_product_attention takes N = K*G query heads, kv head of query head n being n // G.
  q_BTNH = q_BTKGH.reshape(b, t, k * g, h)
  # It has no segment ids (jax 0.10.2: mask, is_causal, sequence lengths, windows), so the mask is built
  # here, for this call only.
  mask_BTS = _mask_BTS(info, b, t, k_BSKH.shape[1])
  out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                          implementation="xla")
  return out_BTNH.reshape(b, t, k, g, h)


# 'auto' on CPU: blockwise in blocks of CPU_BLOCK × CPU_BLOCK once a row is longer than one block (the
# einsum below that: the same work without the loops). Small blocks skip the masked half of a causal
# row and keep each block's scores in cache. Measured train-step time vs einsum (both alternating in one
# process, layers unrolled; benchmarks/bench_configs.py): tiny 8 × 256 0.50×, the run.sh model 16 × 256
# 0.87×, the 45M 8 × 512 0.87×; blocks of 128: 0.58×, 0.90×, 0.88×. attention_block_size stays the
# accelerators' (and an explicit 'blockwise''s) choice.
CPU_BLOCK = 64


def resolve(impl: str, backend: str, dtype, t: int, s: int, info: MaskInfo, block_size: int = 512) -> str:
  """The implementation 'auto' stands for here (any other choice is returned as given): splash on TPU,
  cuDNN on GPU, on CPU blockwise (in CPU_BLOCK blocks) past CPU_BLOCK positions and einsum below; on an
  accelerator whose kernel cannot take this attention (row indices of the context-parallel layout,
  lengths or blocks off splash's 128 grid, float32 or packed documents before Hopper for cuDNN),
  blockwise: memory linear in the length, like the kernels."""
  if impl != "auto":
    return impl
  if backend == "tpu":
    return "splash" if splash.unsupported(t, s, info, block_size) is None else "blockwise"
  if backend == "gpu":
    try:
      cudnn.check_supported(backend, dtype, info)
    except ConfigError:
      return "blockwise"
    return "cudnn"
  return "blockwise" if max(t, s) > CPU_BLOCK else "einsum"


def attention(q_BTKGH: Float[Array, "B T K G H"], k_BSKH: Float[Array, "B S K H"],
              v_BSKH: Float[Array, "B S K H"], info: MaskInfo,
              impl: str = "einsum", block_size: int = 512) -> Float[Array, "B T K G H"]:
  """Grouped-query softmax attention with scale 1/sqrt(H), masked as `info` describes.

  impl: 'einsum' (plain, any backend), 'xla' (jax.nn.dot_product_attention with a materialized mask),
  'cudnn' (fused GPU kernel, bf16/fp16: llama_jax/kernels/cudnn.py), 'splash' (Pallas TPU kernel; off TPU
  in interpret mode, for tests: llama_jax/kernels/splash.py), 'blockwise' (memory linear in the length,
  any backend: llama_jax/kernels/blockwise.py), 'auto' (by backend and length: `resolve`). `block_size`: queries ×
  keys per block of blockwise and splash.
  """
  backend = jax.default_backend()
  if impl == "auto" and backend == "cpu":
    block_size = CPU_BLOCK
  impl = resolve(impl, backend, q_BTKGH.dtype, q_BTKGH.shape[1], k_BSKH.shape[1], info, block_size)
  if impl == "einsum":
    return _einsum_attention(q_BTKGH, k_BSKH, v_BSKH, info)
  if impl == "xla":
    return _xla_attention(q_BTKGH, k_BSKH, v_BSKH, info)
  if impl == "cudnn":
    return cudnn.cudnn_attention(q_BTKGH, k_BSKH, v_BSKH, info)
  if impl == "splash":
    return splash.splash_attention(q_BTKGH, k_BSKH, v_BSKH, info, block_size)
  if impl == "blockwise":
    return blockwise.blockwise_attention(q_BTKGH, k_BSKH, v_BSKH, info, block_size, block_size)
  raise ValueError(f"attention impl {impl!r}: choose one of {AttentionImpl.__args__}.")
