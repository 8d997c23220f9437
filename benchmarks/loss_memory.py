"""Temporary memory and time of the loss and its gradient: plain [B, T, V] logits vs the chunked loss.

  python benchmarks/loss_memory.py                               # V = 128256 and 32000, T = 512 and 2048
  python benchmarks/loss_memory.py --vocabs=128256 --seq_lens=8192 --loss_chunk=1024 --steps=0

For each vocabulary and length, `jax.value_and_grad` of losses.pretrain_loss_reference (the model's whole
fp32 logits, then cross_entropy) and of losses.pretrain_loss (ModelConfig.loss_chunk tokens at a time: positions, at batch 1,
rematerialized) on a one-layer tiny model, batch 1, fp32, one device, is lowered and compiled;
`compiled.memory_analysis().temp_size_in_bytes` is XLA's peak of temporary buffers (logits, activations,
gradients; not the params or the batch). `logits` is the size of one fp32 [B, T, V] array: the plain
gradient needs a few of them, the chunked one less than one. Then (--steps > 0) the step is timed.
"""

import dataclasses
import time

import jax
import numpy as np
from absl import app, flags

from llama_jax import config as C
from llama_jax.model import params as params_lib
from llama_jax.model.transformer import Transformer
from llama_jax.parallel import sharding
from llama_jax.training import losses

_VOCABS = flags.DEFINE_list("vocabs", ["128256", "32000"], "Vocabulary sizes V.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["512", "2048"], "Sequence lengths T (batch 1).")
_CHUNK = flags.DEFINE_integer("loss_chunk", 256, "ModelConfig.loss_chunk of the chunked loss (tokens per device).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after one warm-up step (0: compile only).")

LOSSES = {"plain": losses.pretrain_loss_reference, "chunked": losses.pretrain_loss}


def _batch(cfg, seq_len):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (1, seq_len + 1), dtype=np.int32)
  ones = np.ones((1, seq_len), np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=ones,
              positions=np.arange(seq_len, dtype=np.int32)[None], loss_mask=ones)


def _measure(cfg, loss_fn, params, batch):
  model = Transformer(cfg)
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(model, p, b), has_aux=True))
  start = time.perf_counter()
  compiled = grad_fn.lower(params, batch).compile()
  compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes
  if _STEPS.value == 0:
    return temp, compile_s, None, None
  (loss, _), _ = jax.block_until_ready(compiled(params, batch))  # warm-up
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    out = compiled(params, batch)
  jax.block_until_ready(out)
  return temp, compile_s, (time.perf_counter() - start) / _STEPS.value, float(loss)


def main(argv):
  del argv
  mesh = sharding.make_mesh(fsdp=1, devices=jax.local_devices()[:1])
  lens = [int(n) for n in _SEQ_LENS.value]
  print(f"one-layer tiny model (D={C.TINY.dim}), batch 1, fp32, one {jax.devices()[0].device_kind} device, "
        f"loss_chunk {_CHUNK.value}; loss + gradient of all params")
  head = (f"{'V':>7} {'T':>6} {'loss':<8} {'temp (MiB)':>11} {'logits (MiB)':>13} {'step (s)':>9} "
          f"{'compile (s)':>11} {'loss sum':>12}")
  print(head + "\n" + "-" * len(head), flush=True)
  for v in (int(v) for v in _VOCABS.value):
    cfg = dataclasses.replace(C.TINY, vocab_size=v, num_layers=1, max_seq_len=max(lens),
                              loss_chunk=_CHUNK.value)
    params = params_lib.init_params(cfg, mesh, jax.random.key(0))
    for t in lens:
      batch = _batch(cfg, t)
      for name, loss_fn in LOSSES.items():
        temp, compile_s, step_s, loss = _measure(cfg, loss_fn, params, batch)
        step = "-" if step_s is None else f"{step_s:.3f}"
        total = "-" if loss is None else f"{loss:.4f}"
        print(f"{v:>7} {t:>6} {name:<8} {temp / 2**20:>11.1f} {t * v * 4 / 2**20:>13.1f} {step:>9} "
              f"{compile_s:>11.1f} {total:>12}", flush=True)


if __name__ == "__main__":
  app.run(main)
