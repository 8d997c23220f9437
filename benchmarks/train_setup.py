"""The real train step on random token batches, as the throughput benchmarks time it.

Shared by train_throughput.py and vs_maxtext.py so both time the same thing: the sharded train state of
llama_jax.training.step, its jitted step, and batches already on the device (the clock times the step,
not the input pipeline).
"""

import jax
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.parallel import sharding
from llama_jax.training import optim, step as train


def make_train_setup(cfg: ModelConfig, batch_size: int, seq_len: int, mesh, n_batches: int, seed: int = 0):
  """(state, step_fn, batches): a fresh train state, the jitted step and `n_batches` device batches."""
  opt = optim.OptimizerConfig(warmup_steps=10, total_steps=1000)
  train.check_batch_shape(batch_size, seq_len, cfg, opt, mesh)
  state = train.create_train_state(cfg, opt, mesh, jax.random.key(seed))
  step_fn = train.make_train_step(cfg, opt, mesh)

  rng = np.random.default_rng(seed)
  sh = sharding.batch_sharding(mesh, ndim=2)
  ones = np.ones((batch_size, seq_len), np.int32)
  positions = np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))

  def batch():
    tokens = rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    return jax.device_put(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=ones,
                               positions=positions, loss_mask=ones), sh)

  return state, step_fn, [batch() for _ in range(n_batches)]
