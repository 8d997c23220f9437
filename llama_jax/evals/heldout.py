"""Held-out evaluation: the mean next-token loss over the first batches of a held-out set.

It takes the eval step as a function and imports nothing of training, which calls it; needle-in-a-haystack
and other evaluations join it here.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import jax
import numpy as np

Batch = dict[str, Any]


def evaluate(eval_step, params, batches: Iterable[Batch]) -> float:
  """Mean loss per counted token over `batches` (dispatches all batches, then syncs once)."""
  sums = jax.device_get([eval_step(params, b) for b in batches])  # (loss_sum, aux) per batch
  return float(sum(s for s, _ in sums) / max(sum(aux["tokens"] for _, aux in sums), 1.0))


def prepare(eval_ds: Iterable[dict[str, np.ndarray]], to_global: Callable[[dict[str, np.ndarray]], Batch],
            max_batches: int) -> tuple[list[Batch], np.ndarray]:
  """The first `max_batches` held-out batches as device arrays, and the counts of the tokens they score:
  the same every evaluation of a run, so packed and transferred once.

  `eval_ds` yields global batches, the same on every process; `to_global` turns a global host batch
  into global device arrays, each process feeding the rows its devices hold."""
  batches = list(itertools.islice(eval_ds, max_batches))
  counts = np.bincount(np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches]))
  return [to_global(b) for b in batches], counts


def heldout_loss(eval_step, params, eval_ds: Iterable[dict[str, np.ndarray]],
                 to_global: Callable[[dict[str, np.ndarray]], Batch],
                 max_batches: int) -> tuple[float, np.ndarray]:
  """Held-out loss over the first `max_batches` batches, and the counts of the tokens it scored."""
  batches, counts = prepare(eval_ds, to_global, max_batches)
  return evaluate(eval_step, params, batches), counts
