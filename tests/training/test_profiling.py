"""llama_jax/training/profiling.py: the compiled HLO's ops by category with their matmul FLOPs (checked
against the shapes' 2·M·N·K), and a real profiler trace joined with them."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax.training import profiling


def _compiled_text(f, *args):
  return jax.jit(f).lower(*args).compile().as_text()


def test_categories_and_matmul_flops():
  m, k, n = 64, 48, 80
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  # A matmul, a reduction of its result, a transposing copy, a pure elementwise op: kept apart by
  # returning each (XLA would fuse the cheap ones into each other otherwise).
  ops = profiling.hlo_ops(_compiled_text(
      lambda a, b: (a @ b, jnp.sum(jnp.exp(a), axis=0), jnp.transpose(a).copy() + 0, jnp.tanh(b) * 3), a, b))
  by_cat = {}
  for op in ops.values():
    by_cat.setdefault(op.category, []).append(op)
  assert [op.flops for op in by_cat["matmul"]] == [2 * m * k * n]
  assert "reduction" in by_cat and "elementwise" in by_cat and "copy/transpose" in by_cat
  assert all(op.flops == 0 for cat, lst in by_cat.items() if cat != "matmul" for op in lst)
  assert by_cat["matmul"][0].out_bytes == m * n * 4


def test_batched_and_multi_contracting_flops():
  # [B, M, K1, K2] x [B, K1, K2, N]: FLOPs 2 · B·M·N · K1·K2.
  x, y = jnp.ones((3, 5, 4, 6)), jnp.ones((3, 4, 6, 7))
  ops = profiling.hlo_ops(_compiled_text(lambda x, y: jnp.einsum("bmij,bijn->bmn", x, y), x, y))
  assert sum(op.flops for op in ops.values()) == 2 * 3 * 5 * 7 * 4 * 6


def test_collectives_are_their_own_category():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
  a = jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("x")))
  f = lambda a: jnp.sum(a @ a.T)  # rows split: the contraction over rows needs the other shards
  ops = profiling.hlo_ops(jax.jit(f, out_shardings=NamedSharding(mesh, P())).lower(a).compile().as_text())
  assert any(op.category == "collective" for op in ops.values()), ops


def test_breakdown_of_a_real_trace(tmp_path):
  """A traced run of a jitted matmul in a loop: the events carry the HLO names, each iteration counts."""
  w = jnp.asarray(np.random.default_rng(0).standard_normal((128, 128)), jnp.float32)

  def f(w):
    return jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x @ w), w)

  compiled = jax.jit(f).lower(w).compile()
  ops = profiling.hlo_ops(compiled.as_text())
  compiled(w).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      compiled(w).block_until_ready()
  path = glob.glob(os.path.join(tmp_path, "**", "*.xplane.pb"), recursive=True)[0]
  profile = jax.profiler.ProfileData.from_file(path)
  events = list(profiling.trace_events(profile))
  cats, matmuls, _ = profiling.breakdown(ops, events, steps=2)
  wall = profiling.wall_breakdown(ops, profiling.trace_spans(profile), steps=2)
  assert wall.by_category["matmul"] > 0 and wall.span >= wall.by_category["matmul"]
  assert sum(wall.by_category.values()) + wall.idle == pytest.approx(wall.span, rel=1e-9)
  assert cats["matmul"].events == 3  # per step: once per loop iteration
  assert cats["matmul"].flops == 3 * 2 * 128**3
  assert cats["matmul"].seconds > 0
  assert sum(r.events for r in matmuls.values()) == 3


def test_wall_breakdown_splits_overlapping_ops_and_counts_idle_time():
  """Hand-made spans (ns): a matmul [0, 10), a copy [5, 15) under it, nothing [15, 20), the matmul
  again [20, 30), over 2 steps. Overlap is shared half and half; the gap is idle; all of it is the span."""
  ops = {"dot.1": profiling.Op("matmul", 10, 4, "mlp"), "copy.2": profiling.Op("copy/transpose", 0, 4, "attn")}
  spans = [("dot.1", 0, 10), ("copy.2", 5, 15), ("dot.1", 20, 30), ("unknown-event", 0, 100)]
  wall = profiling.wall_breakdown(ops, spans, steps=2)
  ns = lambda x: pytest.approx(x * 1e-9 / 2, rel=1e-12)  # per step, in seconds (float rounding only)
  assert (wall.span, wall.idle) == (ns(30), ns(5))
  assert wall.by_category["matmul"] == ns(5 + 2.5 + 10)
  assert wall.by_category["copy/transpose"] == ns(2.5 + 5)
  assert wall.by_source == {("matmul", "mlp"): ns(17.5), ("copy/transpose", "attn"): ns(7.5)}
  assert sum(wall.by_category.values()) + wall.idle == ns(30)
