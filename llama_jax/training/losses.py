"""Losses. A loss is `loss_fn(model, params, batch) -> (loss_sum, aux)`: the sum over counted tokens
(or examples) and a dict of sums — at least `aux["tokens"]`, the count, plus any metric sums (e.g. DPO's
reward margins). Sums add up exactly over microbatches and eval batches: the train step divides the summed
loss (and gradient) by the total count once and reports each aux sum as a metric. Pretraining, SFT and
DPO differ by this function and the data, never by a branch in the train step.

Next-token losses take the model's final hidden states and apply the output layer themselves, a chunk of
tokens at a time, taking its gradient in the same pass (`chunked_cross_entropy`), so no [B, T, V] fp32
logits are ever held and none are recomputed; the plain
`cross_entropy` of the whole logits is their oracle (`pretrain_loss_reference`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Num

from llama_jax.config import ModelConfig
from llama_jax.model import transformer
from llama_jax.parallel import sharding

Batch = dict[str, Any]
Aux = dict[str, jax.Array]  # fp32 scalar sums; "tokens" is the count the loss is divided by
LossFn = Callable[[nn.Module, Any, Batch], tuple[jax.Array, Aux]]


def cross_entropy(logits_BTV: Float[Array, "B T V"], targets_BT: Int[Array, "B T"],
                  mask_BT: Num[Array, "B T"]) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """Summed next-token negative log-likelihood over tokens where mask_BT != 0, and their count."""
  # fp32 for the normalizer: logsumexp over a 128K vocab in bf16 loses the small probabilities.
  logits_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  # A masked sum (the plain form, differentiated by autodiff; the chunked loss gathers instead): with V
  # sharded over `tensor` it reduces locally and then all-reduces a [B, T] array.
  vocab_V = jnp.arange(logits_BTV.shape[-1])
  target_logit_BT = jnp.sum(jnp.where(vocab_V == targets_BT[..., None], logits_BTV, 0.0), axis=-1)
  mask_BT = mask_BT.astype(jnp.float32)
  return jnp.sum((logz_BT - target_logit_BT) * mask_BT), jnp.sum(mask_BT)


def chunked_cross_entropy(x_BTD: Float[Array, "B T D"], w_out: Float[Array, "..."], config: ModelConfig,
                          targets_BT: Int[Array, "B T"], mask_BT: Num[Array, "B T"],
                          ) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """`cross_entropy(output_logits(x_BTD, w_out, config), targets_BT, mask_BT)`, but the fp32 logits
  exist for at most config.loss_chunk tokens on each device at a time, and never in the backward pass.

  A scan over chunks applies the output layer and the cross-entropy to one chunk. Under differentiation
  (`_fused_output_loss`, a custom_vjp) the same pass also takes the gradient while the chunk's logits are
  at hand: d loss / d logits = (softmax − one-hot) · mask, then d x = that · W and d W += xᵀ · that. The
  backward pass only scales them by the incoming cotangent: the output layer costs its three matmuls
  (no recomputed logits) and one pass over each chunk's [B, c, V] instead of the several that autodiff
  through softmax and its transposed copies make.

  A chunk is every row's c positions: c = loss_chunk / (rows on a device), in positions on a device
  (×Q globally where Q devices split T), so the bound holds per device whatever the mesh (at least one
  position per row: more rows on a device than loss_chunk exceed it). T splits into n equal chunks: n
  divides the positions on a device where a divisor within 2× of the fewest chunks exists, else T is
  padded up (the padding masked out; under context parallelism padding moves data). Chunk j holds
  positions j, j + n, j + 2n, ...: taking strided positions keeps every chunk spread over the `context`
  devices that split T, as llama_jax/training/step.py's microbatches are spread over the batch devices.
  """
  b, t, d = x_BTD.shape
  p, q = _contraction_split(b, t)  # devices splitting the rows and the positions
  t_local = t // q
  per_device = max(1, config.loss_chunk // (b // p))  # positions of a chunk on one device
  fewest = -(-t_local // per_device)
  n = next((k for k in range(fewest, min(2 * fewest, t_local) + 1) if t_local % k == 0), fewest)  # chunks
  c = q * -(-t_local // n)  # positions per chunk, over all devices (<= Q · per_device)
  pad = n * c - t
  if pad:  # masked positions: zero hidden states, target 0, mask 0
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT, mask_BT = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets_BT, mask_BT))
  # [B, c·n] → [n, B, c]: position c_i·n + j goes to chunk j, row slot c_i.
  chunks = lambda a: jnp.moveaxis(a.reshape(b, c, n, *a.shape[2:]), 2, 0)
  x_nBcD = nn.with_logical_constraint(chunks(x_BTD), (None, "act_batch", "act_seq", "act_embed"))
  targets_nBc, mask_nBc = (nn.with_logical_constraint(chunks(a), (None, "act_batch", "act_seq"))
                           for a in (targets_BT, mask_BT.astype(jnp.float32)))
  split = (p, q) if n > 1 else (1, 1)  # one chunk: its d W is reduced once anyway
  return _fused_output_loss(config, split, x_nBcD, w_out, targets_nBc, mask_nBc), jnp.sum(mask_nBc)


def _contraction_split(b: int, c: int) -> tuple[int, int]:
  """(P, Q): how many devices split a chunk's rows (act_batch) and its positions (act_seq) in this
  context — the output weight's gradient sums over both, so each device holds a partial sum of it. 1
  where the size does not divide (the model's own check_divisible rejects such batches before)."""
  if jax.sharding.get_abstract_mesh().empty:
    return 1, 1
  spec = sharding.activation_spec(("act_batch", "act_seq"))
  p, q = (sharding.spec_devices(entry) for entry in spec)
  return (p if b % p == 0 else 1), (q if c % q == 0 else 1)


def _output_loss_scan(config: ModelConfig, split: tuple[int, int], x_nBcD, w_out, targets_nBc, mask_nBc,
                      with_grads: bool):
  """loss sum over the chunks, and with_grads: (d loss/d x_nBcD, d loss/d w_out in fp32).

  d W sums over the tokens of every device. Added up chunk by chunk into a W-shaped (so W-sharded)
  carry, every chunk's partial sum would be reduced across the devices on its own — n reductions of
  W's size under FSDP where the step needs one. With more than one chunk the carry is instead one
  partial sum per device, [P, Q, *W] split over the devices of the rows (P) and positions (Q) — no
  communication inside the scan — and summed over P, Q once after it (one reduction per microbatch of
  the train step). It costs one unreduced fp32 W (its tensor shard: V·D·4/tensor bytes, 2 GiB for
  the 8B's [4096, 128256]) per device while the loss runs: the size of the partial product each chunk
  made anyway; tests/training/test_aot.py's goldens hold the memory of the presets.

  W is gathered over `fsdp` once, before the scan (split over `tensor` by V as the logits are): left
  to itself XLA gathered it once for the logits and once more for d x."""
  tied = config.tie_embeddings  # w: [V, D] tied (the embedding table), else [D, V]
  w_axes = ("act_vocab", "act_embed") if tied else ("act_embed", "act_vocab")
  w = nn.with_logical_constraint(w_out.astype(config.dtype), w_axes)
  dx_spec = "BcV,VD->BcD" if tied else "BcV,DV->BcD"
  n, b, c, _ = x_nBcD.shape
  p, q = split if with_grads else (1, 1)
  dw_axes = ("act_batch" if p > 1 else None, "act_seq" if q > 1 else None, *w_axes)
  if p * q > 1:
    dw_spec = "PbQcV,PbQcD->PQVD" if tied else "PbQcV,PbQcD->PQDV"
    by_device = lambda a_BcX: a_BcX.reshape(p, b // p, q, c // q, a_BcX.shape[-1])
    dw_partial = lambda dl_BcV, x_BcD: nn.with_logical_constraint(
        jnp.einsum(dw_spec, by_device(dl_BcV), by_device(x_BcD), preferred_element_type=jnp.float32),
        dw_axes)
    dw_shape = (p, q, *w.shape)
  else:
    dw_spec = "BcV,BcD->VD" if tied else "BcV,BcD->DV"
    dw_partial = lambda dl_BcV, x_BcD: jnp.einsum(dw_spec, dl_BcV, x_BcD, preferred_element_type=jnp.float32)
    dw_shape = w.shape

  def chunk(carry, inputs):
    loss, dw = carry
    x_BcD, targets_Bc, mask_Bc = inputs
    logits_BcV = transformer.output_logits(x_BcD, w, config)  # fp32
    v = logits_BcV.shape[-1]
    logz_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    # The target's logit gathered (B·c values), not summed out of a masked [B, c, V] pass: one pass over
    # the chunk's logits fewer (on CPU the masked select was written out whole before its sum). Equal to
    # cross_entropy's masked sum exactly, also for a target outside [0, V) (0 there, not a clipped pick).
    # With V split over `tensor` each device picks from its own slice and the [B, c] picks are summed, as
    # the masked sum's were; no logits are gathered (tests/training/test_losses.py counts the collectives).
    picked_Bc = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1, mode="clip")[..., 0]
    target_logit_Bc = jnp.where((targets_Bc >= 0) & (targets_Bc < v), picked_Bc, 0.0)
    loss = loss + jnp.sum((logz_Bc - target_logit_Bc) * mask_Bc)
    if not with_grads:
      return (loss, dw), None
    hit_BcV = jnp.arange(v) == targets_Bc[..., None]
    dlogits_BcV = (jnp.exp(logits_BcV - logz_Bc[..., None]) - hit_BcV) * mask_Bc[..., None]
    dlogits_BcV = nn.with_logical_constraint(dlogits_BcV.astype(config.dtype),
                                             ("act_batch", "act_seq", "act_vocab"))
    dx_BcD = jnp.einsum(dx_spec, dlogits_BcV, w, preferred_element_type=jnp.float32).astype(x_BcD.dtype)
    return (loss, dw + dw_partial(dlogits_BcV, x_BcD)), dx_BcD

  zero = jnp.zeros((), jnp.float32)
  dw0 = jnp.zeros(dw_shape, jnp.float32) if with_grads else zero
  if p * q > 1:
    dw0 = nn.with_logical_constraint(dw0, dw_axes)
  (loss, dw), dx_nBcD = jax.lax.scan(chunk, (zero, dw0), (x_nBcD, targets_nBc, mask_nBc))
  if p * q > 1:
    dw = dw.sum((0, 1))
  return loss, dx_nBcD, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_output_loss(config, split, x_nBcD, w_out, targets_nBc, mask_nBc):
  """Σ mask · NLL of the output layer on chunked hidden states (no gradient work when not differentiated)."""
  return _output_loss_scan(config, split, x_nBcD, w_out, targets_nBc, mask_nBc, with_grads=False)[0]


def _fused_output_loss_fwd(config, split, x_nBcD, w_out, targets_nBc, mask_nBc):
  loss, dx_nBcD, dw = _output_loss_scan(config, split, x_nBcD, w_out, targets_nBc, mask_nBc, with_grads=True)
  return loss, (dx_nBcD, dw.astype(w_out.dtype))


def _fused_output_loss_bwd(config, split, residuals, g):
  del config, split
  dx_nBcD, dw = residuals
  # Targets and mask are data: no cotangent.
  return (g.astype(dx_nBcD.dtype) * dx_nBcD, g.astype(dw.dtype) * dw, None, None)


_fused_output_loss.defvjp(_fused_output_loss_fwd, _fused_output_loss_bwd)


def _model_inputs(batch: Batch) -> tuple[tuple, dict]:
  # row_index: present when the batch is in the context-parallel layout (llama_jax/parallel/context.py).
  return (batch["inputs"], batch["positions"], batch["segment_ids"]), {"row_index_BT": batch.get("row_index")}


def pretrain_loss(model: nn.Module, params: Any, batch: Batch) -> tuple[jax.Array, Aux]:
  """Next-token cross-entropy on a packed batch (segment ids keep documents apart), the output layer
  applied chunk by chunk (`chunked_cross_entropy`): equal to `pretrain_loss_reference` up to the order
  of fp32 sums, without its [B, T, V] logits."""
  args, kwargs = _model_inputs(batch)
  x_BTD = model.apply({"params": params}, *args, **kwargs, return_hidden=True)
  w_out = transformer.output_weight(params, model.config)
  loss_sum, count = chunked_cross_entropy(x_BTD, w_out, model.config, batch["targets"], batch["loss_mask"])
  return loss_sum, {"tokens": count}


def pretrain_loss_reference(model: nn.Module, params: Any, batch: Batch) -> tuple[jax.Array, Aux]:
  """The oracle of `pretrain_loss`: the model's whole [B, T, V] logits, then `cross_entropy`."""
  args, kwargs = _model_inputs(batch)
  logits_BTV = model.apply({"params": params}, *args, **kwargs)
  loss_sum, count = cross_entropy(logits_BTV, batch["targets"], batch["loss_mask"])
  return loss_sum, {"tokens": count}
