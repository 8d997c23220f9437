"""Compile the real train step for a mesh without the hardware: `python experiments/aot_compile.py
--model=llama3.1-8b --mesh=fsdp=8` prints memory, FLOPs and collectives per device next to the analytic
FSDP / tensor-parallel values (llama_jax/training/aot.py). Nothing is allocated: the state and batch are
ShapeDtypeStructs with shardings. Without --topology the devices are N fake CPU devices (N = the mesh's
product); with --topology=v5p:4x4x4 (needs libtpu) they are the compile-only devices of a TPU slice.
"""

import dataclasses
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from experiments.configs.pretrain import CONFIGS  # noqa: E402
from llama_jax import config as config_lib  # noqa: E402
from llama_jax.errors import ConfigError  # noqa: E402
from llama_jax.parallel import sharding  # noqa: E402
from llama_jax.training import aot, optim  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, f"Model preset: one of {sorted(config_lib.PRESETS)}.")
_CONFIG = flags.DEFINE_enum("config", None, sorted(CONFIGS), "A shipped pretraining config (its model, "
                            "optimizer, batch and sequence length); --model and the flags below override.")
_MESH = flags.DEFINE_string("mesh", "fsdp=8", "Mesh degrees, e.g. fsdp=8 or data=2,fsdp=16,tensor=4; or "
                            "'auto': the smallest FSDP degree whose state fits --target (see --devices).")
_DEVICES = flags.DEFINE_integer("devices", 8, "Devices for --mesh=auto without --topology.")
_TARGET = flags.DEFINE_enum("target", "tpu-v5p", sorted(aot.TARGETS), "Device whose HBM the total must fit.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Compile for a TPU topology, e.g. v5p:2x2x2 (needs libtpu).")
_BATCH = flags.DEFINE_integer("batch_per_chip", None, "Rows per data-parallel device (default: the "
                              "config's batch over the mesh, else 1).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: the config's, else 4096).")
_LAYERS = flags.DEFINE_integer("num_layers", None, "Override the layer count (a cheap compile).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default bfloat16).")
_REMAT = flags.DEFINE_enum("remat_policy", None, list(config_lib.RematPolicy.__args__), "Rematerialization.")
_ATTN = flags.DEFINE_enum("attention_impl", None, list(config_lib.AttentionImpl.__args__), "Attention.")
_ACCUM = flags.DEFINE_integer("grad_accum_steps", None, "Microbatches per optimizer step.")
_DUMP = flags.DEFINE_string("dump_hlo", None, "Write the compiled (optimized) HLO text to this file.")


def settings():
  """(model config, optimizer config, global batch or None, seq_len) from the flags."""
  run = CONFIGS[_CONFIG.value] if _CONFIG.value else None
  model = config_lib.get_preset(_MODEL.value) if _MODEL.value else (
      run.model if run else config_lib.get_preset("llama3.1-8b"))
  over = {"dtype": _DTYPE.value or (model.dtype if run and not _MODEL.value else "bfloat16"),
          "remat_policy": _REMAT.value, "attention_impl": _ATTN.value, "num_layers": _LAYERS.value}
  model = dataclasses.replace(model, **{k: v for k, v in over.items() if v is not None})
  opt = run.optim if run else optim.LLAMA3_8B_OPT
  if _ACCUM.value:
    opt = dataclasses.replace(opt, grad_accum_steps=_ACCUM.value)
  return model, opt, (run.batch_size if run else None), _SEQ.value or (run.seq_len if run else 4096)


def main(argv):
  del argv
  try:
    target = aot.TARGETS[_TARGET.value]
    model, opt, run_batch, seq_len = settings()
    devices = aot.tpu_devices(_TOPOLOGY.value) if _TOPOLOGY.value else None
    n = len(devices) if devices else (_DEVICES.value if _MESH.value == "auto"
                                      else aot.mesh_devices(aot.parse_mesh(_MESH.value)))
    mesh_spec = (aot.auto_mesh(model, n, target.hbm_bytes) if _MESH.value == "auto"
                 else aot.parse_mesh(_MESH.value))
    if not devices:
      aot.use_fake_cpu_devices(n)
    mesh = sharding.make_mesh(**mesh_spec, devices=devices or jax.devices()[:n])
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = _BATCH.value * dp if _BATCH.value else (run_batch if run_batch else dp)
    print(f"{model.num_layers}-layer {_MODEL.value or _CONFIG.value or 'llama3.1-8b'} "
          f"({model.param_count() / 1e9:.2f}B params, {model.dtype}, remat={model.remat_policy}, "
          f"attention={model.attention_impl}) | mesh {aot.mesh_str(mesh_spec)} on {n} "
          f"{devices[0].device_kind if devices else 'fake CPU devices'} | batch {batch}x{seq_len} "
          f"({batch // dp} per chip), grad_accum {opt.grad_accum_steps}", flush=True)
    compiled, seconds = aot.compile_train_step(model, opt, mesh, batch, seq_len)
    if _DUMP.value:
      with open(_DUMP.value, "w") as f:
        f.write(compiled.as_text())
    report = aot.measure(compiled, model, opt, mesh, batch, seq_len, seconds)
    wire = model.dtype if devices else None  # TPU gathers and reduces in the compute dtype
    print(aot.format_report(report, aot.expected(model, opt, mesh, batch, seq_len, wire), target.hbm_bytes,
                            target.name))
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
