"""Host-side throughput metrics: read step t−1 after dispatching step t."""

import jax.numpy as jnp
import pytest

from llama_jax.training import metrics as metrics_lib


def test_metrics_reader_reads_the_previous_step():
  reader = metrics_lib.MetricsReader(flops_per_token=1e6, n_devices=2, peak_flops_per_device=1e9)
  assert reader.read(1, {"loss": jnp.float32(3.0)}, batch_tokens=100) is None
  step, m = reader.read(2, {"loss": jnp.float32(2.0)}, batch_tokens=100)
  assert step == 1 and m == {"loss": 3.0}  # no timing for the first (compiling) step
  step, m = reader.flush()
  assert step == 2 and m["loss"] == 2.0
  assert m["tokens_per_s"] == pytest.approx(100 / m["step_time_s"])
  assert m["mfu"] == pytest.approx(m["tokens_per_s"] * 1e6 / 2e9)
  assert reader.flush() is None
