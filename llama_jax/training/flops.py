"""Training FLOPs per token, accelerator peaks, and model FLOPs utilization (MFU).

Convention (PaLM, Chowdhery et al. 2022, appendix B): per token, training costs
  6·N + 12·L·N_heads·H·T
- N counts the weights of every matmul a token goes through: per layer wq, wk, wv, wo and the three MLP
  matrices, plus the output projection (also when it is the tied embedding). Not counted: the input
  embedding (a gather, no multiply-adds) and the norm scales (elementwise).
- 6 = 2 (multiply-add) × 3 (forward, and a backward that costs twice the forward).
- The attention term is QKᵀ and AV over all T key positions, per layer, ×3 for the backward. It is not
  halved for the causal mask (pass causal=True to halve it): PaLM and most published MFU numbers do not
  halve, and neither do dense kernels, which compute the masked half anyway.
Rematerialization adds work but not model FLOPs, so it lowers MFU: that is the point of the metric.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig


def matmul_params(config: ModelConfig) -> int:
  """N: weights that take part in a matmul per token (layers + output projection)."""
  d, h = config.dim, config.head_dim
  attn = d * config.num_heads * h * 2 + d * config.num_kv_heads * h * 2
  mlp = 3 * d * config.mlp_dim
  return config.num_layers * (attn + mlp) + d * config.vocab_size


def flops_per_token(config: ModelConfig, seq_len: int, causal: bool = False) -> float:
  """Training (forward + backward) FLOPs per token at sequence length `seq_len`."""
  attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
  return 6 * matmul_params(config) + (attention / 2 if causal else attention)


# Dense (no sparsity) bf16 peak FLOP/s per device (per chip for TPUs), from the vendors' spec sheets.
# Matched against jax.Device.device_kind in order; more specific names first.
_PEAKS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("v6 lite", "v6e"), 918e12),
    (("v5 lite", "v5e", "v5litepod"), 197e12),
    (("v5p", "tpu v5"), 459e12),
    (("tpu v4",), 275e12),
    (("h200",), 989e12),
    (("h100 pcie",), 756e12),
    (("h100",), 989e12),  # SXM (device_kind "NVIDIA H100 80GB HBM3")
    (("a100",), 312e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """bf16 dense peak for a `device_kind` string, or None if unknown (e.g. CPU: measure it instead)."""
  kind = device_kind.lower()
  for names, peak in _PEAKS:
    if any(n in kind for n in names):
      return peak
  return None


def measure_matmul_peak(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
  """Achieved FLOP/s of one jitted n×n matmul on the default device, best of `repeats`."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


# Measured peaks by platform: measured once per process and kept. A run measures it before its input
# pipeline starts (pretrain, posttrain); measured later, on a 2-core host, the pipeline's workers shared
# the cores and halved it — the run's log then printed MFU above 100%.
_MEASURED_PEAK: dict[str, float] = {}


def peak_flops(device: jax.Device | None = None) -> float:
  """The table's peak for `device` (default: the first), else a measured fp32 matmul rate (the first
  measurement of this process on that platform)."""
  device = device or jax.devices()[0]
  peak = peak_flops_per_device(device.device_kind)
  if peak is None:
    if device.platform not in _MEASURED_PEAK:
      _MEASURED_PEAK[device.platform] = measure_matmul_peak()
    peak = _MEASURED_PEAK[device.platform]
  return peak


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_per_device: float) -> float:
  """Model FLOPs utilization: achieved model FLOP/s over the devices' peak."""
  return tokens_per_s * flops_per_token / (n_devices * peak_per_device)
