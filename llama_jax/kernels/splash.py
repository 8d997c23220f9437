"""Splash attention (Pallas, TPU) behind the model's attention signature.

jax's splash kernel (jax/experimental/pallas/ops/tpu/splash_attention) takes one row at a time: queries
[N, T, H], keys and values [K, S, H] with query head n reading KV head n // G (grouped-query attention
without repeating KV heads), a *static* mask per head (causal or full) and-ed with segment ids. So the
`MaskInfo` maps onto it as: causal -> CausalMask, segments -> SegmentIds (padding id 0 attends only to
padding, as in the oracle). Row indices other than arange (context parallelism's permuted rows, a KV
cache's offset) are data, not a static mask: refused, not approximated.

The kernel applies no softmax scale: queries are scaled by 1/sqrt(H) before it (the oracle scales the
fp32 logits; in fp32 the two differ by rounding only).

Under a mesh the kernel runs per device in a shard_map over batch and heads, with the PartitionSpecs of
the rules table (llama_jax/parallel/sharding.py). Off TPU it runs in Pallas interpret mode (plain JAX
ops, slow): that is how the tests hold it equal to the oracle on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jaxtyping import Array, Float

from llama_jax.errors import ConfigError
from llama_jax.kernels.mask import MASKED, MaskInfo
from llama_jax.parallel import sharding

LANES = 128  # the kernel's blocks are multiples of the TPU lane width (also in interpret mode)

Q_AXES = ("act_batch", "act_seq", "act_kv_heads", "act_q_per_kv", "act_head_dim")
KV_AXES = ("act_batch", "act_kv_seq", "act_kv_heads", "act_head_dim")


def unsupported(t: int, s: int, info: MaskInfo, block_size: int = 512) -> str | None:
  """Why splash cannot compute this attention (None: it can)."""
  if info.q_index_BT is not None or info.kv_index_BS is not None:
    return ("it takes a static causal mask, not row indices (the context-parallel layout, "
            "--mesh_context > 1, or a KV cache offset)")
  if t % LANES or s % LANES:
    return f"it needs lengths that are multiples of {LANES}, got {t} queries x {s} keys"
  for name, n in (("query length", t), ("key length", s)):
    if math.gcd(block_size, n) % LANES:
      return (f"ModelConfig.attention_block_size={block_size} and the {name} {n} give blocks of "
              f"{math.gcd(block_size, n)}, not a multiple of {LANES} (set attention_block_size to a multiple "
              f"of {LANES})")
  return None


@functools.lru_cache(maxsize=64)
def _kernel(n: int, t: int, s: int, causal: bool, block_q: int, block_kv: int, interpret: bool):
  """The kernel for N heads of T queries x S keys (its block-sparsity tables are built once, on host)."""
  head = sa.CausalMask((t, s)) if causal else sa.FullMask((t, s))
  sizes = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                        block_q_dq=block_q, block_kv_dq=block_kv)
  # Built outside any trace (it may be first called inside one): its tables are concrete arrays, safe to
  # cache across traces.
  with jax.ensure_compile_time_eval():
    # The oracle's masked logit, so a row's masked keys weigh exactly as there.
    return sa.make_splash_mha(sa.MultiHeadMask([head] * n), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, mask_value=MASKED, interpret=interpret)


def _local(q_BTKGH, k_BSKH, v_BSKH, q_segment_BT=None, kv_segment_BS=None, *, causal, block_size, interpret):
  """Splash on the arrays one device holds (all of T and S; some of the batch and heads)."""
  b, t, k, g, h = q_BTKGH.shape
  s = k_BSKH.shape[1]
  kernel = _kernel(k * g, t, s, causal, math.gcd(block_size, t), math.gcd(block_size, s), interpret)
  # Query head n = k·G + g reads KV head n // G = k: the kernel's grouping, no repeat of K and V.
  q_BNTH = jnp.einsum("BTKGH->BKGTH", q_BTKGH / jnp.sqrt(jnp.float32(h)).astype(q_BTKGH.dtype))
  q_BNTH = q_BNTH.reshape(b, k * g, t, h)
  k_BKSH, v_BKSH = (jnp.einsum("BSKH->BKSH", x) for x in (k_BSKH, v_BSKH))
  if q_segment_BT is None:
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
  else:
    row = lambda q, kk, v, qs, ks: kernel(q, kk, v, sa.SegmentIds(qs, ks))
    out_BNTH = jax.vmap(row)(q_BNTH, k_BKSH, v_BKSH, q_segment_BT.astype(jnp.int32),
                             kv_segment_BS.astype(jnp.int32))
  return jnp.einsum("BKGTH->BTKGH", out_BNTH.reshape(b, k, g, t, h))


def splash_attention(q_BTKGH: Float[Array, "B T K G H"], k_BSKH: Float[Array, "B S K H"],
                     v_BSKH: Float[Array, "B S K H"], info: MaskInfo, block_size: int = 512,
                     interpret: bool | None = None) -> Float[Array, "B T K G H"]:
  """Grouped-query softmax attention with scale 1/sqrt(H), masked as `info` describes, by the splash
  kernel in blocks of gcd(block_size, length) (multiples of 128). `interpret`: None = off TPU only."""
  t, s = q_BTKGH.shape[1], k_BSKH.shape[1]
  why = unsupported(t, s, info, block_size)
  if why is not None:
    raise ConfigError(f"--attention_impl=splash: {why}; use --attention_impl=blockwise (or auto).")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  local = functools.partial(_local, causal=info.causal, block_size=block_size, interpret=interpret)
  args = (q_BTKGH, k_BSKH, v_BSKH)
  if info.q_segment_BT is not None:
    args += (info.q_segment_BT, info.kv_segment_BS)
  q_spec, kv_spec = sharding.activation_spec(Q_AXES), sharding.activation_spec(KV_AXES)
  if q_spec is None:  # no mesh: one device holds everything
    return local(*args)
  if sharding.spec_devices(q_spec[1]) > 1 or sharding.spec_devices(kv_spec[1]) > 1:
    raise ConfigError("--attention_impl=splash: the sequence is split over the mesh (--mesh_context > 1); "
                      "use --attention_impl=blockwise.")
  # Each device runs the kernel on its rows and heads, whole along T and S.
  specs = (q_spec, kv_spec, kv_spec, jax.P(q_spec[0], None), jax.P(kv_spec[0], None))[:len(args)]
  return jax.shard_map(local, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)
