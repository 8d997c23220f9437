"""Compile time and per-device memory of the train step, tiny to 8B, on 8 fake CPU devices (fsdp=8).

  python benchmarks/compile_memory.py                         # tiny, llama3.2-1b, llama3.2-3b, llama3.1-8b
  python benchmarks/compile_memory.py --presets=llama3.1-8b --seq_len=4096 --layers=1,2

Nothing is allocated: the real train step (llama_jax/training/step.py) is lowered from abstract arrays
(`step.abstract_state`, with `step.state_shardings`) and compiled; the memory is XLA's
`memory_analysis()` of the compiled program, per device. params and opt are the state's own shards
(one device's slice of each leaf), the batch and scalars are the rest of the arguments, temp is XLA's
temporaries (activations kept for the backward pass, gradients, the logits), total = arguments + outputs
not aliased to the donated state + temporaries + code.

Full layer counts compile slowly on a CPU, so each preset is compiled at --layers (two small counts,
layers scanned). Memory is linear in L (params and optimizer state exactly; a scanned stack keeps one
set of saved activations per layer), so the full model is extrapolated as
  M(L) = M(l1) + (L - l1) * (M(l2) - M(l1)) / (l2 - l1)
and printed beside the measured rows. CPU buffer assignment is not a GPU's or a TPU's: take the numbers
as the shape of the memory (what grows with what), not a promise for another backend.

The default run (2 min 45 s on a loaded 2-core CPU), batch 8x2048, bf16 compute, remat dots_saveable:

  preset          L compile s     params MiB        opt MiB other_args MiB       temp MiB      total MiB
  tiny            1      19.7            0.0            0.1            0.0          195.6          195.7
  tiny            2      20.1            0.1            0.1            0.0          409.6          409.8
  llama3.2-1b     1      16.1          154.3          308.5            0.0         6711.1         7173.9
  llama3.2-1b     2      18.3          183.3          366.6            0.0         6800.9         7350.8
  llama3.2-1b    16 (extrap.)          589.5         1179.0            0.0         8058.0         9826.6
  llama3.2-3b     1      18.8          235.9          471.8            0.0         8569.7         9277.4
  llama3.2-3b     2      21.4          283.9          567.9            0.0         8727.6         9579.4
  llama3.2-3b    28 (extrap.)         1532.5         3065.1            0.0        12832.4        17430.1
  llama3.1-8b     1      17.7          605.0         1210.1            0.0        11041.9        12857.1
  llama3.1-8b     2      22.5          709.1         1418.2            0.0        11408.2        13535.5
  llama3.1-8b    32 (extrap.)         3830.0         7660.0            0.0        22398.6        33888.6

params are the published counts / 8 in fp32 (8B: 8.03e9 x 4 B / 8 = 3830 MiB), opt twice that (Adam's
two moments). At one layer the temporaries are mostly the fp32 logits and their gradient: one 2048-token
row of a 128,256-entry vocabulary is 1 GiB per copy.
"""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from llama_jax import config as C
from llama_jax.parallel import sharding
from llama_jax.training import optim, step as train

_PRESETS = flags.DEFINE_list("presets", ["tiny", "llama3.2-1b", "llama3.2-3b", "llama3.1-8b"],
                             "Model presets: tiny or a name of llama_jax.config.PRESETS.")
_LAYERS = flags.DEFINE_list("layers", ["1", "2"], "The two layer counts compiled per preset (l1 < l2).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global rows per step (one per device at fsdp=8).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per row.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices, all on the fsdp axis.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype (params fp32).")
_REMAT = flags.DEFINE_enum("remat_policy", "dots_saveable", ["none", "full", "dots_saveable",
                                                             "dots_with_no_batch_dims_saveable"],
                           "Rematerialization (the 8B recipe's: dots_saveable).")


def _shard_bytes(tree) -> int:
  """Bytes of one device's shard of every leaf of an abstract tree (shapes carry their shardings)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _compile(cfg, mesh, opt):
  state = train.abstract_state(cfg, opt, mesh)
  sh = sharding.batch_sharding(mesh, ndim=2)
  batch = {k: jax.ShapeDtypeStruct((_BATCH.value, _SEQ_LEN.value), jnp.int32, sharding=sh)
           for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  step = train.make_train_step(cfg, opt, mesh)
  start = time.perf_counter()
  with sharding.use(mesh, sharding.logical_rules(cfg, mesh)):
    compiled = step.jitted.lower(state, batch).compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  params, opt_state = _shard_bytes(state.params), _shard_bytes(state.opt_state)
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  return dict(compile_s=seconds, params=params, opt=opt_state,
              other_args=m.argument_size_in_bytes - params - opt_state, temp=m.temp_size_in_bytes,
              total=total)


def main(argv):
  del argv
  # Before jax starts a backend: the CPU one, with fake devices (also on a machine with an accelerator).
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  presets = {"tiny": C.TINY, **C.PRESETS}
  l1, l2 = (int(x) for x in _LAYERS.value)
  if not 1 <= l1 < l2:
    raise app.UsageError(f"--layers={','.join(_LAYERS.value)}: give two counts 1 <= l1 < l2.")
  mesh = sharding.make_mesh(fsdp=_DEVICES.value, devices=jax.devices()[: _DEVICES.value])
  opt = optim.OptimizerConfig(warmup_steps=10, total_steps=1000)
  mib = 2.0**20
  cols = ("params", "opt", "other_args", "temp", "total")
  head = (f"{'preset':<12} {'L':>4} {'compile s':>9} " + " ".join(f"{c + ' MiB':>14}" for c in cols))
  print(f"\n{_DEVICES.value} fake CPU devices, mesh fsdp={_DEVICES.value}; "
        f"batch {_BATCH.value}x{_SEQ_LEN.value}; compute {_DTYPE.value}, params fp32, remat {_REMAT.value}; "
        "memory per device\n")
  print(head)
  print("-" * len(head))
  for name in _PRESETS.value:
    if name not in presets:
      raise app.UsageError(f"--presets: unknown {name!r}; choose from {sorted(presets)}.")
    full = dataclasses.replace(presets[name], dtype=_DTYPE.value, remat_policy=_REMAT.value,
                               scan_layers=True, max_seq_len=max(presets[name].max_seq_len, _SEQ_LEN.value))
    rows = {}
    for layers in sorted({min(l1, full.num_layers), min(l2, full.num_layers)}):
      rows[layers] = _compile(dataclasses.replace(full, num_layers=layers), mesh, opt)
      r = rows[layers]
      print(f"{name:<12} {layers:>4} {r['compile_s']:>9.1f} "
            + " ".join(f"{r[c] / mib:>14.1f}" for c in cols), flush=True)
    if len(rows) == 2 and full.num_layers not in rows:
      (a, ra), (b, rb) = sorted(rows.items())
      est = {c: ra[c] + (full.num_layers - a) * (rb[c] - ra[c]) / (b - a) for c in cols}
      print(f"{name:<12} {full.num_layers:>4} {'(extrap.)':>9} "
            + " ".join(f"{est[c] / mib:>14.1f}" for c in cols), flush=True)


if __name__ == "__main__":
  app.run(main)
