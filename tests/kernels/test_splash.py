"""Splash attention (Pallas, here in interpret mode on CPU) equals the einsum oracle within 1e-5 in fp32:
causal, packed documents with padding, GQA, MQA, non-causal; gradients; the whole Transformer, sharded;
and it refuses what it cannot express (row indices) with the flag to change."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config as C
from llama_jax.errors import ConfigError
from llama_jax.kernels import splash
from llama_jax.model import params as P
from llama_jax.model.attention import MaskInfo, attention
from llama_jax.model.transformer import Transformer
from llama_jax.parallel import sharding

TOL = 1e-5  # fp32: the same terms, summed in another order (and q scaled before the product)
BLOCK = 128  # the kernel's smallest block (the TPU lane width)
CFG = dataclasses.replace(C.TINY, vocab_size=128, attention_block_size=BLOCK)


def _qkv(rng, b, t, k, g, h=16):
  q = rng.standard_normal((b, t, k, g, h)).astype(np.float32)
  kk, v = (rng.standard_normal((b, t, k, h)).astype(np.float32) for _ in range(2))
  return q, kk, v


def _packed(b, t, lengths):
  """Each row: documents of these lengths (ids 1, 2, ...), then padding (id 0) to t."""
  row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(t - sum(lengths))])
  return np.broadcast_to(row, (b, t)).astype(np.int32).copy()


def _run(impl, q, kk, v, info, w=None):
  """The output, and with `w` the gradients (q, k, v) of <out, w> too; one compile."""
  if w is None:
    return [np.asarray(jax.jit(lambda q, kk, v: attention(q, kk, v, info, impl, BLOCK))(q, kk, v))]

  def f(q, kk, v):
    out = attention(q, kk, v, info, impl, BLOCK)
    return (out * w).sum(), out

  (_, out), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, kk, v)
  return [np.asarray(out)] + [np.asarray(x) for x in grads]


# (t, heads k x g, causal, documents): MHA / GQA (N=4, K=2) / MQA; two blocks of 128; documents that
# straddle the block boundary, then padding (id 0).
CASES = {
    "causal_gqa": (256, (2, 2), True, None),
    "documents_gqa": (256, (2, 2), True, [100, 90, 40]),
    "documents_mqa": (256, (1, 4), True, [130, 100]),
    "documents_mha_noncausal": (256, (4, 1), False, [60, 150]),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_oracle(case):
  t, (k, g), causal, lengths = CASES[case]
  q, kk, v = _qkv(np.random.default_rng(0), 2, t, k, g)
  seg = None if lengths is None else jnp.asarray(_packed(2, t, lengths))
  info = MaskInfo.self_attention(seg, causal)
  np.testing.assert_allclose(_run("splash", q, kk, v, info)[0], _run("einsum", q, kk, v, info)[0],
                             atol=TOL, rtol=TOL)


def test_gradients_equal_oracle():
  """The kernel's custom VJP (its dq and dkv kernels, interpreted): packed documents, GQA."""
  q, kk, v = _qkv(np.random.default_rng(1), 1, 256, 2, 2)
  info = MaskInfo.self_attention(jnp.asarray(_packed(1, 256, [100, 90, 40])))
  w = np.random.default_rng(99).standard_normal(q.shape).astype(np.float32)
  got, want = _run("splash", q, kk, v, info, w), _run("einsum", q, kk, v, info, w)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL, err_msg=name)


def test_refuses_row_indices_and_short_blocks():
  """The context-parallel layout (row indices) and lengths off the 128 grid: one-line errors naming the
  flag, not wrong results."""
  q, kk, v = _qkv(np.random.default_rng(2), 1, 128, 1, 2)
  idx = jnp.asarray(np.arange(128)[None].astype(np.int32))
  with pytest.raises(ConfigError, match=r"--attention_impl=splash: it takes a static causal mask, not row "
                                        r"indices .* use --attention_impl=blockwise"):
    splash.splash_attention(q, kk, v, MaskInfo.self_attention(row_index_BT=idx))
  with pytest.raises(ConfigError, match=r"--attention_impl=splash: it needs lengths that are multiples of "
                                        r"128, got 64 queries x 64 keys"):
    splash.splash_attention(q[:, :64], kk[:, :64], v[:, :64], MaskInfo.self_attention())
  with pytest.raises(ConfigError, match=r"attention_block_size=64 and the query length 128 give blocks of "
                                        r"64, not a multiple of 128 \(set attention_block_size to a multiple of 128\)"):
    splash.splash_attention(q, kk, v, MaskInfo.self_attention(), block_size=64)
  # The sequence split over `context` (the model's layout under --mesh_context=2): each device would see
  # a slice of the row under a causal mask that starts at 0.
  mesh = sharding.make_mesh(data=1, fsdp=4, context=2, devices=jax.devices()[:8])
  with sharding.use(mesh, sharding.logical_rules(CFG, mesh)):
    with pytest.raises(ConfigError, match=r"--attention_impl=splash: the sequence is split over the mesh "
                                          r"\(--mesh_context > 1\); use --attention_impl=blockwise\."):
      jax.eval_shape(lambda q, kk, v: splash.splash_attention(q, kk, v, MaskInfo.self_attention()), q, kk, v)


def test_transformer_splash_equals_einsum():
  """The tiny model (N=4, K=2) with attention_impl='splash', sharded over data x fsdp x tensor = 2x2x2
  (the kernel in a shard_map over batch and KV heads): logits and the loss's parameter gradients equal
  the einsum model's within 1e-5 on packed documents with padding."""
  b, t = 4, 128
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
  params = P.init_params(CFG, mesh, jax.random.key(0))
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, t + 1)), jnp.int32)
  seg = jnp.asarray(_packed(b, t, [50, 40, 30]))

  def logits_and_grads(cfg):
    def loss(p):
      logits = Transformer(cfg).apply({"params": p}, tokens[:, :-1], None, seg)
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
      return -(logp * (seg > 0)).sum() / (seg > 0).sum(), logits

    with sharding.use(mesh, sharding.logical_rules(cfg, mesh)):
      return jax.tree.map(np.asarray, jax.jit(jax.value_and_grad(loss, has_aux=True))(params))

  got = logits_and_grads(dataclasses.replace(CFG, attention_impl="splash"))
  want = logits_and_grads(dataclasses.replace(CFG, attention_impl="einsum"))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)
