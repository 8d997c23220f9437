"""One process of the multi-host training test: FSDP over 8 CPU devices, split over 1 or 2 processes.

  python tests/training/_multihost_train_worker.py PROCESS_ID NUM_PROCESSES PORT CKPT_DIR OUT_JSON

Each process drives 8 / NUM_PROCESSES local CPU devices; together they form one (1, 8, 1) mesh. The
run: 4 train steps, an async checkpoint at step 4, a restore into a fresh abstract state (checked
bitwise against the live state on this process's shards), 2 more steps from the restored state.
Writes OUT_JSON (losses, restore check, checksums) and OUT_JSON + ".npz" (final params, gathered).
Run by tests/test_multihost_train.py.
"""
import argparse
import json
import os
import re

GLOBAL_DEVICES = 8
B, T = 8, 16
STEPS_BEFORE_SAVE, STEPS_AFTER_RESTORE = 4, 2


def _parse():
  p = argparse.ArgumentParser()
  p.add_argument("process_id", type=int)
  p.add_argument("num_processes", type=int)
  p.add_argument("port", type=int)
  p.add_argument("ckpt_dir")
  p.add_argument("out_json")
  return p.parse_args()


ARGS = _parse()
if GLOBAL_DEVICES % ARGS.num_processes:
  raise SystemExit(f"num_processes={ARGS.num_processes} must divide {GLOBAL_DEVICES}")
# Before jax is imported: replace (not append to) any device count inherited from the test's env.
_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (
    f"{_flags} --xla_force_host_platform_device_count={GLOBAL_DEVICES // ARGS.num_processes}").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from llama_jax.training import checkpoint, losses as losses_lib, optim, step as train  # noqa: E402
from llama_jax import config as C  # noqa: E402
from llama_jax.model import factory  # noqa: E402
from llama_jax.parallel import distributed, sharding  # noqa: E402

# Same numerics as tests/conftest.py: exact fp32 matmuls on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

CFG = dataclasses.replace(C.TINY, vocab_size=128, max_seq_len=T)
OPT = optim.OptimizerConfig(peak_lr=1e-2, final_lr=1e-3, warmup_steps=2, total_steps=20)


def global_batch(step: int) -> dict[str, np.ndarray]:
  """The whole [B, T] batch of `step`, the same numbers in every process and every layout.

  Learnable on purpose (each row follows next = 5·cur + 3 mod V from a random start), so the loss
  falls within a few steps.
  """
  rng = np.random.default_rng(step)
  tokens = np.empty((B, T + 1), np.int64)
  tokens[:, 0] = rng.integers(0, CFG.vocab_size, B)
  for t in range(T):
    tokens[:, t + 1] = (5 * tokens[:, t] + 3) % CFG.vocab_size
  ones = np.ones((B, T), np.int32)
  return dict(inputs=tokens[:, :-1].astype(np.int32), targets=tokens[:, 1:].astype(np.int32),
              segment_ids=ones, positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
              loss_mask=ones)


def device_batch(step: int, mesh) -> dict[str, jax.Array]:
  """A global jax.Array per field; each process fills only the shards of its own devices."""
  sh = sharding.batch_sharding(mesh, ndim=2)
  return {k: jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
          for k, v in global_batch(step).items()}


def _leaves(state):
  return jax.tree.leaves(state.replace(rng=jax.random.key_data(state.rng)))


def local_shards_equal(a, b) -> bool:
  """Bitwise equality of two same-sharded states, over the shards this process holds."""
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    if x.shape != y.shape or x.dtype != y.dtype or x.sharding != y.sharding:
      return False
    for sx, sy in zip(x.addressable_shards, y.addressable_shards, strict=True):
      if sx.index != sy.index or not np.array_equal(np.asarray(sx.data), np.asarray(sy.data)):
        return False
  return True


def main():
  pid, nproc = ARGS.process_id, ARGS.num_processes
  if nproc > 1:
    distributed.initialize(distributed.resolve(
        {"coordinator_address": f"localhost:{ARGS.port}", "num_processes": nproc, "process_id": pid},
        {}), timeout_s=120)
  assert (jax.process_count(), jax.process_index(), jax.device_count()) == (nproc, pid, GLOBAL_DEVICES)

  mesh = sharding.make_mesh(fsdp=-1)  # fsdp over all 8 global devices
  train_step = train.make_train_step(CFG, OPT, mesh)
  state = train.create_train_state(CFG, OPT, mesh, jax.random.key(0))
  # The gradients each step is about to apply: the test bounds the params' drift between layouts by them.
  grad_fn = jax.jit(lambda p, b: train.accumulated_grads(factory.make_model(CFG), losses_lib.pretrain_loss,
                                                          p, b, 1)[0])
  grads = {}

  def record_grads(step, params, batch):
    with sharding.use(mesh, sharding.logical_rules(CFG, mesh)):
      g = grad_fn(params, batch)
    for path, x in jax.tree_util.tree_flatten_with_path(g)[0]:
      grads[f"grad{step}{jax.tree_util.keystr(path)}"] = np.asarray(
          multihost_utils.process_allgather(x, tiled=True))

  step_losses, lrs = [], []
  for step in range(STEPS_BEFORE_SAVE):
    batch = device_batch(step, mesh)
    record_grads(step, state.params, batch)
    state, metrics = train_step(state, batch)
    step_losses.append(metrics["loss"])  # replicated: every process can read it
    lrs.append(metrics["lr"])

  ckpt = checkpoint.Checkpointer(ARGS.ckpt_dir, save_interval_steps=1)
  assert ckpt.save(STEPS_BEFORE_SAVE, state, force=True)
  ckpt.wait_until_finished()
  restored, _ = ckpt.restore(train.abstract_state(CFG, OPT, mesh))
  ckpt.close()
  restore_ok = local_shards_equal(restored, state) and int(restored.step) == STEPS_BEFORE_SAVE
  del state  # continue from the restored state only

  state = restored
  for step in range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_RESTORE):
    batch = device_batch(step, mesh)
    record_grads(step, state.params, batch)
    state, metrics = train_step(state, batch)
    step_losses.append(metrics["loss"])
    lrs.append(metrics["lr"])
  losses = [float(x) for x in jax.device_get(step_losses)]
  lrs = [float(x) for x in jax.device_get(lrs)]

  # Every process assembles the whole params on host (a collective: all processes call it).
  flat, _ = jax.tree_util.tree_flatten_with_path(state.params)
  params = {jax.tree_util.keystr(path): np.asarray(multihost_utils.process_allgather(x, tiled=True))
            for path, x in flat}
  checksum = float(sum(np.sum(v, dtype=np.float64) for v in params.values()))
  abs_checksum = float(sum(np.sum(np.abs(v), dtype=np.float64) for v in params.values()))
  np.savez(ARGS.out_json + ".npz", **params)
  np.savez(ARGS.out_json + ".grads.npz", **grads)
  with open(ARGS.out_json, "w") as f:
    json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
               "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
               "losses": losses, "lrs": lrs, "losses_repr": [repr(x) for x in losses], "restore_ok": restore_ok,
               "final_step": int(state.step), "param_checksum": checksum,
               "param_abs_checksum": abs_checksum}, f)


if __name__ == "__main__":
  main()
