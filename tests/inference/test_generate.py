"""KV-cache generation against the cache-free sampler (the oracle) and float64 NumPy sampling filters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import config as C
from llama_jax.errors import ConfigError
from llama_jax.inference import generate as G
from llama_jax.inference import sample
from llama_jax.model import cache as kv_cache, factory, params as P
from llama_jax.parallel import sharding

CFG = C.TINY
# Different lengths: right padding, per-row decode positions; 3 rows also pad the batch on a 4-way mesh.
PROMPTS = [[1, 5, 9], [1, 7, 8, 9, 10, 11, 12], [1]]
NEW = 12
NUCLEUS = dict(temperature=0.8, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def params():
  mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  return P.init_params(CFG, mesh, jax.random.key(0))


@pytest.fixture(scope="module")
def oracle_greedy(params):
  return sample.generate(CFG, params, PROMPTS, NEW)


def test_prefill_and_decode_logits_equal_the_full_forward(params):
  apply = jax.jit(factory.make_model(CFG).apply)
  tokens_BT = jnp.array([[1, 5, 9, 3, 4, 6], [1, 7, 8, 9, 10, 11]], jnp.int32)
  full_BTV = apply({"params": params}, tokens_BT)
  # Prefill the first 4 tokens into a cache of 8 slots, then decode tokens 4 and 5 one at a time.
  cache = kv_cache.init(CFG, 2, 8)
  prefill_BTV, cache = apply({"params": params}, tokens_BT[:, :4], cache=cache)
  np.testing.assert_allclose(prefill_BTV, full_BTV[:, :4], atol=1e-5, rtol=0)
  for t in (4, 5):
    step_BTV, cache = apply({"params": params}, tokens_BT[:, t:t + 1], row_index_BT=jnp.full((2, 1), t),
                            cache=cache)
    np.testing.assert_allclose(step_BTV[:, 0], full_BTV[:, t], atol=1e-5, rtol=0)
  # The cache holds exactly the 6 positions written; the rest are still zero.
  k_LBSKH = np.asarray(cache[0])
  assert np.all(k_LBSKH[:, :, 6:] == 0) and np.all(np.abs(k_LBSKH[:, :, :6]).sum(-1) > 0)


@pytest.mark.parametrize("over", [{}, dict(scan_layers=False), dict(attention_impl="blockwise",
                                                                    attention_block_size=4)],
                         ids=["scan", "unrolled", "blockwise"])
def test_cached_greedy_equals_cache_free(params, oracle_greedy, over):
  cfg = dataclasses.replace(CFG, **over)
  assert G.generate(cfg, params, PROMPTS, NEW) == oracle_greedy


def test_cached_nucleus_sampling_equals_cache_free(params, oracle_greedy):
  rng = jax.random.key(3)
  ours = G.generate(CFG, params, PROMPTS, NEW, rng=rng, **NUCLEUS)
  assert ours == sample.generate(CFG, params, PROMPTS, NEW, rng=rng, **NUCLEUS)
  assert ours != oracle_greedy  # it did sample


def test_sharded_equals_single_device(params):
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  sharded = P.init_params(CFG, mesh, jax.random.key(0))
  rng = jax.random.key(3)
  assert (G.generate(CFG, sharded, PROMPTS, NEW, rng=rng, mesh=mesh, **NUCLEUS)
          == G.generate(CFG, params, PROMPTS, NEW, rng=rng, **NUCLEUS))
  with sharding.use(mesh, sharding.logical_rules(CFG, mesh)):
    k_LBSKH, _ = jax.jit(lambda: kv_cache.init(CFG, 4, 16))()
  want = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None, "tensor", None))
  assert k_LBSKH.sharding.is_equivalent_to(want, k_LBSKH.ndim)


def test_stop_tokens_end_each_row(params, oracle_greedy):
  # A stop set that ends every row early (each row's token at step 2..4), at its first stop token.
  stops = {oracle_greedy[0][3], oracle_greedy[1][2], oracle_greedy[2][4]}
  first = [min(i for i, t in enumerate(row) if t in stops) for row in oracle_greedy]
  new_BE, steps = G.generate_tokens(CFG, params, PROMPTS, NEW, stop_ids=tuple(stops))
  for row, ref, f in zip(new_BE.tolist(), oracle_greedy, first):
    assert row[: f + 1] == ref[: f + 1] and row[f + 1:] == [0] * (NEW - f - 1)  # then pad_id
  assert steps == max(first) + 1 < NEW  # the loop ended when the last row stopped
  assert G.generate(CFG, params, PROMPTS, NEW, stop_ids=tuple(stops)) == [
      ref[:f] for ref, f in zip(oracle_greedy, first)]


def _reference_probs(logits, temperature, top_k, top_p):
  """The filtered softmax in float64: top k (ties kept), then the smallest prefix reaching top_p."""
  z = logits.astype(np.float64) / temperature
  keep = np.ones_like(z, bool)
  if top_k:
    keep &= z >= np.sort(z, axis=-1)[:, -top_k:][:, :1]
  for b in range(z.shape[0]):
    order = np.argsort(-z[b], kind="stable")
    order = order[keep[b, order]]
    p = np.exp(z[b, order] - z[b, order].max())
    p /= p.sum()
    n = int(np.sum(np.cumsum(p) - p < top_p))
    keep[b] = z[b] >= z[b, order[n - 1]]
  p = np.where(keep, np.exp(z - z.max(-1, keepdims=True)), 0)
  return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (10, 1.0), (0, 0.9), (10, 0.5), (3, 0.99)])
def test_filters_equal_float64_reference(top_k, top_p):
  logits = np.random.default_rng(0).normal(0, 2, (4, 50)).astype(np.float32)
  logits[1, :5] = logits[1, 5]  # a tie, kept whole at a boundary
  probs = jax.nn.softmax(sample.filter_logits(jnp.asarray(logits), 0.7, top_k, top_p), axis=-1)
  ref = _reference_probs(logits, 0.7, top_k, top_p)
  assert np.array_equal(np.asarray(probs) > 0, ref > 0)
  np.testing.assert_allclose(probs, ref, atol=1e-6, rtol=0)


def test_draws_follow_the_filtered_softmax():
  logits = np.random.default_rng(1).normal(0, 1, (1, 20)).astype(np.float32)
  n = 20_000
  draws = sample.next_token(jax.random.key(0), jnp.broadcast_to(jnp.asarray(logits), (n, 20)), 0.8, 0, 0.8)
  freq = np.bincount(np.asarray(draws), minlength=20) / n
  ref = _reference_probs(logits, 0.8, 0, 0.8)[0]
  assert np.all(freq[ref == 0] == 0)
  # 5 standard deviations of a frequency out of 20,000 draws.
  np.testing.assert_array_less(np.abs(freq - ref), 5 * np.sqrt(ref * (1 - ref) / n) + 1e-12)


def test_bad_settings_are_config_errors(params):
  with pytest.raises(ConfigError, match="--top_p=0"):
    G.generate(CFG, params, PROMPTS, NEW, temperature=1.0, top_p=0.0)
  with pytest.raises(ConfigError, match="max_seq_len"):
    G.generate(CFG, params, PROMPTS, CFG.max_seq_len)
  with pytest.raises(ConfigError, match="at least 1 token"):
    G.generate(CFG, params, PROMPTS, 0)
  with pytest.raises(ConfigError, match="--mesh_context=2"):
    G.generate(CFG, params, PROMPTS, NEW, mesh=sharding.make_mesh(fsdp=4, context=2))


def test_per_row_keys_make_each_row_independent_of_the_batch(params):
  # One key per prompt: each row's draws equal that prompt generated alone with its key, in any batch.
  keys = jax.random.split(jax.random.key(7), len(PROMPTS))
  batched = G.generate(CFG, params, PROMPTS, NEW, rng=keys, **NUCLEUS)
  alone = [G.generate(CFG, params, [p], NEW, rng=keys[i:i + 1], **NUCLEUS)[0] for i, p in enumerate(PROMPTS)]
  assert batched == alone
  rev = G.generate(CFG, params, PROMPTS[::-1], NEW, rng=keys[::-1], **NUCLEUS)
  assert rev[::-1] == batched
  mesh = sharding.make_mesh(fsdp=4, tensor=2)  # 3 rows padded to 4: the padding row gets a key too
  sharded = P.init_params(CFG, mesh, jax.random.key(0))
  assert G.generate(CFG, sharded, PROMPTS, NEW, rng=keys, mesh=mesh, **NUCLEUS) == batched
  with pytest.raises(ConfigError, match="2 keys for 3 prompts"):
    G.generate(CFG, params, PROMPTS, NEW, rng=keys[:2], **NUCLEUS)
