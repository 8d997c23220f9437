"""Peak temporary memory and time of one training step vs sequence length: einsum vs blockwise attention.

  python benchmarks/attention_memory.py                        # 1K ... 32K tokens, tiny model, batch 1
  python benchmarks/attention_memory.py --seq_lens=1024,2048 --block_size=256

For each length and attention_impl, the real jitted train step (llama_jax/training/step.py) is lowered and
compiled; `compiled.memory_analysis().temp_size_in_bytes` is XLA's peak of temporary buffers (activations,
scores, gradients; not params, optimizer state or the batch). Then the step runs (--steps timed after one
warm-up) unless its temporaries exceed --max_temp_gb, where the row says "skipped". The last column is the
ratio of temporaries to the row at half the length: ~4 for the einsum oracle's T×S scores, ~2 for blockwise.
"""

import dataclasses
import time

import jax
import numpy as np
from absl import app, flags

from llama_jax import config as C
from llama_jax.parallel import sharding
from llama_jax.training import optim, step as train

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384", "32768"],
                              "Sequence lengths (tokens per row; batch 1).")
_IMPLS = flags.DEFINE_list("impls", ["einsum", "blockwise"], "attention_impl values to compare.")
_BLOCK = flags.DEFINE_integer("block_size", 512, "ModelConfig.attention_block_size for blockwise.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps after one warm-up step (0: compile only).")
_MAX_TEMP_GB = flags.DEFINE_float("max_temp_gb", 8.0,
                                  "Run a step only if its compiled temporaries fit in this many GB.")


def _batch(cfg, seq_len, mesh):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (1, seq_len + 1), dtype=np.int32)
  ones = np.ones((1, seq_len), np.int32)
  return jax.device_put(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=ones,
                             positions=np.arange(seq_len, dtype=np.int32)[None], loss_mask=ones),
                        sharding.batch_sharding(mesh, ndim=2))


def _measure(cfg, seq_len, mesh):
  opt = optim.OptimizerConfig(warmup_steps=10, total_steps=1000)
  state = train.create_train_state(cfg, opt, mesh, jax.random.key(0))
  step_fn = train.make_train_step(cfg, opt, mesh)
  batch = _batch(cfg, seq_len, mesh)
  start = time.perf_counter()
  with sharding.use(mesh, sharding.logical_rules(cfg, mesh)):
    compiled = step_fn.jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes
  if _STEPS.value == 0 or temp > _MAX_TEMP_GB.value * 2**30:
    return temp, compile_s, None
  state, metrics = step_fn(state, batch)  # warm-up (compiles again through the cache)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  return temp, compile_s, (time.perf_counter() - start) / _STEPS.value


def main(argv):
  del argv
  mesh = sharding.make_mesh(fsdp=1, devices=jax.local_devices()[:1])
  lens = [int(n) for n in _SEQ_LENS.value]
  base = dataclasses.replace(C.TINY, max_seq_len=max(lens), attention_block_size=_BLOCK.value)
  print(f"tiny model ({base.param_count():,} params, {base.num_layers} layers, N={base.num_heads} "
        f"K={base.num_kv_heads} H={base.head_dim}), batch 1, fp32, one {jax.devices()[0].device_kind} device, "
        f"block {_BLOCK.value}")
  head = f"{'impl':<10} {'seq':>6} {'temp (MiB)':>11} {'x at 2T':>8} {'step (s)':>9} {'compile (s)':>11}"
  print(head + "\n" + "-" * len(head), flush=True)
  for impl in _IMPLS.value:
    prev = {}
    for n in lens:
      temp, compile_s, step_s = _measure(dataclasses.replace(base, attention_impl=impl), n, mesh)
      ratio = f"{temp / prev[n // 2]:.2f}" if n // 2 in prev else "-"
      prev[n] = temp
      step = "skipped" if step_s is None else f"{step_s:.3f}"
      print(f"{impl:<10} {n:>6} {temp / 2**20:>11.1f} {ratio:>8} {step:>9} {compile_s:>11.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
