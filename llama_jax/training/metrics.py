"""Host-side throughput: step time, tokens/s and MFU from the step's metrics, without a device sync."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax.config import ModelConfig
from llama_jax.training import flops

Batch = dict[str, Any]


class MetricsReader:
  """Host-side step time, tokens/s and MFU without a device sync in the hot path.

  Call `read(step, metrics, batch_tokens)` right after dispatching step t: it stores step t's metrics
  (still device futures) and returns step t−1's, fetched, with throughput — so the host blocks on step
  t−1 while step t is already queued. Step time is the time between successive fetches, which in
  steady state is the device time per step; the first fetched step (compilation) has no timing.
  """

  def __init__(self, flops_per_token: float, n_devices: int, peak_flops_per_device: float):
    self.flops_per_token = flops_per_token
    self.n_devices = n_devices
    self.peak = peak_flops_per_device
    self._pending: tuple[int, dict, int] | None = None
    self._last_fetch: float | None = None

  @classmethod
  def for_model(cls, model_cfg: ModelConfig, seq_len: int, mesh: Mesh) -> "MetricsReader":
    device = mesh.devices.flat[0]
    # On CPU the peak is measured for the whole host, which all its (fake) devices share.
    n = jax.process_count() if device.platform == "cpu" else mesh.size
    return cls(flops.flops_per_token(model_cfg, seq_len), n, flops.peak_flops(device))

  def read(self, step: int, metrics: dict, batch_tokens: int) -> tuple[int, dict] | None:
    previous, self._pending = self._pending, (step, metrics, batch_tokens)
    return None if previous is None else self._fetch(previous)

  def flush(self) -> tuple[int, dict] | None:
    """The last step's metrics (blocks until it is done)."""
    previous, self._pending = self._pending, None
    return None if previous is None else self._fetch(previous)

  def _fetch(self, pending: tuple[int, dict, int]) -> tuple[int, dict]:
    step, metrics, batch_tokens = pending
    out = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    if self._last_fetch is not None:
      dt = now - self._last_fetch
      out["step_time_s"] = dt
      out["tokens_per_s"] = batch_tokens / dt
      out["mfu"] = flops.mfu(batch_tokens / dt, self.flops_per_token, self.n_devices, self.peak)
    self._last_fetch = now
    return step, out


def batch_tokens(batch: Batch) -> int:
  """Tokens the model processes for `batch` (padding included: MFU counts the work done)."""
  return int(np.prod(batch["inputs"].shape))
