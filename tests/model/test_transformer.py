"""Model invariants and alternative paths (scan/unrolled, remat, sharded, attention impls)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config as C
from llama_jax.model import params as P
from llama_jax.parallel import sharding
from llama_jax.model.transformer import Transformer, rope_frequencies

CFG = dataclasses.replace(C.TINY, vocab_size=128)
B, T = 2, 16


def _mesh(shape=(1, 1, 1)):
  data, fsdp, tensor = shape
  return sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[: data * fsdp * tensor])


def _logits(config, params, tokens, positions=None, segment_ids=None, mesh=None):
  mesh = mesh or _mesh()
  with sharding.use(mesh, sharding.logical_rules(config, mesh)):
    f = jax.jit(lambda p, t, pos, seg: Transformer(config).apply({"params": p}, t, pos, seg))
    return np.asarray(f(params, tokens, positions, segment_ids))


@pytest.fixture(scope="module")
def params():
  return P.init_params(CFG, _mesh(), jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T)), jnp.int32)


def test_shapes_dtypes_finite(params, tokens):
  out = _logits(CFG, params, tokens)
  assert out.shape == (B, T, CFG.vocab_size) and out.dtype == np.float32
  assert np.isfinite(out).all()


def test_causal(params, tokens):
  """Changing token t changes no logit before t."""
  changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % CFG.vocab_size)
  a, b = _logits(CFG, params, tokens), _logits(CFG, params, changed)
  np.testing.assert_array_equal(a[:, :9], b[:, :9])
  assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-3


@pytest.mark.parametrize("restart_positions", [True, False])
def test_packed_documents_equal_documents_alone(params, restart_positions):
  rng = np.random.default_rng(1)
  lengths = [5, 7, 4]  # three documents, total T = 16
  docs = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in lengths]
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]).astype(np.int32)
  starts = np.cumsum([0] + lengths[:-1])
  pos = (np.concatenate([np.arange(n) for n in lengths]) if restart_positions
         else np.arange(T)).astype(np.int32)
  packed = _logits(CFG, params, np.concatenate(docs)[None], pos[None], seg[None])[0]
  for doc, start in zip(docs, starts):
    # Alone, padded to T (padding is later in the row, so causality hides it).
    row = np.zeros(T, np.int32)
    row[: len(doc)] = doc
    offset = 0 if restart_positions else start
    alone = _logits(CFG, params, row[None], (np.arange(T) + offset)[None].astype(np.int32))[0]
    np.testing.assert_allclose(packed[start:start + len(doc)], alone[: len(doc)], atol=1e-5, rtol=1e-5)


def _loss_and_grads(config, params, tokens, mesh=None):
  mesh = mesh or _mesh()

  def loss(p):
    logits = Transformer(config).apply({"params": p}, tokens)
    return jax.nn.log_softmax(logits)[..., 0].mean()

  with sharding.use(mesh, sharding.logical_rules(config, mesh)):
    out = jax.jit(jax.value_and_grad(loss))(params)
  return jax.tree.map(np.asarray, out)


def _assert_tree_close(a, b, tol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", [
    dict(scan_layers=not CFG.scan_layers), dict(remat_policy="full"), dict(remat_policy="dots_saveable"),
    dict(attention_impl="xla")], ids=["scan_vs_unrolled", "remat_full", "remat_dots", "attention_xla"])
def test_alternative_paths_equal_plain(params, tokens, variant):
  ref = _loss_and_grads(CFG, params, tokens)
  _assert_tree_close(_loss_and_grads(dataclasses.replace(CFG, **variant), params, tokens), ref)


def test_uneven_batch_over_the_mesh_is_an_error(params, tokens):
  """B=2 over data x fsdp = 4 would be padded by XLA (and gave wrong gradients): refuse it clearly."""
  with pytest.raises(C.ConfigError, match=r"batch size 2 does not divide over mesh axes \('data', 'fsdp'\)"):
    _logits(CFG, params, tokens, mesh=_mesh((2, 2, 2)))


def test_sharded_equals_single_device(params):
  mesh = _mesh((2, 2, 2))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (4, T)), jnp.int32)
  sharding.check_batch(tokens.shape[0], mesh)  # the batch must split over data x fsdp = 4
  sharded = jax.device_put(params, P.param_shardings(CFG, mesh))
  _assert_tree_close(_loss_and_grads(CFG, sharded, tokens, mesh), _loss_and_grads(CFG, params, tokens))


def test_init_lands_in_sharded_layout():
  mesh = _mesh((1, 4, 2))
  p = P.init_params(CFG, mesh, jax.random.key(0))
  spec = lambda x: tuple(x.sharding.spec)
  assert spec(p["layers"]["attn"]["wq"]) == (None, "fsdp", "tensor", None, None)
  assert spec(p["layers"]["mlp"]["w_down"]) == (None, "tensor", "fsdp")
  assert spec(p["embedding"]) == ("tensor", "fsdp")
  # Each device holds only its shard of a weight.
  w = p["layers"]["mlp"]["w_gate"]
  assert w.addressable_shards[0].data.shape == (CFG.num_layers, CFG.dim // 4, CFG.mlp_dim // 2)


def test_mqa_shards_query_groups_when_kv_heads_too_few():
  cfg = dataclasses.replace(CFG, num_kv_heads=1)
  mesh = _mesh((1, 4, 2))
  sh = P.param_shardings(cfg, mesh)
  assert tuple(sh["layers"]["attn"]["wq"].spec) == (None, "fsdp", None, "tensor", None)
  assert tuple(sh["layers"]["attn"]["wk"].spec) == (None, "fsdp", None, None)


# Published parameter counts (reference table; Meta's model cards).
PUBLISHED = {"llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496,
             "llama3.1-405b": 405_853_388_800, "llama3.2-1b": 1_235_814_400,
             "llama3.2-3b": 3_212_749_824, "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_param_counts_by_eval_shape(name):
  config = C.PRESETS[name]
  abstract = P.abstract_params(config)  # shapes only: nothing is allocated
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  assert P.count_params(abstract) == PUBLISHED[name] == config.param_count()


def test_rope_golden_values():
  """float32 inverse frequencies from the reference (Meta's apply_scaling)."""
  plain = rope_frequencies(128, 500_000.0, None)
  scaled = rope_frequencies(128, 500_000.0, C.RopeScaling(factor=8.0))
  for i, before, after in [(29, 2.616099082e-03, 2.166570630e-03), (32, 1.414213446e-03, 5.248460220e-04),
                           (35, 7.644970319e-04, 9.556212899e-05)]:
    np.testing.assert_allclose(plain[i], before, rtol=1e-7)
    np.testing.assert_allclose(scaled[i], after, rtol=1e-6)
  np.testing.assert_array_equal(scaled[:29], plain[:29])
  np.testing.assert_allclose(scaled[35:], plain[35:] / 8, rtol=1e-7)
  assert np.all((scaled[29:35] < plain[29:35]) & (scaled[29:35] > plain[29:35] / 8))
  small = rope_frequencies(64, 500_000.0, C.RopeScaling(factor=32.0))
  np.testing.assert_allclose(small[16], 4.295567051e-04, rtol=1e-6)


def test_bfloat16_compute_keeps_fp32_params_and_logits(params, tokens):
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  out = _logits(cfg, params, tokens)
  assert out.dtype == np.float32
  ref = _logits(CFG, params, tokens)
  assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_shape_annotations_are_checked():
  """The jaxtyping annotations of the public functions hold (and catch a wrong shape)."""
  from beartype import beartype
  from jaxtyping import TypeCheckError, jaxtyped

  from llama_jax.model.attention import MaskInfo, attention
  from llama_jax.model.transformer import apply_rope

  checked_attention = jaxtyped(typechecker=beartype)(attention)
  checked_rope = jaxtyped(typechecker=beartype)(apply_rope)
  q = jnp.ones((2, 5, 2, 3, 8))
  kv = jnp.ones((2, 5, 2, 8))
  mask = MaskInfo.self_attention(jnp.ones((2, 5), jnp.int32))
  assert checked_attention(q, kv, kv, mask).shape == q.shape
  assert checked_rope(kv, jnp.zeros((2, 5), jnp.int32), np.ones(4, np.float32)).shape == kv.shape
  with pytest.raises(TypeCheckError, match="typechecking parameter 'k_BSKH'"):
    checked_attention(q, jnp.ones((2, 5, 3, 8)), kv, mask)  # K disagrees


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_initial_loss_is_near_uniform(tied):
  """At init the logits are ~N(0, 1) (unit-RMS features, fan-in scaled output layer, tied or not), so the
  cross-entropy is ≈ ln V + 1/2 (E[logsumexp] of V unit Gaussians); a badly scaled output layer is far off."""
  cfg = dataclasses.replace(CFG, tie_embeddings=tied, dim=256, num_heads=8, num_kv_heads=4, head_dim=32)
  p = P.init_params(cfg, _mesh(), jax.random.key(1))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
  logp = jax.nn.log_softmax(_logits(cfg, p, tokens))
  ce = -float(np.take_along_axis(np.asarray(logp[:, :-1]), np.asarray(tokens[:, 1:, None]), -1).mean())
  assert abs(ce - (np.log(cfg.vocab_size) + 0.5)) < 0.3, ce


def _final_weights_f64(config, params):
  """The output layer as the bf16 model sees it (rounded to bf16), in float64, [D, V]."""
  w = params["embedding"].T if config.tie_embeddings else params["lm_head"]
  return np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bf16_model_output_logits_are_fp32(params, tokens, tied):
  """With bf16 compute the output projection accumulates and returns fp32: logits equal the float64
  product of the same bf16 final hidden state and bf16 weights to fp32 accuracy (a bf16 result would be
  off by its rounding, ~2^-9 ≈ 2e-3 of the logit)."""
  cfg = dataclasses.replace(CFG, dtype="bfloat16", tie_embeddings=tied)
  p = P.init_params(cfg, _mesh(), jax.random.key(2)) if tied else params
  mesh = _mesh()
  with sharding.use(mesh, sharding.logical_rules(cfg, mesh)):
    f = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, return_hidden=True))
    hidden = f(p, tokens)
  assert hidden.dtype == jnp.bfloat16
  ref = np.asarray(hidden.astype(jnp.float32), np.float64) @ _final_weights_f64(cfg, p)
  out = _logits(cfg, p, tokens)
  assert out.dtype == np.float32
  # fp32 accumulation over D = 64 products: a few ulps of the largest logit.
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_bf16_attention_logits_are_fp32():
  """bf16 q, k with logits of size ~100 that differ by ~1: the attention weights must come from
  fp32 logits. Reference: float64 softmax attention on the same bf16 inputs; the output is bf16, so the
  tolerance is a few bf16 roundings (of the weights and the output) of max|v|: 1e-2."""
  from llama_jax.model.attention import MaskInfo, attention

  rng = np.random.default_rng(7)
  b, t, k, g, h = 1, 8, 1, 2, 16
  q = (rng.standard_normal((b, t, k, g, h)) * 10).astype(np.float32)
  # Every key shares a large component: logits of a row are all ~100 and differ by ~1, the regime where
  # rounding the logits to bf16 (spacing 0.5 at 100) reorders the attention weights.
  kk = (rng.standard_normal((1, 1, k, h)) * 10 + rng.standard_normal((b, t, k, h)) * 0.3).astype(np.float32)
  v = rng.standard_normal((b, t, k, h)).astype(np.float32)
  q, kk, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, kk, v))
  q64, k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, kk, v))
  logits = np.einsum("BTKGH,BSKH->BKGTS", q64, k64) / np.sqrt(h)
  causal = np.tril(np.ones((t, t), bool))
  logits = np.where(causal, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ref = np.einsum("BKGTS,BSKH->BTKGH", probs, v64)
  for impl in ("einsum", "xla"):
    out = attention(q, kk, v, MaskInfo.self_attention(), impl)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=0, atol=1e-2 * np.abs(v64).max(),
                               err_msg=impl)


def _attention_f64(q, k, v, allowed_BTS):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("BTKGH,BSKH->BKGTS", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(allowed_BTS[:, None, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("BKGTS,BSKH->BTKGH", probs / probs.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_attention_derives_its_mask_from_the_description(impl):
  """Segments + causality by index in the row, against float64 NumPy with the mask written out; and a
  query block at an offset in the row (as a KV cache or a context-parallel shard would pass it) equals
  those rows of the full attention."""
  from llama_jax.model.attention import MaskInfo, attention

  rng = np.random.default_rng(11)
  b, t, k, g, h = 2, 12, 2, 2, 8
  q = rng.standard_normal((b, t, k, g, h)).astype(np.float32)
  kk, v = (rng.standard_normal((b, t, k, h)).astype(np.float32) for _ in range(2))
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], np.int32)
  idx = np.arange(t)
  allowed = (idx[None, None, :] <= idx[None, :, None]) & (seg[:, :, None] == seg[:, None, :])
  full = attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), MaskInfo.self_attention(jnp.asarray(seg)),
                   impl)
  np.testing.assert_allclose(np.asarray(full), _attention_f64(q, kk, v, allowed), atol=1e-6, rtol=1e-6)
  # Queries 8..11 only (keys: the whole row), their indices telling where they sit.
  tail = MaskInfo(q_segment_BT=jnp.asarray(seg[:, 8:]), kv_segment_BS=jnp.asarray(seg),
                  q_index_BT=jnp.asarray(np.broadcast_to(idx[8:], (b, 4))),
                  kv_index_BS=jnp.asarray(np.broadcast_to(idx, (b, t))))
  part = attention(jnp.asarray(q[:, 8:]), jnp.asarray(kk), jnp.asarray(v), tail, impl)
  np.testing.assert_allclose(np.asarray(part), np.asarray(full)[:, 8:], atol=1e-6, rtol=1e-6)
  # Not causal: every token of the same segment.
  both = attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v),
                   MaskInfo.self_attention(jnp.asarray(seg), causal=False), impl)
  np.testing.assert_allclose(np.asarray(both), _attention_f64(q, kk, v, seg[:, :, None] == seg[:, None, :]),
                             atol=1e-6, rtol=1e-6)


def test_block_passes_the_cache_slot_through(params):
  """Block and Attention take and return a cache beside the activations: None passes through; a KV
  cache (llama_jax/model/cache.py) comes back with the block's keys/values written, the output unchanged."""
  from llama_jax.model.attention import MaskInfo
  from llama_jax.model.transformer import Block

  layer0 = jax.tree.map(lambda x: x[0], params["layers"])
  x = jnp.asarray(np.random.default_rng(4).standard_normal((B, T, CFG.dim)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  out, cache = Block(CFG).apply({"params": layer0}, x, pos, MaskInfo.self_attention(), None)
  assert cache is None and out.shape == x.shape
  empty = jnp.zeros((B, T + 3, CFG.num_kv_heads, CFG.head_dim), jnp.float32)
  cached, (k, v) = Block(CFG).apply({"params": layer0}, x, pos, MaskInfo(q_index_BT=pos), (empty, empty))
  np.testing.assert_allclose(cached, out, atol=1e-5, rtol=0)
  for c in (k, v):
    assert c.shape == empty.shape and np.all(np.asarray(c)[:, T:] == 0) and np.all(np.asarray(c)[:, :T] != 0)
