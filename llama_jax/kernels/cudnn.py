"""cuDNN flash attention (GPU) behind the model's attention signature, masked by description.

jax 0.10.2's public `jax.nn.dot_product_attention(implementation="cudnn")` takes `is_causal` and per-row
lengths (`query_seq_lengths`, padding at the end of a row) but no segment ids: packed documents would need
its dense `mask`, which cuDNN turns into a [B, N, T, S] bias. One row length cannot describe several
documents. The packed ("THD") layout of cuDNN is reachable only through the private
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` (q_seqlen/kv_seqlen [B, M] and
q_offsets/kv_offsets [B, M+1]: each document's length and start, M a static bound on documents per row),
where cuDNN runs causal attention inside each document. So:

  no segments -> the public call with is_causal;
  segments    -> the private packed call, documents = runs of equal ids in the row (padding, id 0, is
                 one more run, attending to itself as in the oracle).

Limits: a row with more than `max_segments` runs gets NaN outputs (so the loss shows it, never a silent
wrong mask); an id that recurs after another (not contiguous) counts as two documents, where the oracle
joins them (packed rows never do this); row indices (context parallelism) are refused. cuDNN needs
bfloat16/float16 inputs on an NVIDIA GPU; elsewhere this refuses with the flag to change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from llama_jax.errors import ConfigError
from llama_jax.kernels.mask import MaskInfo

MAX_SEGMENTS = 64  # documents (runs of equal segment ids) per row; the cuDNN packed layout needs a bound


def check_supported(backend: str, dtype, info: MaskInfo) -> None:
  """Raise a one-line ConfigError naming the flag when cuDNN cannot compute this attention here."""
  if backend != "gpu":
    raise ConfigError(f"--attention_impl=cudnn needs an NVIDIA GPU, but the backend is {backend!r}; use "
                      "--attention_impl=auto (splash on TPU, cudnn on GPU, einsum on CPU) or einsum.")
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ConfigError(f"--attention_impl=cudnn needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}; "
                      "use --dtype=bfloat16 (or --attention_impl=auto).")
  if info.q_index_BT is not None or info.kv_index_BS is not None:
    raise ConfigError("--attention_impl=cudnn masks by position in the row and cannot take row indices "
                      "(the context-parallel layout, --mesh_context > 1); use --attention_impl=blockwise.")
  if info.q_segment_BT is not None:
    from jax._src.cudnn import fused_attention_stablehlo as fa  # private: see the module docstring

    if not fa.check_compute_capability("9.0"):
      raise ConfigError("--attention_impl=cudnn: packed documents need cuDNN's packed layout, which needs a "
                        "Hopper GPU or later (sm_90); use --attention_impl=blockwise (or auto).")


def segment_runs(segment_BT: Int[Array, "B T"], max_segments: int = MAX_SEGMENTS
                 ) -> tuple[Int[Array, "B M"], Int[Array, "B M+1"], Bool[Array, "B"]]:
  """(lengths_BM, starts_BM1, overflow_B): the runs of equal ids in each row, as cuDNN's packed layout
  takes them (-1 after the row's last run; starts has one more column, always -1), and whether a row has
  more than M = max_segments runs (then its runs after the M-th are missing)."""
  b, t = segment_BT.shape
  new_run_BT = jnp.concatenate([jnp.ones((b, 1), bool), segment_BT[:, 1:] != segment_BT[:, :-1]], axis=1)
  count_B = new_run_BT.sum(axis=1)
  # Start of run m, for m < M + 1 (the extra one ends run M - 1); t past the row's last run.
  starts_BM1 = jax.vmap(lambda r: jnp.nonzero(r, size=max_segments + 1, fill_value=t)[0])(new_run_BT)
  m_M = jnp.arange(max_segments)
  exists_BM = m_M[None] < count_B[:, None]
  lengths_BM = jnp.where(exists_BM, starts_BM1[:, 1:] - starts_BM1[:, :-1], -1).astype(jnp.int32)
  starts_BM = jnp.where(exists_BM, starts_BM1[:, :-1], -1)
  starts_BM1 = jnp.concatenate([starts_BM, jnp.full((b, 1), -1)], axis=1).astype(jnp.int32)
  return lengths_BM, starts_BM1, count_B > max_segments


def cudnn_attention(q_BTKGH: Float[Array, "B T K G H"], k_BSKH: Float[Array, "B S K H"],
                    v_BSKH: Float[Array, "B S K H"], info: MaskInfo,
                    max_segments: int = MAX_SEGMENTS) -> Float[Array, "B T K G H"]:
  """Grouped-query softmax attention with scale 1/sqrt(H), masked as `info` describes, by cuDNN."""
  check_supported(jax.default_backend(), q_BTKGH.dtype, info)
  b, t, k, g, h = q_BTKGH.shape
  # cuDNN takes N = K·G query heads, query head n reading KV head n // G: no repeat of K and V.
  q_BTNH = q_BTKGH.reshape(b, t, k * g, h)
  if info.q_segment_BT is None:
    out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=info.causal,
                                            implementation="cudnn")
    return out_BTNH.reshape(b, t, k, g, h)
  from jax._src.cudnn import fused_attention_stablehlo as fa  # private: the only packed-layout entry

  q_len_BM, q_start_BM1, q_over_B = segment_runs(info.q_segment_BT, max_segments)
  kv_len_BM, kv_start_BM1, kv_over_B = segment_runs(info.kv_segment_BS, max_segments)
  mask_type = fa.MaskType.PADDING_CAUSAL if info.causal else fa.MaskType.PADDING
  out_BTNH = fa.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, q_seqlen=q_len_BM, kv_seqlen=kv_len_BM,
                                      q_offsets=q_start_BM1, kv_offsets=kv_start_BM1,
                                      scale=float(h) ** -0.5, mask_type=mask_type, qkv_layout="BTNH")
  # More documents in a row than the static bound: NaN, so the loss says so (never a wrong mask).
  over_B = q_over_B | kv_over_B
  out_BTNH = jnp.where(over_B[:, None, None, None], jnp.nan, out_BTNH)
  return out_BTNH.reshape(b, t, k, g, h)
