"""Context parallelism as Llama 3 does it ("The Llama 3 Herd of Models" §3.3.2), as a layout of the batch.

The row of T tokens is cut into 2·CP chunks of T/(2·CP) tokens, and context rank i holds chunks i and
2·CP−1−i: under the causal mask an early chunk has few keys to attend to and a late one many, so every
rank gets the same work. Queries stay on their rank; K and V are all-gathered across `context` before
local attention (the model constrains q along T to `act_seq` and K/V along S to `act_kv_seq`, replicated).

With explicit positions, segment ids and row indices that chunk order is only a *layout*: permute the T
axis of every [B, T] feature so that the contiguous split of T over the `context` mesh axis hands rank i
its two chunks, and give attention each token's index in the original row (`row_index`) for causality.
Documents that straddle chunks stay apart by their segment ids. The loss is a masked sum over tokens, so
it and its token count do not change; logits come back to row order with `from_context_layout`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llama_jax.errors import ConfigError


def check_seq_len(seq_len: int, cp: int) -> None:
  if cp > 1 and seq_len % (2 * cp):  # without context parallelism a row is not cut
    raise ConfigError(f"--seq_len={seq_len} is not divisible by 2 x --mesh_context={cp} = {2 * cp} (context "
                      f"parallelism cuts each row into {2 * cp} chunks); use a multiple of {2 * cp}.")


def context_order(seq_len: int, cp: int) -> np.ndarray:
  """The row positions in layout order: chunks 0, 2·CP−1, 1, 2·CP−2, …, CP−1, CP (int32 [T])."""
  check_seq_len(seq_len, cp)
  if cp == 1:
    return np.arange(seq_len, dtype=np.int32)
  c = seq_len // (2 * cp)
  chunks = [j for i in range(cp) for j in (i, 2 * cp - 1 - i)]
  return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks]).astype(np.int32)


def to_context_layout(x_BT: Any, cp: int) -> Any:
  """Permute axis 1 (T) of a [B, T, ...] array (NumPy or JAX) into the context layout."""
  return x_BT[:, context_order(x_BT.shape[1], cp)]


def from_context_layout(x_BT: Any, cp: int) -> Any:
  """The inverse of `to_context_layout`: back to row order."""
  return x_BT[:, np.argsort(context_order(x_BT.shape[1], cp))]


def row_index(batch_size: int, seq_len: int, cp: int) -> np.ndarray:
  """Each token's index in its original row, in the context layout (int32 [B, T]): attention's causal order."""
  return np.broadcast_to(context_order(seq_len, cp), (batch_size, seq_len)).copy()


def context_batch(batch: dict[str, np.ndarray], cp: int) -> dict[str, np.ndarray]:
  """A host batch in the context layout: every [B, T] feature permuted, plus `row_index`.

  With cp = 1 the batch is returned as it is (the model's row index defaults to arange(T)). Arrays of
  rank 1 (per-row values such as a source id) are left alone.
  """
  if cp == 1:
    return batch
  out = {k: to_context_layout(v, cp) if v.ndim >= 2 else v for k, v in batch.items()}
  b, t = next(v.shape[:2] for v in batch.values() if v.ndim >= 2)
  out["row_index"] = row_index(b, t, cp)
  return out
