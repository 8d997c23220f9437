"""The Llama 3 / 3.1 / 3.2 dense decoder in Flax (Linen).

"The Llama 3 Herd of Models" (arXiv 2407.21783) §3.2: a standard dense Transformer with grouped-query
attention (8 KV heads), RoPE with theta 500,000 (and, from 3.1, the frequency scaling of Meta's
`apply_scaling`), SwiGLU, pre-norm RMSNorm, and an attention mask between documents of a packed sequence.

Dimension key (Scaling Book letters; used in names, einsums and the sharding table):
  B batch   T query positions   S key/value positions   D model dim   F MLP hidden   V vocab
  N query heads   K kv heads   G = N // K query heads per kv head   H head dim   L layers
  E tokens emitted by generation (llama_jax/inference/generate.py)

Query head n reads KV head n // G (contiguous groups, as in Meta's and HF's `repeat_kv`), hence the
explicit K×G split of the query projection. RoPE uses the HF "rotate half" layout; Meta's consolidated
weights are permuted on import (llama_jax/interop/meta.py) so both give the same scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from jaxtyping import Array, Float, Int

from llama_jax.parallel import sharding
from llama_jax.model import cache as kv_cache
from llama_jax.model.attention import MaskInfo, attention
from llama_jax.kernels.dense import dense
from llama_jax.config import ModelConfig, RopeScaling

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(module: nn.Module, name: str, axes: tuple[str, ...], shape: tuple[int, ...], init, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _dense_init(in_axis, out_axis):
  # Fan-in scaled truncated normal over the named input dims (so wq_DKGH is scaled by 1/sqrt(D)).
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis)


class RMSNorm(nn.Module):
  eps: float
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, x_BTD):
    scale_D = _param(self, "scale", ("norm",), (x_BTD.shape[-1],), nn.initializers.ones,
                     self.param_dtype)
    # Statistics in fp32 whatever the compute dtype; cast back before the gain, as Meta and HF do.
    x32_BTD = x_BTD.astype(jnp.float32)
    x32_BTD = x32_BTD * jax.lax.rsqrt(jnp.mean(x32_BTD**2, axis=-1, keepdims=True) + self.eps)
    return x32_BTD.astype(self.dtype) * scale_D.astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies inv_i = theta^(-2i/H), with Llama 3.1 scaling. float32, shape [H/2]."""
  # Computed in float64 on the host and rounded once, so it is the correctly rounded float32 value.
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  inv = inv.astype(np.float32).astype(np.float64)
  if scaling is not None:
    wavelen = 2 * np.pi / inv
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * inv / scaling.factor + smooth * inv
    inv = np.where(wavelen < high_wavelen, inv, np.where(wavelen > low_wavelen, inv / scaling.factor,
                                                         smoothed))
  return inv.astype(np.float32)


def apply_rope(x_BTKH: Float[Array, "B T *K H"], positions_BT: Int[Array, "B T"],
               inv_freq: np.ndarray) -> Float[Array, "B T *K H"]:
  """Rotate halves (HF layout): pair feature i with feature i + H/2."""
  # Angles in fp32: positions up to 128K times the largest frequency need the mantissa.
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  angles_BTh = angles_BTh.reshape(angles_BTh.shape[:2] + (1,) * (x_BTKH.ndim - 3) + angles_BTh.shape[-1:])
  cos, sin = jnp.cos(angles_BTh), jnp.sin(angles_BTh)
  x1, x2 = jnp.split(x_BTKH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTKH.dtype)


class Attention(nn.Module):
  num_kv_heads: int
  q_per_kv: int
  head_dim: int
  inv_freq: np.ndarray
  impl: str
  dtype: str
  param_dtype: str
  block_size: int = 512  # of impl="blockwise"

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask: MaskInfo, cache=None):
    """(x_BTD, RoPE positions, mask description, cache) -> (out_BTD, cache).

    `cache`: None, or this layer's (k_BSKH, v_BSKH) (llama_jax/model/cache.py). With a cache, the T new
    tokens are the consecutive row indices `mask.q_index_BT`; their keys and values are written at those
    slots and the queries attend to the whole cache (key index = slot).
    """
    d, k, g, h = x_BTD.shape[-1], self.num_kv_heads, self.q_per_kv, self.head_dim
    p = lambda name, axes, shape, init: _param(self, name, axes, shape, init, self.param_dtype).astype(
        self.dtype)
    wq_DKGH = p("wq", ("embed", "kv_heads", "q_per_kv", "head_dim"), (d, k, g, h), _dense_init(0, (1, 2, 3)))
    wk_DKH = p("wk", ("embed", "kv_heads", "head_dim"), (d, k, h), _dense_init(0, (1, 2)))
    wv_DKH = p("wv", ("embed", "kv_heads", "head_dim"), (d, k, h), _dense_init(0, (1, 2)))
    wo_KGHD = p("wo", ("kv_heads", "q_per_kv", "head_dim", "embed"), (k, g, h, d),
                _dense_init((0, 1, 2), 3))

    q_BTKGH = dense("BTD,DKGH->BTKGH", x_BTD, wq_DKGH)
    k_BSKH = dense("BSD,DKH->BSKH", x_BTD, wk_DKH)
    v_BSKH = dense("BSD,DKH->BSKH", x_BTD, wv_DKH)
    q_BTKGH = nn.with_logical_constraint(
        q_BTKGH, ("act_batch", "act_seq", "act_kv_heads", "act_q_per_kv", "act_head_dim"))
    kv_axes = lambda seq: ("act_batch", seq, "act_kv_heads", "act_head_dim")
    k_BSKH, v_BSKH = (nn.with_logical_constraint(x, kv_axes("act_seq")) for x in (k_BSKH, v_BSKH))
    q_BTKGH = apply_rope(q_BTKGH, positions_BT, self.inv_freq)
    k_BSKH = apply_rope(k_BSKH, positions_BT, self.inv_freq)
    # Context parallelism (Llama 3 §3.3.2): each rank projects (and rotates) K and V of its own chunks,
    # then they are gathered whole along S (act_kv_seq is replicated) while the queries stay split along
    # T, so each context rank attends its chunks to the entire row.
    k_BSKH, v_BSKH = (nn.with_logical_constraint(x, kv_axes("act_kv_seq")) for x in (k_BSKH, v_BSKH))
    impl = self.impl
    if cache is not None:
      k_BSKH, v_BSKH = (kv_cache.write(c_BSKH, new_BTKH, mask.q_index_BT[:, 0])
                        for c_BSKH, new_BTKH in zip(cache, (k_BSKH, v_BSKH)))
      cache = (k_BSKH, v_BSKH)
      # The fused kernels mask by position in a row of T == S and take no offset: the einsum oracle (or
      # blockwise, when asked for: long prompts) serves cached attention.
      impl = "blockwise" if impl == "blockwise" else "einsum"
    out_BTKGH = attention(q_BTKGH, k_BSKH, v_BSKH, mask, impl, self.block_size)
    return dense("BTKGH,KGHD->BTD", out_BTKGH, wo_KGHD), cache


class MLP(nn.Module):
  mlp_dim: int
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, x_BTD):
    d, f = x_BTD.shape[-1], self.mlp_dim
    p = lambda name, axes, shape, init: _param(self, name, axes, shape, init, self.param_dtype).astype(
        self.dtype)
    w_gate_DF = p("w_gate", ("embed", "mlp"), (d, f), _dense_init(0, 1))
    w_up_DF = p("w_up", ("embed", "mlp"), (d, f), _dense_init(0, 1))
    w_down_FD = p("w_down", ("mlp", "embed"), (f, d), _dense_init(0, 1))
    # SwiGLU: w_down(silu(w_gate x) * w_up x).
    h_BTF = nn.silu(dense("BTD,DF->BTF", x_BTD, w_gate_DF)) * dense("BTD,DF->BTF", x_BTD, w_up_DF)
    h_BTF = nn.with_logical_constraint(h_BTF, ("act_batch", "act_seq", "act_mlp"))
    return dense("BTF,FD->BTD", h_BTF, w_down_FD)


class Block(nn.Module):
  """Pre-norm residual block: h = x + attn(norm(x)); out = h + mlp(norm(h)).

  (x_BTD, positions_BT, mask description, cache=None) -> (out_BTD, cache): the layer's KV cache, when
  there is one, goes in and comes out beside the activations.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask: MaskInfo, cache=None):
    c = self.config
    norm = lambda name: RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name=name)
    inv_freq = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    attn = Attention(c.num_kv_heads, c.q_per_kv, c.head_dim, inv_freq, c.attention_impl, c.dtype,
                     c.param_dtype, c.attention_block_size, name="attn")
    attn_BTD, cache = attn(norm("attn_norm")(x_BTD), positions_BT, mask, cache)
    h_BTD = x_BTD + attn_BTD
    out_BTD = h_BTD + MLP(c.mlp_dim, c.dtype, c.param_dtype, name="mlp")(norm("mlp_norm")(h_BTD))
    return nn.with_logical_constraint(out_BTD, ("act_batch", "act_seq", "act_embed")), cache


class Transformer(nn.Module):
  """Tokens → logits. Layers are stacked on a leading L axis and run by a scan (or fully unrolled)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: Int[Array, "B T"], positions_BT: Int[Array, "B T"] | None = None,
               segment_ids_BT: Int[Array, "B T"] | None = None, *,
               row_index_BT: Int[Array, "B T"] | None = None,
               last_index_B: Int[Array, "B"] | None = None,
               return_hidden: bool = False, cache: kv_cache.Cache | None = None):
    """Logits [B, T, V] in fp32, or with `return_hidden` the final-normed hidden states [B, T, D] (the
    input of `output_logits`; an init with it creates no lm_head), or with `config.head == "reward"` one
    fp32 reward per row, read at `last_index_B` (the row's last real token; None: T - 1).

    `row_index_BT`: each token's index in its row, for the causal mask (None: arange(T)); a batch in
    the context-parallel layout (llama_jax/parallel/context.py) passes its tokens' original indices.

    With a KV `cache` (llama_jax/model/cache.py; generation, llama_jax/inference/generate.py) the tokens sit
    at row indices row_index_BT (consecutive in each row; None: 0..T-1, a prefill), one document per row,
    and the call returns (logits_BTV, the cache with their keys and values written)."""
    c = self.config
    b, t = tokens_BT.shape
    sharding.check_divisible(tokens_BT.shape, ("act_batch", "act_seq"))
    if cache is not None and row_index_BT is None:
      row_index_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t)) if row_index_BT is None else row_index_BT
    # A description; each attention derives its mask. With a cache, the keys are its slots 0..S-1.
    mask = (MaskInfo.self_attention(segment_ids_BT, row_index_BT=row_index_BT) if cache is None
            else MaskInfo(q_index_BT=row_index_BT))

    # Unit-variance rows feed the pre-norm blocks; a tied table is also the output layer, where unit
    # rows would give logits of size sqrt(D): scale it to keep the initial loss near ln V.
    embed_std = c.dim**-0.5 if c.tie_embeddings else 1.0
    embed_VD = _param(self, "embedding", ("vocab", "embed"), (c.vocab_size, c.dim),
                      nn.initializers.normal(stddev=embed_std), c.param_dtype)
    # The lookup reads the table gathered along D (as FSDP gathers every weight where it is used): from
    # D split over `fsdp` to B over `fsdp` and T over `context`, GSPMD would replicate the rows whole.
    table_VD = nn.with_logical_constraint(embed_VD, ("act_vocab", "act_embed"))
    tokens_BT = nn.with_logical_constraint(tokens_BT, ("act_batch", "act_seq"))
    x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(c.dtype)
    x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_seq", "act_embed"))

    # nn.scan's (carry, inputs) -> (carry, outputs) is Block's own signature: the activations are the
    # carry; positions and the mask description are broadcast to every layer; the KV cache (one per
    # layer, stacked on L) is scanned over.
    block = Block
    if c.remat_policy != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)
    # One set of stacked weights either way; unrolling only changes how XLA sees the loop.
    layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast, 0), length=c.num_layers,
                     unroll=1 if c.scan_layers else c.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x_BTD, cache = layers(c, name="layers")(x_BTD, positions_BT, mask, cache)
    x_BTD = RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name="final_norm")(x_BTD)
    if return_hidden:  # the chunked loss (training/losses.py) applies the output layer itself
      return x_BTD
    if c.head == "reward":
      return _reward_head(self, x_BTD, last_index_B, row_index_BT)
    if c.tie_embeddings:
      w_out = embed_VD
    else:
      w_out = _param(self, "lm_head", ("embed", "vocab"), (c.dim, c.vocab_size), _dense_init(0, 1),
                     c.param_dtype)
    logits_BTV = output_logits(x_BTD, w_out, c)
    return logits_BTV if cache is None else (logits_BTV, cache)


def output_weight(params, config: ModelConfig) -> Float[Array, "V D"] | Float[Array, "D V"]:
  """The output layer's weight in `params`: the embedding table [V, D] when tied, else lm_head [D, V]."""
  return nn.unbox(params["embedding"] if config.tie_embeddings else params["lm_head"])


def output_logits(x_BTD: Float[Array, "B T D"], w_out: Float[Array, "V D"] | Float[Array, "D V"],
                  config: ModelConfig) -> Float[Array, "B T V"]:
  """The output layer on final-normed hidden states (any number of positions T): fp32 logits."""
  spec = "BTD,VD->BTV" if config.tie_embeddings else "BTD,DV->BTV"
  # Logits accumulated and returned in fp32 (not a bf16 product cast afterwards): the softmax over 128K
  # entries is where low precision hurts most.
  logits_BTV = jnp.einsum(spec, x_BTD, w_out.astype(config.dtype), preferred_element_type=jnp.float32)
  return nn.with_logical_constraint(logits_BTV, ("act_batch", "act_seq", "act_vocab"))


def _reward_head(module: nn.Module, x_BTD, last_index_B, row_index_BT):
  """The reward model's scalar head (Llama 3 §4.1.2): w · h over the final normed hidden state h of each
  row's last real token; no bias (a constant cancels in the Bradley–Terry difference)."""
  b, t, d = x_BTD.shape
  # Unit-RMS hidden states and a 1/sqrt(D) vector start the rewards near unit scale.
  w_D = _param(module, "reward_head", ("embed",), (d,), nn.initializers.normal(stddev=d**-0.5),
               module.config.param_dtype)
  if last_index_B is None:
    last_index_B = jnp.full((b,), t - 1, jnp.int32)
  # A one-hot contraction instead of a gather: with T split over `context` it reduces locally (and in
  # the context-parallel layout the row index of a token is row_index_BT, not its place in the array).
  index_BT = jnp.arange(t)[None] if row_index_BT is None else row_index_BT
  pick_BT = (index_BT == last_index_B[:, None]).astype(x_BTD.dtype)
  h_BD = jnp.einsum("BT,BTD->BD", pick_BT, x_BTD)
  # fp32 accumulation: the reward differences, not the rewards, carry the signal.
  return jnp.einsum("BD,D->B", h_BD, w_D.astype(x_BTD.dtype), preferred_element_type=jnp.float32)
