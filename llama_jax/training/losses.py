"""Losses. A loss is `loss_fn(model, params, batch) -> (loss_sum, aux)`: the sum over counted tokens
(or examples) and a dict of sums — at least `aux["tokens"]`, the count, plus any metric sums (e.g. DPO's
reward margins). Sums add up exactly over microbatches and eval batches: the train step divides the summed
loss (and gradient) by the total count once and reports each aux sum as a metric. Pretraining, SFT and
DPO differ by this function and the data, never by a branch in the train step.

Next-token losses take the model's final hidden states and apply the output layer themselves, a chunk of
positions at a time (`chunked_cross_entropy`), so no [B, T, V] fp32 logits are ever held; the plain
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

Batch = dict[str, Any]
Aux = dict[str, jax.Array]  # fp32 scalar sums; "tokens" is the count the loss is divided by
LossFn = Callable[[nn.Module, Any, Batch], tuple[jax.Array, Aux]]


def cross_entropy(logits_BTV: Float[Array, "B T V"], targets_BT: Int[Array, "B T"],
                  mask_BT: Num[Array, "B T"]) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """Summed next-token negative log-likelihood over tokens where mask_BT != 0, and their count."""
  # fp32 for the normalizer: logsumexp over a 128K vocab in bf16 loses the small probabilities.
  logits_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  # A masked sum instead of take_along_axis: with V sharded over `tensor` it reduces locally and then
  # all-reduces a [B, T] array, where a gather would all-gather the [B, T, V] logits.
  vocab_V = jnp.arange(logits_BTV.shape[-1])
  target_logit_BT = jnp.sum(jnp.where(vocab_V == targets_BT[..., None], logits_BTV, 0.0), axis=-1)
  mask_BT = mask_BT.astype(jnp.float32)
  return jnp.sum((logz_BT - target_logit_BT) * mask_BT), jnp.sum(mask_BT)


def chunked_cross_entropy(x_BTD: Float[Array, "B T D"], w_out: Float[Array, "..."], config: ModelConfig,
                          targets_BT: Int[Array, "B T"], mask_BT: Num[Array, "B T"],
                          ) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """`cross_entropy(output_logits(x_BTD, w_out, config), targets_BT, mask_BT)`, but the fp32 logits
  exist for at most config.loss_chunk positions of every row at a time: a scan over chunks applies the
  output layer and the cross-entropy to one chunk, and each chunk is rematerialized (jax.checkpoint), so
  the backward pass recomputes its logits instead of keeping [B, T, V] of them.

  Chunk j holds positions j, j + n, j + 2n, ... (n chunks; T padded up to a multiple of n, the padding
  masked out): taking strided positions keeps every chunk spread over the `context` devices that split T,
  as llama_jax/training/step.py's microbatches are spread over the batch devices, with no data movement.
  """
  b, t, d = x_BTD.shape
  n = -(-t // config.loss_chunk)  # chunks
  c = -(-t // n)  # positions per chunk (<= loss_chunk)
  pad = n * c - t
  if pad:  # masked positions: zero hidden states, target 0, mask 0
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT, mask_BT = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets_BT, mask_BT))
  # [B, c·n] → [n, B, c]: position c_i·n + j goes to chunk j, row slot c_i.
  chunks = lambda a: jnp.moveaxis(a.reshape(b, c, n, *a.shape[2:]), 2, 0)
  x_nBcD = nn.with_logical_constraint(chunks(x_BTD), (None, "act_batch", "act_seq", "act_embed"))
  targets_nBc, mask_nBc = (nn.with_logical_constraint(chunks(a), (None, "act_batch", "act_seq"))
                           for a in (targets_BT, mask_BT))

  # Saves nothing but its inputs (a chunk of x, the weight): the backward pass recomputes the chunk's
  # logits. (No CSE barrier needed inside a scan: XLA cannot merge the recomputation with the forward.)
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_loss(w, x_BcD, targets_Bc, mask_Bc):
    return cross_entropy(transformer.output_logits(x_BcD, w, config), targets_Bc, mask_Bc)

  def add(total, chunk):
    return jax.tree.map(jnp.add, total, chunk_loss(w_out, *chunk)), None

  zero = jnp.zeros((), jnp.float32)
  return jax.lax.scan(add, (zero, zero), (x_nBcD, targets_nBc, mask_nBc))[0]


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
