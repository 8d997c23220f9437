"""Train-step throughput and MFU of the real jitted train step, for a tiny and a ~100M Llama.

  python benchmarks/train_throughput.py                      # both configs, all local devices on fsdp
  python benchmarks/train_throughput.py --configs=100m --m100_batch=8 --m100_steps=10
  python benchmarks/train_throughput.py --devices=8          # CPU only: 8 fake devices on the host

Each config: create the sharded train state, run --warmup steps (the first compiles), then the timed
steps (--tiny_steps, --m100_steps) on random token batches already on device, blocking once at the
end. MFU is model FLOPs (llama_jax/training/flops.py, PaLM convention) over the peak: on accelerators the
vendor bf16 table value per device; on CPU a measured fp32 matmul rate of the host. Fake CPU devices
share the host's cores, so on CPU the denominator is that one host peak, not devices × peak.
"""

import dataclasses
import time

import jax
from absl import app, flags

from llama_jax.training import flops
from llama_jax.parallel import sharding
import bench_configs
from train_setup import make_train_setup

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "100m"], "Which configs to run: tiny, 100m.")
_TINY_BATCH = flags.DEFINE_integer("tiny_batch", 8, "Global batch size (sequences) for tiny.")
_M100_BATCH = flags.DEFINE_integer("m100_batch", 4, "Global batch size (sequences) for 100m.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_TINY_STEPS = flags.DEFINE_integer("tiny_steps", 20, "Timed steps for tiny.")
_M100_STEPS = flags.DEFINE_integer("m100_steps", 4, "Timed steps for 100m.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps before timing (the first one compiles).")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "Devices on the fsdp axis (default: all local devices; on CPU the real one). "
    "On CPU, more than the host has makes fake devices that share its cores.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype (default: float32 on CPU, bfloat16 on accelerators).")


def _configs():
  # The models of benchmarks/bench_configs.py (100m: GPT-2-small widths on the Llama 3.2 recipe).
  return {"tiny": (bench_configs.CONFIGS["tiny"][0], _TINY_BATCH.value, _TINY_STEPS.value),
          "100m": (bench_configs.CONFIGS["100m"][0], _M100_BATCH.value, _M100_STEPS.value)}


def _bench(name, cfg, batch_size, steps, seq_len, mesh, peak, host_peak):
  # Batches go to the device before the clock starts: we time the step, not the input pipeline.
  state, step_fn, batches = make_train_setup(cfg, batch_size, seq_len, mesh, _WARMUP.value + steps)
  start = time.perf_counter()
  for b in batches[:_WARMUP.value]:
    state, metrics = step_fn(state, b)
  jax.block_until_ready((state, metrics))
  warmup_s = time.perf_counter() - start

  start = time.perf_counter()
  for b in batches[_WARMUP.value:]:
    state, metrics = step_fn(state, b)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / steps

  tokens_per_s = batch_size * seq_len / step_s
  fpt = flops.flops_per_token(cfg, seq_len)
  n = 1 if host_peak else mesh.size
  return dict(config=name, params=cfg.param_count(), shape=f"{batch_size}x{seq_len}", steps=steps,
              step_s=step_s, tokens_per_s=tokens_per_s, tflops=tokens_per_s * fpt / 1e12,
              mfu=flops.mfu(tokens_per_s, fpt, n, peak), warmup_s=warmup_s,
              loss=float(metrics["loss"]))


def main(argv):
  del argv
  if _DEVICES.value is not None:
    # Before the backend starts. Only the CPU backend makes up devices; accelerators ignore this.
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  devices = jax.local_devices()
  if _DEVICES.value is not None:
    if _DEVICES.value > len(devices):
      raise app.UsageError(f"--devices={_DEVICES.value}: only {len(devices)} {devices[0].platform} "
                           "devices here.")
    devices = devices[: _DEVICES.value]
  mesh = sharding.make_mesh(fsdp=-1, devices=devices)
  kind = devices[0].device_kind
  on_cpu = devices[0].platform == "cpu"
  table_peak = flops.peak_flops_per_device(kind)
  if on_cpu or table_peak is None:
    peak = flops.measure_matmul_peak(n=1024, repeats=10)
    peak_note = f"measured fp32 1024x1024 matmul on {kind}, whole host"
  else:
    peak = table_peak
    peak_note = f"bf16 dense spec of {kind}, per device"
  dtype = _DTYPE.value or ("float32" if on_cpu else "bfloat16")

  configs = _configs()
  rows = []
  for name in _CONFIGS.value:
    if name not in configs:
      raise app.UsageError(f"--configs: unknown {name!r}; choose from {sorted(configs)}.")
    cfg, batch_size, steps = configs[name]
    cfg = dataclasses.replace(cfg, dtype=dtype)
    rows.append(_bench(name, cfg, batch_size, steps, _SEQ_LEN.value, mesh, peak, on_cpu))

  print(f"\ndevices: {len(devices)} x {kind} (mesh data=1 fsdp={mesh.shape['fsdp']} tensor=1), "
        f"compute dtype {dtype}, params fp32")
  print(f"peak: {peak / 1e12:.4f} TFLOP/s ({peak_note})")
  print(f"{_WARMUP.value} warmup steps, then the timed steps; step time is their mean\n")
  head = (f"{'config':<7} {'params':>12} {'batch×seq':>10} {'step (s)':>9} {'tokens/s':>10} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'steps':>5} {'warmup (s)':>10} {'loss':>7}")
  print(head)
  print("-" * len(head))
  for r in rows:
    print(f"{r['config']:<7} {r['params']:>12,} {r['shape']:>10} {r['step_s']:>9.3f} "
          f"{r['tokens_per_s']:>10,.0f} {r['tflops']:>8.4f} {r['mfu']:>6.1%} {r['steps']:>5} "
          f"{r['warmup_s']:>10.1f} {r['loss']:>7.3f}")


if __name__ == "__main__":
  app.run(main)
