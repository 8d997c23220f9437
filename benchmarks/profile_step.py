"""Where the time of the real train step goes: by category, and the matmuls' achieved FLOP/s vs peak.

  python benchmarks/profile_step.py                       # the 45M peer-comparison model, 8 × 512
  python benchmarks/profile_step.py --config=100m --top=12
  python benchmarks/profile_step.py --set=loss_chunk=4096 --set=remat_policy=dots_saveable

Compiles the real train step (llama_jax/training/step.py) on one device, times --steps steps (each
blocked on, median), then traces --trace_steps more with jax.profiler and joins the trace's events with
the compiled HLO (llama_jax/training/profiling.py): time per category — matmul, elementwise, reduction,
copy/transpose, collective — summed over the events (on CPU the runtime runs independent ops on both
cores at once, so the sum can exceed the wall time); the traced wall time split per category and per
source op (each instant shared by the ops running then; idle where none runs), which adds up to the
step; and each large matmul's FLOP/s against the measured
peak: the best of a jitted fp32 n×n matmul for n in 1024, 2048 (the same runtime, one op alone).
"""

import dataclasses
import glob
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from llama_jax.parallel import sharding
from llama_jax.training import flops, profiling

import bench_configs
from train_setup import make_train_setup

_CONFIG = flags.DEFINE_enum("config", "45m", sorted(bench_configs.CONFIGS), "Model (benchmarks/bench_configs.py).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: the config's).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after 2 warmup steps (median reported).")
_TRACE = flags.DEFINE_integer("trace_steps", 2, "Steps traced for the breakdown.")
_TOP = flags.DEFINE_integer("top", 8, "Matmuls listed one by one (largest time first).")
_SET = flags.DEFINE_multi_string("set", [], "ModelConfig field=value overrides, e.g. loss_chunk=4096.")


def _override(cfg, items):
  for item in items:
    key, _, value = item.partition("=")
    if not hasattr(cfg, key):
      raise app.UsageError(f"--set={item}: ModelConfig has no field {key!r}.")
    old = getattr(cfg, key)
    value = (value.lower() in ("1", "true")) if isinstance(old, bool) else type(old)(value)
    cfg = dataclasses.replace(cfg, **{key: value})
  return cfg


def main(argv):
  del argv
  cfg, batch_size, seq_len = bench_configs.CONFIGS[_CONFIG.value]
  batch_size, seq_len = _BATCH.value or batch_size, _SEQ.value or seq_len
  cfg = _override(dataclasses.replace(cfg, dtype="float32"), _SET.value)
  mesh = sharding.make_mesh(fsdp=-1, devices=jax.local_devices()[:1])
  state, step_fn, batches = make_train_setup(cfg, batch_size, seq_len, mesh,
                                             2 + _STEPS.value + _TRACE.value)
  # The executable compiled here (its HLO is what the trace is joined with) is the one that runs.
  with sharding.use(mesh, sharding.logical_rules(cfg, mesh)):
    compiled = step_fn.jitted.lower(state, batches[0]).compile()
  ops = profiling.hlo_ops(compiled.as_text())

  times = []
  for i, b in enumerate(batches[:2 + _STEPS.value]):
    start = time.perf_counter()
    state, metrics = compiled(state, b)
    jax.block_until_ready((state, metrics))
    if i >= 2:
      times.append(time.perf_counter() - start)
  step_s = float(np.median(times))

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for b in batches[2 + _STEPS.value:]:
        state, metrics = compiled(state, b)
      jax.block_until_ready((state, metrics))
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    profile = jax.profiler.ProfileData.from_file(path)
    events = list(profiling.trace_events(profile))
    wall = profiling.wall_breakdown(ops, profiling.trace_spans(profile), steps=_TRACE.value)
  cats, per_op, others = profiling.breakdown(ops, events, steps=_TRACE.value)

  peak = max(flops.measure_matmul_peak(n=n, repeats=5) for n in (1024, 2048))
  model_flops = flops.flops_per_token(cfg, seq_len) * batch_size * seq_len
  busy = sum(r.seconds for r in cats.values())

  print(f"\n{_CONFIG.value}: {cfg.param_count():,} params, {batch_size} x {seq_len}, float32, "
        f"remat {cfg.remat_policy}, loss_chunk {cfg.loss_chunk}, attention {cfg.attention_impl}, "
        f"{jax.devices()[0].device_kind}")
  print(f"step {step_s:.3f} s (median of {len(times)}), model FLOPs {model_flops / 1e12:.3f} T/step → "
        f"{model_flops / step_s / 1e9:.1f} GFLOP/s = {model_flops / step_s / peak:.1%} of the matmul "
        f"peak {peak / 1e9:.1f} GFLOP/s")
  print(f"ops' summed time {busy:.3f} s/step (traced {_TRACE.value} steps)\n")
  head = f"{'category':<15} {'s/step':>8} {'share':>6} {'ops/step':>8} {'GFLOP/step':>10} {'GFLOP/s':>8} {'of peak':>7}"
  print(head)
  print("-" * len(head))
  for r in sorted(cats.values(), key=lambda r: -r.seconds):
    rate = r.flops / r.seconds / 1e9 if r.flops and r.seconds else None
    print(f"{r.category:<15} {r.seconds:>8.3f} {r.seconds / busy:>6.1%} {r.events:>8} "
          f"{r.flops / 1e9:>10.1f} " + (f"{rate:>8.1f} {rate * 1e9 / peak:>7.1%}" if rate else ""))
  print(f"\nwall time per step (each instant split over the ops running then): traced span {wall.span:.3f} s, "
        f"no op running {wall.idle:.3f} s")
  for c, sec in sorted(wall.by_category.items(), key=lambda kv: -kv[1]):
    if sec:
      print(f"  {c:<15} {sec:>7.3f} s  {sec / wall.span:>6.1%}")
  print("largest by source (wall s/step; the backward's ops under their forward op's name, 'bwd'):")
  for (c, src), sec in sorted(wall.by_source.items(), key=lambda kv: -kv[1])[:2 * _TOP.value]:
    print(f"  {c:<15} {sec:>7.3f} s  {src[:70]}")
  print("\nlargest other ops (time per step):")
  for name, r in sorted(others.items(), key=lambda kv: -kv[1].seconds)[:_TOP.value]:
    print(f"  {name:<28} {r.category:<15} {r.seconds:>7.3f} s  x{r.events:<3} {ops[name].out_bytes / 2**20:>8.1f} MiB out  {ops[name].source[:60]}")
  print("\nlargest matmuls (time per step; FLOP/s of each against the peak):")
  for name, r in sorted(per_op.items(), key=lambda kv: -kv[1].seconds)[:_TOP.value]:
    rate = r.flops / r.seconds if r.seconds else 0.0
    print(f"  {name:<22} {r.seconds:>7.3f} s  x{r.events:<3} {r.flops / 1e9:>7.1f} GFLOP  "
          f"{rate / 1e9:>6.1f} GFLOP/s  {rate / peak:>6.1%}  {ops[name].source[:60]}")


if __name__ == "__main__":
  app.run(main)
