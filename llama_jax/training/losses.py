"""Losses. A loss is `loss_fn(model, params, batch) -> (loss_sum, aux)`: the sum over counted tokens
(or examples) and a dict of sums — at least `aux["tokens"]`, the count, plus any metric sums (e.g. DPO's
reward margins). Sums add up exactly over microbatches and eval batches: the train step divides the summed
loss (and gradient) by the total count once and reports each aux sum as a metric. Pretraining, SFT and
DPO differ by this function and the data, never by a branch in the train step.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Num

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


def pretrain_loss(model: nn.Module, params: Any, batch: Batch) -> tuple[jax.Array, Aux]:
  """Next-token cross-entropy on a packed batch (segment ids keep documents apart)."""
  # row_index: present when the batch is in the context-parallel layout (llama_jax/parallel/context.py).
  logits_BTV = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                           row_index_BT=batch.get("row_index"))
  loss_sum, count = cross_entropy(logits_BTV, batch["targets"], batch["loss_mask"])
  return loss_sum, {"tokens": count}
