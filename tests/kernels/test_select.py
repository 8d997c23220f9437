"""attention_impl='auto' picks the kernel of the backend (splash on TPU, cuDNN on GPU, on CPU blockwise
past CPU_BLOCK positions and einsum below), blockwise where that kernel cannot take the attention; an
explicit choice overrides it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config as C
from llama_jax.model import attention as A
from llama_jax.model.attention import MaskInfo

CAUSAL = MaskInfo.self_attention()
DOCS = MaskInfo.self_attention(jnp.ones((1, 256), jnp.int32))
ROWS = MaskInfo.self_attention(row_index_BT=jnp.zeros((1, 256), jnp.int32))  # the context-parallel layout


@pytest.mark.parametrize("backend, dtype, t, info, want", [
    ("tpu", jnp.float32, 256, CAUSAL, "splash"),
    ("tpu", jnp.bfloat16, 256, DOCS, "splash"),
    ("tpu", jnp.bfloat16, 200, CAUSAL, "blockwise"),  # off splash's 128 grid
    ("tpu", jnp.bfloat16, 256, ROWS, "blockwise"),
    ("gpu", jnp.bfloat16, 256, CAUSAL, "cudnn"),
    ("gpu", jnp.float16, 256, CAUSAL, "cudnn"),
    ("gpu", jnp.float32, 256, CAUSAL, "blockwise"),  # cuDNN flash attention takes no float32
    ("gpu", jnp.bfloat16, 256, ROWS, "blockwise"),
    ("gpu", jnp.bfloat16, 256, DOCS, "blockwise"),  # packed layout needs Hopper; this host has no CUDA
    ("cpu", jnp.bfloat16, 256, CAUSAL, "blockwise"),
    ("cpu", jnp.float32, 256, DOCS, "blockwise"),
    ("cpu", jnp.float32, 64, CAUSAL, "einsum"),  # one CPU block: no loops
])
def test_auto_by_backend(backend, dtype, t, info, want):
  assert A.resolve("auto", backend, dtype, t, t, info) == want


def test_auto_on_tpu_takes_blockwise_for_blocks_off_the_grid():
  """attention_block_size=64 gives splash blocks of 64 (it needs multiples of 128): blockwise instead."""
  assert A.resolve("auto", "tpu", jnp.bfloat16, 256, 256, CAUSAL, block_size=64) == "blockwise"
  assert A.resolve("auto", "tpu", jnp.bfloat16, 256, 256, CAUSAL, block_size=384) == "splash"  # blocks of 128


@pytest.mark.parametrize("impl", ["einsum", "xla", "cudnn", "splash", "blockwise"])
def test_explicit_choice_overrides(impl):
  for backend in ("cpu", "gpu", "tpu"):
    assert A.resolve(impl, backend, jnp.bfloat16, 256, 256, CAUSAL) == impl


def test_auto_is_the_default_and_is_the_oracle_on_cpu(monkeypatch):
  """ModelConfig defaults to 'auto'; here (CPU) it computes exactly the einsum oracle up to one block
  and exactly blockwise in CPU_BLOCK blocks past it (whatever block_size says); with the backend
  reported as TPU the same call goes to splash."""
  assert C.ModelConfig().attention_impl == "auto"
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 128, 1, 2, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((1, 128, 1, 16)), jnp.float32) for _ in range(2))
  short = lambda x: x[:, :A.CPU_BLOCK]
  np.testing.assert_array_equal(A.attention(short(q), short(k), short(v), CAUSAL, "auto"),
                                A.attention(short(q), short(k), short(v), CAUSAL, "einsum"))
  np.testing.assert_array_equal(A.attention(q, k, v, CAUSAL, "auto", block_size=512),
                                A.attention(q, k, v, CAUSAL, "blockwise", block_size=A.CPU_BLOCK))
  called = []
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  monkeypatch.setattr(A.splash, "splash_attention", lambda *a: called.append(True) or a[0])
  A.attention(q, k, v, CAUSAL, "auto")
  assert called == [True]


def test_unknown_impl_is_refused():
  with pytest.raises(C.ConfigError, match=r"ModelConfig.attention_impl: got 'flash'; choose one of \('auto', "
                                          r"'einsum', 'xla', 'cudnn', 'splash', 'blockwise'\)"):
    dataclasses.replace(C.TINY, attention_impl="flash")
