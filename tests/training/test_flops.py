"""FLOP counts against closed forms and the paper; peak-FLOPs table lookup; MFU arithmetic."""

import jax
import pytest

from llama_jax import config as C
from llama_jax.training import flops


def test_8b_flops_per_token_closed_form():
  # Llama 3.1 8B by hand: L=32, D=4096, N=32 heads, K=8, H=128, F=14336, V=128256.
  per_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336  # wq+wo, wk+wv, MLP
  n = 32 * per_layer + 4096 * 128256  # + output projection
  assert flops.matmul_params(C.LLAMA31_8B) == n == 7_504_658_432  # 8,030,261,248 - embedding - norms
  attention = 12 * 32 * 32 * 128 * 8192  # 12·L·N·H·T (PaLM, no causal halving)
  assert flops.flops_per_token(C.LLAMA31_8B, 8192) == 6 * n + attention
  assert flops.flops_per_token(C.LLAMA31_8B, 8192, causal=True) == 6 * n + attention / 2


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_matmul_params_are_params_less_embedding_and_norms(name):
  cfg = C.PRESETS[name]
  norms = (2 * cfg.num_layers + 1) * cfg.dim
  # Untied: the input embedding is a lookup. Tied: the one matrix still serves as the output matmul.
  lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
  assert flops.matmul_params(cfg) == cfg.param_count() - norms - lookup


def test_405b_compute_budget_matches_paper():
  """§3.1.1 / Table: 405B trained on 15.6T tokens with 3.8e25 FLOPs ≈ 6·N·tokens."""
  six_n = 6 * flops.matmul_params(C.LLAMA31_405B)
  assert six_n * 15.6e12 == pytest.approx(3.8e25, rel=0.01)


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("cpu", None),
])
def test_peak_by_device_kind(kind, peak):
  assert flops.peak_flops_per_device(kind) == peak


def test_measured_cpu_peak_and_mfu():
  measured = flops.measure_matmul_peak(n=256, repeats=3)
  assert 1e6 < measured < 1e14
  assert flops.peak_flops(jax.devices()[0]) > 0  # CPU: falls back to the measurement
  # 1000 tokens/s of the 8B at 8K context on 8 H100s.
  fpt = flops.flops_per_token(C.LLAMA31_8B, 8192)
  assert flops.mfu(1000.0, fpt, 8, 989e12) == pytest.approx(1000 * fpt / (8 * 989e12))


def test_cpu_peak_is_measured_once_per_process(monkeypatch):
  """A run measures the host's peak before its input pipeline starts; the MFU readers made later (one per
  stage) reuse that value instead of measuring again while the pipeline's workers share the cores."""
  rates = iter([200e9, 100e9])  # a quiet host, then one with the input pipeline running
  calls = []
  monkeypatch.setattr(flops, "measure_matmul_peak", lambda: calls.append(1) or next(rates))
  monkeypatch.setattr(flops, "_MEASURED_PEAK", {}, raising=False)
  cpu = jax.devices("cpu")[0]
  assert flops.peak_flops(cpu) == 200e9
  assert flops.peak_flops(cpu) == 200e9
  assert len(calls) == 1
