"""Blockwise (flash-style) attention in plain JAX: memory linear in the sequence length.

Online softmax over key/value blocks (Rabe & Staats 2021, "Self-attention does not need O(n^2) memory";
Dao et al. 2022, FlashAttention, Algorithm 1; the backward of FlashAttention-2, Algorithm 2). The forward
keeps per query a running max, a running sum and an output accumulator; it saves only the output and the
log-sum-exp per query, and the backward (a `jax.custom_vjp`) recomputes each block's scores from them, so
no [T, S] array is ever stored. Autodiff through the loops would store every block's scores instead.

Masking comes from the `MaskInfo` description, per block ([B, t, s] at most). A block pair that no row of
the batch can use is skipped at run time (`lax.cond`) by ranges of indices and segment ids, computed
from the arrays themselves, so it also skips for a permuted layout of the row (context parallelism).

Dimension key: the model's (B T S K G H), plus the block letters
  t rows of one query block   s rows of one key/value block   I query blocks (T = I·t)   J kv blocks (S = J·s)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

# The oracle's masked logit: finite, so a row masked so far gives exp(0) rather than NaN, and the first
# allowed key's rescale exp(_MASKED - m) wipes what it accumulated.
from llama_jax.kernels.mask import MASKED as _MASKED
from llama_jax.kernels.mask import MaskInfo


def _blocks(x, n):
  """[B, n·b, ...] -> [n, B, b, ...]: the loops index blocks on the leading axis."""
  return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)


def _unblocks(x):
  """[n, B, b, ...] -> [B, n·b, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _pad(x, n, value):
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, n - x.shape[1])
  return jnp.pad(x, widths, constant_values=value)


def _allowed_Bts(m, i, j, causal):
  """Who may see whom inside block pair (i, j): [B, t, s] from the blocked description."""
  allowed_Bts = m["kv_valid_Js"][j][None, None, :]
  if causal:
    allowed_Bts = allowed_Bts & (m["kv_index_JBs"][j][:, None, :] <= m["q_index_IBt"][i][:, :, None])
  if "q_segment_IBt" in m:
    allowed_Bts = allowed_Bts & (m["kv_segment_JBs"][j][:, None, :] == m["q_segment_IBt"][i][:, :, None])
  return allowed_Bts


def _scores_BKGts(q_BKGtH, k_BKsH, allowed_Bts):
  # Scores and softmax statistics in fp32 whatever the input dtype (as the oracle does).
  s_BKGts = jnp.einsum("BKGtH,BKsH->BKGts", q_BKGtH, k_BKsH, preferred_element_type=jnp.float32)
  s_BKGts = s_BKGts / jnp.sqrt(jnp.float32(q_BKGtH.shape[-1]))
  return jnp.where(allowed_Bts[:, None, None], s_BKGts, _MASKED)


def _visit_IJ(m, causal):
  """Block pair (i, j) is computed unless, for every row b, its causal index ranges or its segment-id
  ranges are disjoint (then every query of block i is masked from every key of block j)."""
  big = jnp.iinfo(jnp.int32).max
  kv_valid_J1s = m["kv_valid_Js"][:, None, :]
  skip_IJB = jnp.zeros((m["q_index_IBt"].shape[0], m["kv_index_JBs"].shape[0], m["q_index_IBt"].shape[1]),
                       bool)
  if causal:
    # Padded keys are ignored in the minimum (they are masked anyway).
    kv_min_JB = jnp.where(kv_valid_J1s, m["kv_index_JBs"], big).min(-1)
    skip_IJB |= kv_min_JB[None] > m["q_index_IBt"].max(-1)[:, None]
  if "q_segment_IBt" in m:
    q_seg_IBt, kv_seg_JBs = m["q_segment_IBt"], m["kv_segment_JBs"]
    kv_lo_JB = jnp.where(kv_valid_J1s, kv_seg_JBs, big).min(-1)
    kv_hi_JB = jnp.where(kv_valid_J1s, kv_seg_JBs, -big).max(-1)
    skip_IJB |= (q_seg_IBt.max(-1)[:, None] < kv_lo_JB[None]) | (q_seg_IBt.min(-1)[:, None] > kv_hi_JB[None])
  return ~skip_IJB.all(-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_IBKGtH, k_JBKsH, v_JBKsH, m, causal):
  return _forward(q_IBKGtH, k_JBKsH, v_JBKsH, m, causal)[0]


def _forward(q_IBKGtH, k_JBKsH, v_JBKsH, m, causal):
  # One barrier over all the operands, so that partial evaluation treats the block loops as a unit. Under
  # a `lax.scan` (the Transformer's layers), the scan's linearization hoists loop-invariant work out of
  # the loop by partially evaluating its body with the scan's constants known (jax/_src/lax/control_flow/
  # loops.py, _scan_known_hoisting; _scan_partial_eval_custom under remat). Here k, v and the mask are
  # such constants whenever they do not depend on the carry, and the partial evaluation recurses into
  # these loops: it would split each one and stack, over all I×J block pairs, every piece that depends on
  # them alone (k/v block slices, the [B, t, s] mask, its [B, K, G, t, s] broadcast), an O(T·S) array.
  # optimization_barrier has no partial-evaluation rule of its own: one unknown operand makes all its
  # outputs unknown, so nothing inside the loops is known apart from q.
  q_IBKGtH, k_JBKsH, v_JBKsH, m = lax.optimization_barrier((q_IBKGtH, k_JBKsH, v_JBKsH, m))
  visit_IJ = _visit_IJ(m, causal)
  _, b, k, g, t, h = q_IBKGtH.shape

  def q_block(i):
    q_BKGtH = q_IBKGtH[i]

    def kv_block(j, carry):
      def compute(carry):
        max_BKGt, sum_BKGt, acc_BKGtH = carry
        v_BKsH = v_JBKsH[j]
        s_BKGts = _scores_BKGts(q_BKGtH, k_JBKsH[j], _allowed_Bts(m, i, j, causal))
        new_max_BKGt = jnp.maximum(max_BKGt, s_BKGts.max(-1))
        p_BKGts = jnp.exp(s_BKGts - new_max_BKGt[..., None])
        rescale_BKGt = jnp.exp(max_BKGt - new_max_BKGt)
        sum_BKGt = rescale_BKGt * sum_BKGt + p_BKGts.sum(-1)
        # Probabilities in the value dtype for the matmul (as the oracle), accumulated in fp32.
        pv_BKGtH = jnp.einsum("BKGts,BKsH->BKGtH", p_BKGts.astype(v_BKsH.dtype), v_BKsH,
                              preferred_element_type=jnp.float32)
        return new_max_BKGt, sum_BKGt, rescale_BKGt[..., None] * acc_BKGtH + pv_BKGtH

      return lax.cond(visit_IJ[i, j], compute, lambda c: c, carry)

    init = (jnp.full((b, k, g, t), _MASKED, jnp.float32), jnp.zeros((b, k, g, t), jnp.float32),
            jnp.zeros((b, k, g, t, h), jnp.float32))
    max_BKGt, sum_BKGt, acc_BKGtH = lax.fori_loop(0, k_JBKsH.shape[0], kv_block, init)
    # A query no visited block reaches (none in self-attention: each sees itself) gets 0, not 0/0.
    sum_BKGt = jnp.where(sum_BKGt == 0, 1.0, sum_BKGt)
    out_BKGtH = (acc_BKGtH / sum_BKGt[..., None]).astype(v_JBKsH.dtype)
    return out_BKGtH, max_BKGt + jnp.log(sum_BKGt)

  out_IBKGtH, lse_IBKGt = lax.map(q_block, jnp.arange(q_IBKGtH.shape[0]))
  return out_IBKGtH, (q_IBKGtH, k_JBKsH, v_JBKsH, m, out_IBKGtH, lse_IBKGt)


def _backward(causal, res, dout_IBKGtH):
  q_IBKGtH, k_JBKsH, v_JBKsH, m, out_IBKGtH, lse_IBKGt = res
  visit_IJ = _visit_IJ(m, causal)
  scale = 1 / jnp.sqrt(jnp.float32(q_IBKGtH.shape[-1]))
  # D_i = rowsum(dO ∘ O) (FlashAttention-2): the softmax backward's subtracted term, in fp32.
  delta_IBKGt = jnp.einsum("IBKGtH,IBKGtH->IBKGt", dout_IBKGtH, out_IBKGtH,
                           preferred_element_type=jnp.float32)

  def kv_block(dq_IBKGtH, j):
    k_BKsH, v_BKsH = k_JBKsH[j], v_JBKsH[j]

    def q_block(i, carry):
      dq_IBKGtH, dk_BKsH, dv_BKsH = carry

      def compute(args):
        dq_BKGtH, dk_BKsH, dv_BKsH = args
        q_BKGtH, dout_BKGtH = q_IBKGtH[i], dout_IBKGtH[i]
        allowed_Bts = _allowed_Bts(m, i, j, causal)
        p_BKGts = jnp.exp(_scores_BKGts(q_BKGtH, k_BKsH, allowed_Bts) - lse_IBKGt[i][..., None])
        dv_BKsH += jnp.einsum("BKGts,BKGtH->BKsH", p_BKGts.astype(dout_BKGtH.dtype), dout_BKGtH,
                              preferred_element_type=jnp.float32)
        dp_BKGts = jnp.einsum("BKGtH,BKsH->BKGts", dout_BKGtH, v_BKsH, preferred_element_type=jnp.float32)
        # Masked logits are constants in the oracle (jnp.where): no gradient reaches q or k through them.
        ds_BKGts = jnp.where(allowed_Bts[:, None, None], p_BKGts * (dp_BKGts - delta_IBKGt[i][..., None]),
                             0.0) * scale
        dq_BKGtH += jnp.einsum("BKGts,BKsH->BKGtH", ds_BKGts.astype(k_BKsH.dtype), k_BKsH,
                               preferred_element_type=jnp.float32)
        dk_BKsH += jnp.einsum("BKGts,BKGtH->BKsH", ds_BKGts.astype(q_BKGtH.dtype), q_BKGtH,
                              preferred_element_type=jnp.float32)
        return dq_BKGtH, dk_BKsH, dv_BKsH

      # Only block-sized operands go through the cond; the full dq is updated in place outside it.
      dq_BKGtH, dk_BKsH, dv_BKsH = lax.cond(visit_IJ[i, j], compute, lambda a: a,
                                            (dq_IBKGtH[i], dk_BKsH, dv_BKsH))
      return dq_IBKGtH.at[i].set(dq_BKGtH), dk_BKsH, dv_BKsH

    zeros = jnp.zeros(k_BKsH.shape, jnp.float32)
    dq_IBKGtH, dk_BKsH, dv_BKsH = lax.fori_loop(0, q_IBKGtH.shape[0], q_block, (dq_IBKGtH, zeros, zeros))
    return dq_IBKGtH, (dk_BKsH, dv_BKsH)

  dq_IBKGtH, (dk_JBKsH, dv_JBKsH) = lax.scan(kv_block, jnp.zeros(q_IBKGtH.shape, jnp.float32),
                                             jnp.arange(k_JBKsH.shape[0]))
  # The mask description is integers: no cotangent (None).
  return (dq_IBKGtH.astype(q_IBKGtH.dtype), dk_JBKsH.astype(k_JBKsH.dtype), dv_JBKsH.astype(v_JBKsH.dtype),
          None)


_flash.defvjp(_forward, _backward)


def blockwise_attention(q_BTKGH: Float[Array, "B T K G H"], k_BSKH: Float[Array, "B S K H"],
                        v_BSKH: Float[Array, "B S K H"], info: MaskInfo, block_q: int = 512,
                        block_kv: int = 512) -> Float[Array, "B T K G H"]:
  """Grouped-query softmax attention with scale 1/sqrt(H), masked as `info` describes, in blocks of
  `block_q` queries × `block_kv` keys (each clipped to the length). Equals the einsum oracle for every
  row with at least one allowed key. Lengths need not be multiples of the blocks: the tail is padded
  with masked keys and discarded queries."""
  b, t, _, _, _ = q_BTKGH.shape
  s = k_BSKH.shape[1]
  bq, bkv = min(block_q, t), min(block_kv, s)
  n_q, n_kv = -(-t // bq), -(-s // bkv)
  q_index_BT, kv_index_BS = info.indices(b, t, s)
  # Padded queries sit at index -1 and segment -1 (they only shrink what a block could skip by very
  # little and are sliced off); padded keys are masked by kv_valid.
  m = dict(q_index_IBt=_blocks(_pad(q_index_BT.astype(jnp.int32), n_q * bq, -1), n_q),
           kv_index_JBs=_blocks(_pad(kv_index_BS.astype(jnp.int32), n_kv * bkv, 0), n_kv),
           kv_valid_Js=(jnp.arange(n_kv * bkv) < s).reshape(n_kv, bkv))
  if info.q_segment_BT is not None:
    m["q_segment_IBt"] = _blocks(_pad(info.q_segment_BT.astype(jnp.int32), n_q * bq, -1), n_q)
    m["kv_segment_JBs"] = _blocks(_pad(info.kv_segment_BS.astype(jnp.int32), n_kv * bkv, -1), n_kv)
  # Blocks head-major ([.., K, G, t, H], [.., K, s, H]) once per call: every block matmul then reads its
  # operands in place instead of transposing a block per block pair.
  q_IBKGtH = jnp.moveaxis(_blocks(_pad(q_BTKGH, n_q * bq, 0), n_q), 2, 4)
  k_JBKsH, v_JBKsH = (jnp.moveaxis(_blocks(_pad(x, n_kv * bkv, 0), n_kv), 2, 3) for x in (k_BSKH, v_BSKH))
  out_IBKGtH = _flash(q_IBKGtH, k_JBKsH, v_JBKsH, m, info.causal)
  return _unblocks(jnp.moveaxis(out_IBKGtH, 4, 2))[:, :t]
