"""One process of the multi-host data test: the pretraining runner on a (1, 4, 2) mesh of 8 CPU devices.

  python tests/training/_multihost_pretrain_worker.py PROCESS_ID NUM_PROCESSES PORT RUN_DIR STEPS \
      TRAIN_JSONL TOKENIZER

With 2 processes the mesh is built so that every tensor pair has one device in each process: both
processes then hold every batch shard and must feed the same rows. With 1 process the mesh is the plain
reshape of its 8 devices. Everything else is `llama_jax.training.pretrain.pretrain` as the entry point
runs it (smoke model, checkpoints every 6 steps, resume from RUN_DIR's latest checkpoint).
Run by tests/training/test_multihost_data.py.
"""
import argparse
import dataclasses
import os
import re
import sys

GLOBAL_DEVICES = 8
p = argparse.ArgumentParser()
for name in ("process_id", "num_processes", "port"):
  p.add_argument(name, type=int)
p.add_argument("run_dir")
p.add_argument("steps", type=int)
p.add_argument("train_jsonl")
p.add_argument("tokenizer")
ARGS = p.parse_args()
_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (
    f"{_flags} --xla_force_host_platform_device_count={GLOBAL_DEVICES // ARGS.num_processes}").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from experiments.configs.pretrain import CONFIGS  # noqa: E402
from llama_jax.parallel import distributed, sharding  # noqa: E402
from llama_jax.training import pretrain as runner  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def crossing_mesh(*, data: int, fsdp: int, context: int = 1, tensor: int, devices=None) -> Mesh:
  """(1, 4, 1, 2); with 2 processes, tensor pair i = (process 0's device i, process 1's device i)."""
  assert (data, fsdp, context, tensor) == (1, 4, 1, 2), (data, fsdp, context, tensor)
  by_process = [[d for d in jax.devices() if d.process_index == i] for i in range(jax.process_count())]
  order = [d for group in zip(*by_process) for d in group]
  return Mesh(np.asarray(order).reshape(1, 4, 1, 2), sharding.MESH_AXES)


def main():
  pid, nproc = ARGS.process_id, ARGS.num_processes
  if nproc > 1:
    distributed.initialize(distributed.resolve(
        {"coordinator_address": f"localhost:{ARGS.port}", "num_processes": nproc, "process_id": pid},
        {}), timeout_s=120)
  sharding.make_mesh = crossing_mesh  # the runner builds its mesh through this module attribute
  smoke = CONFIGS["smoke"]
  run = dataclasses.replace(
      smoke, run_dir=ARGS.run_dir, steps=ARGS.steps, train_files=(ARGS.train_jsonl,), eval_files=(),
      tokenizer=ARGS.tokenizer, mesh_data=1, mesh_fsdp=4, mesh_tensor=2, checkpoint_every=6,
      keep_checkpoints=20, log_every=100, sample_prompts=(),
      optim=dataclasses.replace(smoke.optim, total_steps=12, warmup_steps=2))
  if pid == 0:
    mesh = crossing_mesh(data=1, fsdp=4, tensor=2)
    print("tensor pairs:", [[d.process_index for d in pair] for pair in mesh.devices[0, :, 0]], flush=True)
  runner.pretrain(run)


if __name__ == "__main__":
  main()
