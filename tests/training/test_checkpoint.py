"""Checkpoints: bitwise round trip with the data iterator, resharding on restore, atomicity, retention,
async save vs donation."""

import dataclasses

import grain
import jax
import numpy as np
import pytest

from llama_jax.training import checkpoint, optim, step as train
from llama_jax import config as C
from llama_jax.parallel import sharding

# TINY with 4 KV heads, so that tensor=4 can split them.
CFG = dataclasses.replace(C.TINY, num_heads=8, num_kv_heads=4, head_dim=8)
OPT = optim.OptimizerConfig(peak_lr=3e-3, final_lr=3e-4, warmup_steps=0, total_steps=100)
B, T = 8, 16


def _mesh(shape):
  data, fsdp, tensor = shape
  return sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[: data * fsdp * tensor])


def _batches(seed=0):
  """A grain iterator of packed batches in the data pipeline's format (a stand-in for llama_jax.data.pipeline)."""
  def to_batch(i):
    rng = np.random.default_rng(seed * 1000 + int(i))
    tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    ones = np.ones((B, T), np.int32)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=ones,
                positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)), loss_mask=ones)

  return iter(grain.MapDataset.range(1000).map(to_batch).to_iter_dataset())


def _batches_at(n):
  it = _batches()
  for _ in range(n):
    next(it)
  return it


def _host(state):
  state = state.replace(rng=jax.random.key_data(state.rng))
  return jax.tree.map(np.asarray, jax.device_get(state))


def _assert_bitwise_equal(a, b):
  la, lb = jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))
  assert len(la) == len(lb) and jax.tree.structure(_host(a)) == jax.tree.structure(_host(b))
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def fsdp8():
  """The fsdp=8 mesh, its train step, and a fresh state there (each test gets its own copy)."""
  mesh = _mesh((1, 8, 1))
  initial = _host(train.create_train_state(CFG, OPT, mesh, jax.random.key(0)))
  sh = train.state_shardings(CFG, OPT, mesh)

  def fresh_state():
    state = jax.device_put(initial, sh)
    return state.replace(rng=jax.random.wrap_key_data(state.rng))

  return mesh, train.make_train_step(CFG, OPT, mesh), fresh_state


def test_round_trip_is_bitwise_and_survives_donation(tmp_path, fsdp8):
  mesh, step_fn, fresh_state = fsdp8
  state = fresh_state()
  data = _batches()
  for _ in range(2):
    state, _ = step_fn(state, next(data))
  saved = _host(state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_interval_steps=1)
  assert ckpt.save(2, state, data)
  # The save is asynchronous; the next step donates (overwrites) the very buffers being saved,
  # and the iterator moves on. Neither may leak into the checkpoint.
  expected_next = next(_batches_at(2))
  state, _ = step_fn(state, next(data))
  next(data)
  ckpt.wait_until_finished()
  assert ckpt.latest_step() == 2

  restored, data2 = ckpt.restore(train.abstract_state(CFG, OPT, mesh), _batches())
  ckpt.close()
  assert int(restored.step) == 2
  assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
  _assert_bitwise_equal(restored, saved.replace(rng=jax.random.wrap_key_data(saved.rng)))
  for k, v in next(data2).items():
    np.testing.assert_array_equal(v, expected_next[k])  # the iterator resumes at batch 2


def test_restore_onto_another_mesh(tmp_path, fsdp8):
  """Saved on fsdp=8, restored onto fsdp=2 x tensor=4: same values, new layout, and it trains."""
  _, step8, fresh_state = fsdp8
  state, _ = step8(fresh_state(), next(_batches()))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, state, force=True)
  ckpt.wait_until_finished()

  mesh24 = _mesh((1, 2, 4))
  restored, _ = ckpt.restore(train.abstract_state(CFG, OPT, mesh24))
  ckpt.close()
  _assert_bitwise_equal(restored, state)
  wq = restored.params["layers"]["attn"]["wq"]
  assert wq.sharding.mesh.shape == mesh24.shape
  assert tuple(wq.sharding.spec) == (None, "fsdp", "tensor", None, None)
  assert wq.addressable_shards[0].data.shape == (CFG.num_layers, CFG.dim // 2, 1, CFG.q_per_kv, CFG.head_dim)
  mu = restored.opt_state[1][0].mu["layers"]["mlp"]["w_down"]
  assert mu.sharding == restored.params["layers"]["mlp"]["w_down"].sharding
  # One step on the new mesh gives what it gives on the old one.
  batch = next(_batches_at(1))
  _, m24 = train.make_train_step(CFG, OPT, mesh24)(restored, batch)
  _, m8 = step8(state, batch)
  np.testing.assert_allclose(float(m24["loss"]), float(m8["loss"]), rtol=1e-6)


def _small_state():
  return {"w": jax.numpy.arange(4.0), "rng": jax.random.key(3)}


def test_unfinished_write_is_never_the_latest(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(5, _small_state(), force=True)
  ckpt.close()
  # What a kill during the write of step 9 leaves: Orbax's tmp directory, never renamed to "9".
  partial = tmp_path / "9.orbax-checkpoint-tmp"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "half_written").write_bytes(b"\0" * 10)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 5 and ckpt.all_steps() == [5]
  abstract = _with_single_device_sharding(jax.eval_shape(_small_state))
  restored, _ = ckpt.restore(abstract)
  ckpt.close()
  assert not partial.exists()  # removed in the background at start
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(jax.random.key(3)))


def _with_single_device_sharding(abstract):
  s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract)


def test_interval_and_retention(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_interval_steps=2, max_to_keep=2)
  for step in range(1, 9):
    if ckpt.should_save(step):
      ckpt.save(step, _small_state())
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [6, 8]
  ckpt.close()
