"""The chunked output layer + cross-entropy (losses.pretrain_loss) against its oracle
(losses.pretrain_loss_reference: the model's whole [B, T, V] logits, then cross_entropy).

Tolerance 1e-6, relative: the two compute the same fp32 products and differ only in the order of the
sums (per chunk, then over chunks, instead of one reduction over [B, T]; the same for the output weight's
gradient, a sum over tokens). The loss sum is compared with rtol 1e-6, each gradient leaf with
max|g - g_ref| <= 1e-6 * max|g_ref| (a per-element relative bound means nothing where the sum cancels).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from jaxtyping import jaxtyped

from llama_jax import config as C
from llama_jax.model import params as P
from llama_jax.model import transformer
from llama_jax.parallel import batching, context, sharding
from llama_jax.training import losses

B, T = 4, 16
RTOL = 1e-6


def make_batch(seed=0, vocab=256):
  """Packed rows: two documents each, then padding (segment 0, loss_mask 0) at the end of most rows."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
  segment_ids, positions = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  for i in range(B):
    cut, end = rng.integers(2, T - 4), rng.integers(T - 4, T + 1)
    segment_ids[i, :cut], segment_ids[i, cut:end] = 1, 2
    positions[i, :cut], positions[i, cut:end] = np.arange(cut), np.arange(end - cut)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segment_ids, positions=positions,
              loss_mask=(segment_ids > 0).astype(np.int32))


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _one_device():
  return sharding.make_mesh(devices=jax.devices()[:1])


def _loss_and_grads(cfg, loss_fn, params, batch, mesh=None):
  """(loss sum, token count, gradients of the loss sum) on `mesh` (one device if None)."""
  mesh = mesh or _one_device()
  model = transformer.Transformer(cfg)
  f = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(model, p, b), has_aux=True))
  p = jax.device_put(params, P.param_shardings(cfg, mesh))
  b = batching.global_batch(batch, mesh)
  with sharding.use(mesh, sharding.logical_rules(cfg, mesh)):
    (loss_sum, aux), grads = f(p, b)
  return float(loss_sum), float(aux["tokens"]), _host(grads)


def _assert_grads_close(grads, want, per_leaf=True):
  """max|g - g_ref| <= RTOL * max|g_ref| per leaf, or with per_leaf=False the max over the whole tree."""
  tree_scale = max(np.max(np.abs(r)) for r in jax.tree.leaves(want))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    ref = _leaf(want, path)
    scale = np.max(np.abs(ref)) if per_leaf else tree_scale
    assert scale > 0, path
    np.testing.assert_array_less(np.max(np.abs(g - ref)), RTOL * scale, err_msg=jax.tree_util.keystr(path))


def _leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


@functools.cache
def _case(tied: bool):
  """(config, params, batch, the oracle's loss sum, count and gradients on one device)."""
  cfg = C.TINY_TIED if tied else C.TINY
  params = _host(P.init_params(cfg, _one_device(), jax.random.key(0)))
  batch = make_batch()
  return cfg, params, batch, _loss_and_grads(cfg, losses.pretrain_loss_reference, params, batch)


# loss_chunk counts tokens per device: over B = 4 rows on one device, 16 is 4 positions per row (four
# chunks of T = 16), 32 is 8 (two chunks). The default loss_chunk (2048 >= B·T: one chunk) is the path of
# most other tests of the train step; padded chunks are in the two tests after the next.
@pytest.mark.parametrize("tied, chunk", [(False, 16), (False, 32), (True, 32)])
def test_chunked_loss_and_gradients_equal_the_reference(tied, chunk):
  cfg, params, batch, (want_loss, want_tokens, want_grads) = _case(tied)
  assert ("lm_head" in params) != tied
  assert 0 < batch["loss_mask"].sum() < B * T  # masked (padding) targets are in the batch
  loss, tokens, grads = _loss_and_grads(dataclasses.replace(cfg, loss_chunk=chunk), losses.pretrain_loss,
                                        params, batch)
  assert tokens == want_tokens == batch["loss_mask"].sum()
  assert loss == pytest.approx(want_loss, rel=RTOL)
  _assert_grads_close(grads, want_grads)


def test_chunked_cross_entropy_matches_float64_numpy():
  """The chunked function alone, against float64 NumPy, untied and tied, with padding (T=7, 2 rows:
  loss_chunk 6 = chunks of 3 positions)."""
  rng = np.random.default_rng(1)
  b, t, d, v = 2, 7, 8, 11
  x = rng.standard_normal((b, t, d)).astype(np.float32)
  w_dv = rng.standard_normal((d, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  mask = (rng.random((b, t)) < 0.7).astype(np.int32)
  logits = x.astype(np.float64) @ w_dv.astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  want = (nll * mask).sum()
  base = dataclasses.replace(C.TINY, vocab_size=v, dim=d, loss_chunk=6)
  checked = jaxtyped(typechecker=beartype)(losses.chunked_cross_entropy)
  for cfg, w in ((base, w_dv), (dataclasses.replace(base, tie_embeddings=True), w_dv.T.copy())):
    total, count = checked(jnp.asarray(x), jnp.asarray(w), cfg, jnp.asarray(targets), jnp.asarray(mask))
    assert float(count) == mask.sum()
    assert float(total) == pytest.approx(want, rel=1e-6)


def test_targets_outside_the_vocabulary_count_as_the_oracle_counts_them():
  """The chunked loss picks the target's logit by a gather; cross_entropy (the oracle) by a masked sum,
  which gives 0 for a target outside [0, V). The gather must too (not a clipped neighbour's logit, not
  NaN), masked or not, and the gradients stay the oracle's."""
  rng = np.random.default_rng(2)
  b, t, d, v = 2, 6, 8, 11
  x = jnp.asarray(rng.standard_normal((b, t, d)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((d, v)).astype(np.float32))
  targets = jnp.asarray([[0, v, -1, 3, v + 5, 10], [v, 2, -7, 1, 0, v - 1]], jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1]], jnp.int32)
  cfg = dataclasses.replace(C.TINY, vocab_size=v, dim=d, loss_chunk=4)
  chunked = lambda x, w: losses.chunked_cross_entropy(x, w, cfg, targets, mask)[0]
  oracle = lambda x, w: losses.cross_entropy(jnp.einsum("BTD,DV->BTV", x, w), targets, mask)[0]
  (got, got_grads), (want, want_grads) = (jax.value_and_grad(f, (0, 1))(x, w) for f in (chunked, oracle))
  assert np.isfinite(float(got))
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  _assert_grads_close(*({"x": np.asarray(dx), "w": np.asarray(dw)} for dx, dw in (got_grads, want_grads)))


# Chunks per device: 1 row x at most 6 positions (4 chunks of 4: the fewest that divide T), 2 rows x 2
# positions of the 8 on each context device (4 chunks), 2 rows x 4 (2 chunks).
@pytest.mark.parametrize("tied, fsdp, cp, tensor, chunk", [(False, 4, 1, 2, 6), (True, 2, 2, 2, 4),
                                                         (False, 2, 2, 2, 8)])
def test_chunked_loss_sharded_equals_one_device(tied, fsdp, cp, tensor, chunk, capfd):
  """Over 8 fake devices (FSDP x tensor, and with context parallelism in its 2·CP-chunk row layout) the
  chunked loss, count and gradients equal the one-device oracle's; no resharding by replication.

  Gradients within 1e-6 of the tree's largest gradient, not of each leaf's: sharding reorders the model's
  own sums too, and the plain loss on the (2, 2, 2) mesh is itself 1.2e-6 of the largest attn_norm
  gradient off one device (a leaf ~1e-6 whose sum over tokens cancels), as much as the chunked one."""
  cfg, params, batch, (want_loss, want_tokens, want_grads) = _case(tied)
  cfg = dataclasses.replace(cfg, loss_chunk=chunk)
  mesh = sharding.make_mesh(fsdp=fsdp, context=cp, tensor=tensor)
  capfd.readouterr()
  loss, tokens, grads = _loss_and_grads(cfg, losses.pretrain_loss, params,
                                        context.context_batch(batch, cp) if cp > 1 else batch, mesh)
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
  assert tokens == want_tokens
  assert loss == pytest.approx(want_loss, rel=RTOL)
  _assert_grads_close(grads, want_grads, per_leaf=False)


@pytest.mark.parametrize("tied, fsdp, cp, tensor", [(False, 4, 1, 2), (True, 2, 2, 2)])
def test_chunks_reduce_the_output_weight_gradient_once(tied, fsdp, cp, tensor):
  """The output weight's gradient is a sum over every device's tokens: under FSDP (and context
  parallelism) the chunks add their parts up unreduced and the step reduces the sum once, so 4 chunks
  move the same gradient bytes as one; W is all-gathered over fsdp once, whatever the chunks, and
  nothing else is gathered (compiled only: the collectives in the HLO, times their runs; the loss and
  its gradient as the train step takes them, and the loss alone as evaluation does).
  Allowed: 1% — the loss and count scalars are reduced per chunk (4 bytes each)."""
  from jax.sharding import NamedSharding
  from llama_jax.training import aot
  b, t, d, v = 8, 32, 64, 512
  w_gathered = d * v * 4 // tensor  # W after its fsdp all-gather, still split over tensor

  mesh = sharding.make_mesh(fsdp=fsdp, context=cp, tensor=tensor)

  def collective_bytes(chunk, grad):
    cfg = dataclasses.replace(C.TINY_TIED if tied else C.TINY, vocab_size=v, dim=d, loss_chunk=chunk)
    with sharding.use(mesh, sharding.logical_rules(cfg, mesh)):
      spec = lambda *axes: NamedSharding(mesh, sharding.activation_spec(axes))
      x = jax.ShapeDtypeStruct((b, t, d), jnp.float32, sharding=spec("act_batch", "act_seq", "act_embed"))
      w = jax.ShapeDtypeStruct((v, d) if tied else (d, v), jnp.float32,
                               sharding=spec(*(("vocab", "embed") if tied else ("embed", "vocab"))))
      ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec("act_batch", "act_seq"))
      loss = lambda x, w, y, m: losses.chunked_cross_entropy(x, w, cfg, y, m)[0]
      f = jax.value_and_grad(loss, argnums=(0, 1)) if grad else loss
      text = jax.jit(f).lower(x, w, ids, ids).compile().as_text()
    found = aot.parse_collectives(text, mesh.size)
    total = lambda kinds: sum(c.bytes * c.runs for c in found if c.kind in kinds)
    return total(("reduce-scatter", "all-reduce")), total(("all-gather",)), total(("collective-permute",))

  # 8 rows x 32 positions: 2 x 32 tokens on a device of (4, 1, 2), 4 x 16 on one of (2, 2, 2); 16 tokens
  # per chunk on each: 4 chunks.
  for grad in (True, False):
    (one, gathered_one, moved_one), (four, gathered_four, moved_four) = (
        collective_bytes(b * t, grad), collective_bytes(16, grad))
    assert gathered_one == gathered_four == w_gathered, grad
    assert moved_one == moved_four == 0, grad
    if grad:
      assert one >= w_gathered  # the output weight's gradient is among the reductions
      assert four == pytest.approx(one, rel=0.01)


def test_chunked_loss_gradient_does_not_hold_the_logits():
  """Compiled only (abstract shapes, nothing runs): at V = 128,256 the gradient of the chunked loss needs
  less temporary memory than ONE fp32 [B, T, V] logits array, where the plain loss's needs several."""
  cfg = dataclasses.replace(C.TINY, vocab_size=C.LLAMA3_VOCAB, num_layers=1, loss_chunk=64)
  b, t = 1, 512
  model = transformer.Transformer(cfg)
  params = nn.unbox(P.abstract_params(cfg))  # ShapeDtypeStructs
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  batch = dict(inputs=tokens, targets=tokens, positions=tokens, segment_ids=tokens, loss_mask=tokens)

  def temp_bytes(loss_fn):
    grad_fn = jax.jit(jax.grad(lambda p, bt: loss_fn(model, p, bt)[0]))
    return grad_fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = b * t * cfg.vocab_size * 4
  chunked, plain = temp_bytes(losses.pretrain_loss), temp_bytes(losses.pretrain_loss_reference)
  assert chunked < logits_bytes < 2 * logits_bytes < plain, (chunked, plain, logits_bytes)


def test_loss_chunk_must_be_positive():
  with pytest.raises(C.ConfigError, match=r"ModelConfig.loss_chunk: must be a positive integer, got 0"):
    dataclasses.replace(C.TINY, loss_chunk=0)


@pytest.mark.parametrize("tied", [False, True])
def test_output_layer_matmuls_run_once_each(tied):
  """The loss's gradient costs the output layer's three matmuls (logits, d x, d W) and no recomputed
  logits; the loss alone (evaluation) costs one. Counted in the compiled HLO (profiling.hlo_ops: each
  instruction once, so one chunk's worth of the scan over chunks), with chunks and padding (T = 11,
  2 rows x 4 positions per chunk: 3 chunks of 4, 1 padded position)."""
  from llama_jax.training import profiling
  b, t, d, v = 2, 11, 8, 64
  cfg = dataclasses.replace(C.TINY, vocab_size=v, dim=d, loss_chunk=8, tie_embeddings=tied)
  x = jnp.ones((b, t, d))
  w = jnp.ones((v, d) if tied else (d, v))
  targets, mask = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), jnp.int32)
  loss = lambda x, w: losses.chunked_cross_entropy(x, w, cfg, targets, mask)[0]
  one = 2 * b * 4 * d * v  # one chunk of 4 positions

  def matmul_flops(f):
    ops = profiling.hlo_ops(jax.jit(f).lower(x, w).compile().as_text())
    return sum(op.flops for op in ops.values())

  assert matmul_flops(loss) == one
  assert matmul_flops(jax.value_and_grad(loss, argnums=(0, 1))) == 3 * one  # as the train step
