"""Blockwise attention equals the einsum oracle (forward and gradients, fp32, 1e-5), skips fully masked
blocks, never holds a [B, T, S] array, and serves the whole Transformer."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config as C
from llama_jax.kernels import blockwise
from llama_jax.model import params as P
from llama_jax.model.attention import MaskInfo, attention
from llama_jax.model.transformer import Transformer
from llama_jax.parallel import sharding

BLOCK = 16
TOL = 1e-5  # fp32: both sum the same terms in a different order


def _qkv(rng, b, t, s, k, g, h=8):
  q = rng.standard_normal((b, t, k, g, h)).astype(np.float32)
  kk, v = (rng.standard_normal((b, s, k, h)).astype(np.float32) for _ in range(2))
  return q, kk, v


def _value_and_grads(impl, q, kk, v, info, w):
  """The output, and the gradients (q, k, v) of the scalar <out, w> (w random: every output counts);
  one compile."""
  def f(q, kk, v):
    out = attention(q, kk, v, info, impl, BLOCK)
    return (out * w).sum(), out

  (_, out), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, kk, v)
  return [np.asarray(out)] + [np.asarray(x) for x in grads]


def _assert_equal_to_oracle(q, kk, v, info):
  w = np.random.default_rng(99).standard_normal(q.shape).astype(np.float32)
  got = _value_and_grads("blockwise", q, kk, v, info, w)
  want = _value_and_grads("einsum", q, kk, v, info, w)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL, err_msg=name)


def _packed(b, t, lengths):
  """Each row: documents of these lengths (ids 1, 2, ...), then padding (id 0) to t."""
  row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(t - sum(lengths))])
  return np.broadcast_to(row, (b, t)).astype(np.int32).copy()


# (t, heads k x g, causal, segments): MHA / GQA / MQA; a length that is a multiple of the block (64) and
# two that are not (40, 37); packed documents with padding 0, on no block boundary. (The two tests
# below add GQA at 19 queries x 45 keys and the permuted layout at 64.)
CASES = {
    "causal_mha_64": (64, (4, 1), True, None),
    "documents_gqa_40": (40, (2, 2), True, [13, 20]),
    "noncausal_documents_mqa_37": (37, (1, 4), False, [10, 22]),
}


@pytest.mark.parametrize("case", CASES)
def test_equals_oracle(case):
  t, (k, g), causal, lengths = CASES[case]
  q, kk, v = _qkv(np.random.default_rng(0), 2, t, t, k, g)
  seg = None if lengths is None else jnp.asarray(_packed(2, t, lengths))
  _assert_equal_to_oracle(q, kk, v, MaskInfo.self_attention(seg, causal))


def test_queries_at_an_offset_equal_oracle():
  """Fewer queries than keys, their row indices saying where they sit (as a KV cache passes them)."""
  t, s = 19, 45
  q, kk, v = _qkv(np.random.default_rng(1), 2, t, s, 2, 2)
  seg = _packed(2, s, [20, 21])
  info = MaskInfo(q_segment_BT=jnp.asarray(seg[:, s - t:]), kv_segment_BS=jnp.asarray(seg),
                  q_index_BT=jnp.asarray(np.broadcast_to(np.arange(s - t, s), (2, t))))
  _assert_equal_to_oracle(q, kk, v, info)


def _context_parallel_order(t, cp):
  """The row cut into 2·cp chunks, rank i holding chunks i and 2·cp−1−i (the paper's balanced layout)."""
  chunks = np.arange(t).reshape(2 * cp, t // (2 * cp))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * cp - 1 - i]]) for i in range(cp)])


def test_permuted_row_layout_equals_oracle_on_the_row():
  """Queries, keys, segments and row indices in the context-parallel order: the output, un-permuted,
  equals the oracle on the row in its natural order, and so do the gradients; documents straddle chunk
  boundaries (chunks of 8, documents 13 + 30 + 11 + padding)."""
  t = 64
  order = _context_parallel_order(t, cp=4)
  inverse = np.argsort(order)
  q, kk, v = _qkv(np.random.default_rng(2), 2, t, t, 2, 2)
  seg = _packed(2, t, [13, 30, 11])
  idx = np.broadcast_to(order, (2, t)).astype(np.int32)
  permuted = MaskInfo(q_segment_BT=jnp.asarray(seg[:, order]), kv_segment_BS=jnp.asarray(seg[:, order]),
                      q_index_BT=jnp.asarray(idx), kv_index_BS=jnp.asarray(idx))
  w = np.random.default_rng(99).standard_normal(q.shape).astype(np.float32)
  got = _value_and_grads("blockwise", q[:, order], kk[:, order], v[:, order], permuted, w[:, order])
  want = _value_and_grads("einsum", q, kk, v, MaskInfo.self_attention(jnp.asarray(seg)), w)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a[:, inverse], b, atol=TOL, rtol=TOL, err_msg=name)


def _visit(t, seg=None, index=None, causal=True):
  b = 1
  info = MaskInfo(q_segment_BT=seg, kv_segment_BS=seg, q_index_BT=index, kv_index_BS=index, causal=causal)
  q_index, kv_index = info.indices(b, t, t)
  m = dict(q_index_IBt=blockwise._blocks(q_index, t // BLOCK), kv_index_JBs=blockwise._blocks(kv_index, t // BLOCK),
           kv_valid_Js=jnp.ones((t // BLOCK, BLOCK), bool))
  if seg is not None:
    m["q_segment_IBt"] = m["kv_segment_JBs"] = blockwise._blocks(seg, t // BLOCK)
  return np.asarray(blockwise._visit_IJ(m, causal))


def test_fully_masked_blocks_are_skipped():
  """Causal: only blocks on and below the diagonal run; documents of one block each: only the diagonal;
  in the context-parallel order the same pairs run, wherever they landed."""
  np.testing.assert_array_equal(_visit(64), np.tril(np.ones((4, 4), bool)))
  seg = jnp.asarray(np.repeat(np.arange(1, 5), BLOCK)[None].astype(np.int32))
  np.testing.assert_array_equal(_visit(64, seg), np.eye(4, dtype=bool))
  np.testing.assert_array_equal(_visit(64, seg, causal=False), np.eye(4, dtype=bool))
  # Chunks of 16 in the order 0, 3, 1, 2 (cp = 2): block pair (i, j) is the natural pair (o[i], o[j]).
  o = np.array([0, 3, 1, 2])
  idx = jnp.asarray(_context_parallel_order(64, cp=2)[None].astype(np.int32))
  np.testing.assert_array_equal(_visit(64, index=idx), np.tril(np.ones((4, 4), bool))[o][:, o])


def _largest_intermediate(fn, *args):
  sizes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return max(sizes)


def test_no_array_grows_with_t_times_s():
  """Forward and backward hold no intermediate of B·T·S elements or more (the oracle's scores are
  B·N·T·S): per block pair [B, N, t, s] only."""
  b, t, k, g = 2, 64, 2, 2
  q, kk, v = _qkv(np.random.default_rng(3), b, t, t, k, g)
  info = MaskInfo.self_attention(jnp.asarray(_packed(b, t, [30, 30])))
  loss = lambda impl: jax.grad(lambda q, kk, v: attention(q, kk, v, info, impl, BLOCK).sum(), (0, 1, 2))
  assert _largest_intermediate(loss("blockwise"), q, kk, v) < b * t * t
  assert _largest_intermediate(loss("einsum"), q, kk, v) >= b * k * g * t * t  # the check can fail


CFG = dataclasses.replace(C.TINY, vocab_size=128, attention_block_size=BLOCK)


def test_no_array_grows_with_t_times_s_inside_a_scan():
  """The same inside a `lax.scan` (as the Transformer's layers run): q the carry, keys, values and the
  mask description closed over. Scan's linearization hoists loop-invariant work out of the loop by
  partially evaluating its body; it must not split the kernel's block loops and stack each block pair's
  k/v slices and [t, s] mask over all I×J pairs."""
  b, t, k, g = 2, 128, 2, 2  # two layers' saved q, k, v, out: 2·B·T·N·H = B·T·S / 2
  q, kk, v = _qkv(np.random.default_rng(3), b, t, t, k, g)
  info = MaskInfo.self_attention(jnp.asarray(_packed(b, t, [60, 60])))

  def loss(q):
    body = lambda c, _: (attention(c, kk, v, info, "blockwise", BLOCK), None)
    return jax.lax.scan(body, q, None, length=2)[0].sum()

  assert _largest_intermediate(jax.grad(loss), q) < b * t * t


def test_transformer_gradient_has_no_t_times_s_array():
  """The tiny Transformer's loss gradient (layers in nn.scan) with attention_impl='blockwise', with and
  without remat: no intermediate of B·T·S elements (T·S = 2^18 here; the largest linear ones, the two
  layers' saved MLP activations, are L·B·T·F = B·T·S / 2)."""
  b, t = 1, 512
  tokens = jnp.zeros((b, t + 1), jnp.int32)
  seg = jnp.ones((b, t), jnp.int32)
  for remat in ("none", "full"):
    cfg = dataclasses.replace(CFG, attention_impl="blockwise", remat_policy=remat)
    model = Transformer(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens[:, :-1])["params"])

    def loss(p):
      logits = model.apply({"params": p}, tokens[:, :-1], None, seg)
      return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1).sum()

    assert _largest_intermediate(jax.grad(loss), params) < b * t * t, remat


def test_transformer_blockwise_equals_einsum():
  """The tiny model with attention_impl='blockwise', sharded over data x fsdp x tensor = 2x2x2: loss and
  parameter gradients equal the einsum model's within 1e-5, on packed documents with padding at a length
  that is not a multiple of the block."""
  b, t = 4, 40
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
  params = P.init_params(CFG, mesh, jax.random.key(0))
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, t + 1)), jnp.int32)
  seg = jnp.asarray(_packed(b, t, [9, 20, 6]))

  def loss_and_grads(cfg):
    def loss(p):
      logits = Transformer(cfg).apply({"params": p}, tokens[:, :-1], None, seg)
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
      return -(logp * (seg > 0)).sum() / (seg > 0).sum()

    with sharding.use(mesh, sharding.logical_rules(cfg, mesh)):
      return jax.tree.map(np.asarray, jax.jit(jax.value_and_grad(loss))(params))

  got = loss_and_grads(dataclasses.replace(CFG, attention_impl="blockwise"))
  want = loss_and_grads(CFG)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)


def test_block_size_is_validated():
  with pytest.raises(C.ConfigError, match=r"ModelConfig.attention_block_size: must be a positive integer"):
    dataclasses.replace(CFG, attention_block_size=0)
