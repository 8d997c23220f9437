"""Context parallelism (Llama 3 §3.3.2): the 2·CP-chunk layout of the row, and CP = one device.

The row is cut into 2·CP chunks and context rank i holds chunks i and 2·CP−1−i; q is split over `context`,
K and V are all-gathered across it. With row indices and segment ids, the result is the plain model's.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from llama_jax import config as C
from llama_jax.errors import ConfigError
from llama_jax.model import params as P
from llama_jax.model.transformer import Transformer
from llama_jax.parallel import batching, context, sharding
from llama_jax.training import losses, optim, pretrain, step as train

CFG = dataclasses.replace(C.TINY, vocab_size=128)
B, T = 2, 32


@pytest.mark.parametrize("cp, chunks_of_rank", [
    (2, [[0, 3], [1, 2]]),
    (4, [[0, 7], [1, 6], [2, 5], [3, 4]]),
])
def test_layout_gives_rank_i_chunks_i_and_2cp_minus_1_minus_i(cp, chunks_of_rank):
  """The paper's assignment, written out by hand, read back from the shards of a real context mesh."""
  t, c = 16, 16 // (2 * cp)
  row_BT = np.stack([np.arange(t), 100 + np.arange(t)]).astype(np.int32)
  laid = context.to_context_layout(row_BT, cp)
  np.testing.assert_array_equal(context.from_context_layout(laid, cp), row_BT)
  np.testing.assert_array_equal(context.row_index(2, t, cp), np.broadcast_to(laid[0], (2, t)))
  # [B, T, V] arrays (logits) go back the same way.
  logits_BTV = np.random.default_rng(0).standard_normal((2, t, 3))
  np.testing.assert_array_equal(context.from_context_layout(context.to_context_layout(logits_BTV, cp), cp),
                                logits_BTV)

  mesh = sharding.make_mesh(context=cp, fsdp=1, devices=jax.devices()[:cp])
  spec = nn.logical_to_mesh_axes(("act_batch", "act_seq"), sharding.logical_rules(CFG, mesh))
  sharded = jax.device_put(laid, NamedSharding(mesh, spec))
  held = {}
  for shard in sharded.addressable_shards:
    held[mesh.devices.ravel().tolist().index(shard.device)] = np.asarray(shard.data)
  for rank, (first, second) in enumerate(chunks_of_rank):
    want = np.concatenate([row_BT[:, first * c:(first + 1) * c], row_BT[:, second * c:(second + 1) * c]], 1)
    np.testing.assert_array_equal(held[rank], want)


def test_layout_needs_seq_len_divisible_by_twice_the_context_degree():
  with pytest.raises(ConfigError, match=r"--seq_len=36 is not divisible by 2 x --mesh_context=4 = 8"):
    context.to_context_layout(np.zeros((1, 36)), 4)
  mesh = sharding.make_mesh(context=4)  # fsdp fills in 2
  with pytest.raises(ConfigError, match=r"--seq_len=36 is not divisible by 2 x --mesh_context=4 = 8"):
    train.check_batch_shape(2, 36, CFG, optim.OptimizerConfig(), mesh)
  train.check_batch_shape(2, 32, CFG, optim.OptimizerConfig(), mesh)


def packed_batch(seed=0):
  """Packed documents whose boundaries fall inside chunks (chunks of 4 at CP=4, of 8 at CP=2), padding
  at the end of row 0, positions restarting per document."""
  rng = np.random.default_rng(seed)
  docs = [[5, 11, 9, 4], [13, 19]]  # row 0: 29 tokens + 3 of padding
  segment_ids = np.zeros((B, T), np.int32)
  positions = np.zeros((B, T), np.int32)
  for b, lengths in enumerate(docs):
    start = 0
    for i, n in enumerate(lengths):
      segment_ids[b, start:start + n], positions[b, start:start + n] = i + 1, np.arange(n)
      start += n
  tokens = rng.integers(1, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  inputs = np.where(segment_ids > 0, tokens[:, :-1], 0)
  return dict(inputs=inputs, targets=tokens[:, 1:], segment_ids=segment_ids, positions=positions,
              loss_mask=(segment_ids > 0).astype(np.int32))


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _forward_and_grads(mesh, params, batch):
  """(logits, mean loss, tokens, gradients of the mean loss) on `mesh`, and the compiled HLO text."""
  model = Transformer(CFG)

  def f(p, b):
    logits_BTV = model.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"],
                             row_index_BT=b.get("row_index"))
    (loss_sum, aux), grads = jax.value_and_grad(lambda p: losses.pretrain_loss(model, p, b), has_aux=True)(p)
    return logits_BTV, loss_sum / aux["tokens"], aux["tokens"], jax.tree.map(lambda g: g / aux["tokens"], grads)

  p = jax.device_put(params, P.param_shardings(CFG, mesh))
  b = batching.global_batch(batch, mesh)
  with sharding.use(mesh, sharding.logical_rules(CFG, mesh)):
    compiled = jax.jit(f).lower(p, b).compile()
  return compiled(p, b), compiled.as_text()


@pytest.fixture(scope="module")
def params():
  return _host(P.init_params(CFG, sharding.make_mesh(devices=jax.devices()[:1]), jax.random.key(0)))


@pytest.fixture(scope="module")
def one_device(params):
  (logits, loss, tokens, grads), _ = _forward_and_grads(sharding.make_mesh(devices=jax.devices()[:1]),
                                                        params, packed_batch())
  return _host(logits), float(loss), float(tokens), _host(grads)


@pytest.mark.parametrize("fsdp, cp, tensor", [(1, 4, 1), (2, 2, 2)])
def test_context_parallel_equals_one_device(params, one_device, fsdp, cp, tensor, capfd):
  """Logits (after the inverse layout), loss, token count and gradients within 1e-5 (float32)."""
  mesh = sharding.make_mesh(fsdp=fsdp, context=cp, tensor=tensor, devices=jax.devices()[:fsdp * cp * tensor])
  batch = context.context_batch(packed_batch(), cp)
  assert "row_index" in batch
  capfd.readouterr()
  (logits, loss, tokens, grads), hlo = _forward_and_grads(mesh, params, batch)
  # XLA's warning when it can only reshard by replicating a whole array (it did, for the embedding
  # lookup from the table's D-over-fsdp layout to B over fsdp and T over context).
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
  # The paper's split: queries (and the logits) along T over `context`; each rank's K and V all-gathered
  # across it whole along S (their [B/fsdp, T, K/tensor, H] shards), not the activations they come from.
  assert "context" in logits.sharding.spec[1], logits.sharding.spec
  gathered = re.findall(r"= (f32\[[\d,]*\])\{[^}]*\} all-gather\(", hlo)
  kv = f"f32[{B // fsdp},{T},{CFG.num_kv_heads // tensor},{CFG.head_dim}]"
  assert gathered.count(kv) >= 2 * 2, gathered  # K and V, forward and backward
  if fsdp == tensor == 1:  # nothing else is gathered (with fsdp, weights are too)
    assert set(gathered) == {kv}, gathered
  logits1, loss1, tokens1, grads1 = one_device
  assert float(tokens) == tokens1 == packed_batch()["loss_mask"].sum()
  np.testing.assert_allclose(context.from_context_layout(_host(logits), cp), logits1, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(loss), loss1, atol=1e-5, rtol=1e-5)
  for (path, g), g1 in zip(jax.tree_util.tree_leaves_with_path(_host(grads)), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(g, g1, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_context_layout_without_row_index_is_wrong(params, one_device):
  """The row indices carry the causal order: the permuted batch without them gives other logits."""
  mesh = sharding.make_mesh(context=4, fsdp=1, devices=jax.devices()[:4])
  batch = context.context_batch(packed_batch(), 4)
  del batch["row_index"]
  (logits, *_), _ = _forward_and_grads(mesh, params, batch)
  assert np.abs(context.from_context_layout(_host(logits), 4) - one_device[0]).max() > 1e-2


def test_train_step_on_context_mesh_equals_one_device(params):
  """Host batches go into the layout in `global_batch`; two steps give the same metrics as one device."""
  opt = optim.OptimizerConfig(peak_lr=3e-3, final_lr=3e-4, warmup_steps=0, total_steps=100)
  metrics = {}
  for name, mesh in (("one", sharding.make_mesh(devices=jax.devices()[:1])),
                     ("cp", sharding.make_mesh(fsdp=2, context=2, tensor=2))):
    state = train.create_train_state(CFG, opt, mesh, jax.random.key(0),
                                     params=jax.device_put(params, P.param_shardings(CFG, mesh)))
    step = train.make_train_step(CFG, opt, mesh)
    metrics[name] = []
    for seed in (0, 1):
      global_batch = pretrain.global_batch(packed_batch(seed), mesh)
      assert ("row_index" in global_batch) == (name == "cp")
      state, m = step(state, global_batch)
      metrics[name].append(_host(m))
  for m1, mc in zip(metrics["one"], metrics["cp"]):
    assert mc["tokens"] == m1["tokens"]
    for k in ("loss", "grad_norm"):
      np.testing.assert_allclose(mc[k], m1[k], rtol=1e-5, err_msg=k)


def test_no_context_parallelism_takes_any_length():
  # --mesh_context=1 cuts nothing: an odd --seq_len is a valid row (it was refused as "not divisible by 2").
  context.check_seq_len(127, 1)
  np.testing.assert_array_equal(context.context_order(127, 1), np.arange(127))
  with pytest.raises(ConfigError, match=r"--seq_len=127 is not divisible by 2 x --mesh_context=2 = 4"):
    context.check_seq_len(127, 2)
