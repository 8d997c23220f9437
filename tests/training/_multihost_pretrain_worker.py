"""One process of the multi-host data test: the pretraining runner on a mesh of 8 CPU devices.

  python tests/training/_multihost_pretrain_worker.py PROCESS_ID NUM_PROCESSES PORT RUN_DIR STEPS \
      TRAIN_JSONL TOKENIZER [--layout crossing|fsdp8]

crossing (default): a (1, 4, 1, 2) mesh. With 2 processes it is built so that every tensor pair has one
device in each process: both processes then hold every batch shard and must feed the same rows. With 1
process it is the plain reshape of its 8 devices.
fsdp8: the plain (1, 8, 1, 1) mesh from `sharding.make_mesh`; with 2 processes each holds a strict subset
of the rows.
Everything else is `llama_jax.training.pretrain.pretrain` as the entry point runs it (smoke model,
checkpoints every 6 steps, resume from RUN_DIR's latest checkpoint).

What the process feeds is recorded from the global arrays the runner builds (its `global_batch`): per
step, for every global row one of its devices holds, the sha256 of that row's bytes of every feature, read
back from the device shards. They are written to RUN_DIR.rows.p<PROCESS_ID>.json:
  {"process": i, "num_processes": n, "first_step": s, "train": {step: {row: [hashes]}}, "heldout": [...]}
where [hashes] are the distinct hashes of that row over this process's devices (one if they agree).
Run by tests/training/test_multihost_data.py.
"""
import argparse
import dataclasses
import hashlib
import json
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
p.add_argument("--layout", choices=("crossing", "fsdp8"), default="crossing")
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
from llama_jax.data import stream  # noqa: E402
from llama_jax.parallel import distributed, sharding  # noqa: E402
from llama_jax.training import pretrain as runner  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def crossing_mesh(*, data: int, fsdp: int, context: int = 1, tensor: int, devices=None) -> Mesh:
  """(1, 4, 1, 2); with 2 processes, tensor pair i = (process 0's device i, process 1's device i)."""
  assert (data, fsdp, context, tensor) == (1, 4, 1, 2), (data, fsdp, context, tensor)
  by_process = [[d for d in jax.devices() if d.process_index == i] for i in range(jax.process_count())]
  order = [d for group in zip(*by_process) for d in group]
  return Mesh(np.asarray(order).reshape(1, 4, 1, 2), sharding.MESH_AXES)


class RowRecorder:
  """Wraps the runner's `global_batch`: hashes the rows each call puts on this process's devices."""

  def __init__(self):
    self.first_step = None
    self.train: dict[int, dict[int, list[str]]] = {}
    self.heldout: list[dict[int, list[str]]] = []
    self._in_heldout = False

  @staticmethod
  def fed_rows(arrays: dict) -> dict[int, list[str]]:
    """{global row: distinct sha256 over this process's device shards} of a dict of global arrays."""
    per_device: dict = {}  # device -> (row slice, {feature: shard data})
    for k in stream.FEATURES:
      for shard in arrays[k].addressable_shards:
        rows = shard.index[0]
        per_device.setdefault(shard.device, (rows, {}))[1][k] = np.asarray(shard.data)
    out: dict[int, set[str]] = {}
    batch_size = arrays[stream.FEATURES[0]].shape[0]
    for rows, feats in per_device.values():
      for i, r in enumerate(range(*rows.indices(batch_size))):
        h = hashlib.sha256()
        for k in stream.FEATURES:
          x = feats[k][i]
          h.update(f"{k}:{x.dtype.str}:{x.shape}:".encode() + np.ascontiguousarray(x).tobytes())
        out.setdefault(r, set()).add(h.hexdigest())
    return {r: sorted(hs) for r, hs in sorted(out.items())}

  def install(self):
    global_batch, run_loop = runner.global_batch, runner.loop.run
    prepare_heldout = runner.heldout.prepare

    def recording_global_batch(batch, mesh):
      arrays = global_batch(batch, mesh)
      fed = self.fed_rows(arrays)
      if self._in_heldout:
        self.heldout.append(fed)
      else:  # the loop calls it once per train step, in order, from first_step + 1
        self.train[self.first_step + 1 + len(self.train)] = fed
      return arrays

    def recording_run(**kw):
      self.first_step = kw["first_step"]
      return run_loop(**kw)

    def recording_prepare(*a, **kw):
      self._in_heldout = True
      try:
        return prepare_heldout(*a, **kw)
      finally:
        self._in_heldout = False

    # The runner looks these up as module attributes at call time.
    runner.global_batch = recording_global_batch
    runner.loop.run = recording_run
    runner.heldout.prepare = recording_prepare

  def write(self, path: str):
    with open(path, "w") as f:
      json.dump({"process": jax.process_index(), "num_processes": jax.process_count(),
                 "first_step": self.first_step, "train": self.train, "heldout": self.heldout}, f)


def main():
  pid, nproc = ARGS.process_id, ARGS.num_processes
  if nproc > 1:
    distributed.initialize(distributed.resolve(
        {"coordinator_address": f"localhost:{ARGS.port}", "num_processes": nproc, "process_id": pid},
        {}), timeout_s=120)
  crossing = ARGS.layout == "crossing"
  if crossing:
    sharding.make_mesh = crossing_mesh  # the runner builds its mesh through this module attribute
  smoke = CONFIGS["smoke"]
  run = dataclasses.replace(
      smoke, run_dir=ARGS.run_dir, steps=ARGS.steps, train_files=(ARGS.train_jsonl,), eval_files=(),
      tokenizer=ARGS.tokenizer, mesh_data=1, mesh_fsdp=4 if crossing else 8,
      mesh_tensor=2 if crossing else 1,
      checkpoint_every=6, keep_checkpoints=20, log_every=100, sample_prompts=(),
      optim=dataclasses.replace(smoke.optim, total_steps=12, warmup_steps=2))
  if pid == 0 and crossing:
    mesh = crossing_mesh(data=1, fsdp=4, tensor=2)
    print("tensor pairs:", [[d.process_index for d in pair] for pair in mesh.devices[0, :, 0]], flush=True)
  recorder = RowRecorder()
  recorder.install()
  runner.pretrain(run)
  recorder.write(f"{ARGS.run_dir.rstrip(os.sep)}.rows.p{pid}.json")


if __name__ == "__main__":
  main()
