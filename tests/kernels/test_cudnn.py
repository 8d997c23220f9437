"""The cuDNN path: its description of packed documents (runs of equal segment ids, cuDNN's packed layout)
against a plain Python reference, and its refusals, one line naming the flag and the fix. (The kernel
itself needs an NVIDIA GPU: no test here runs it.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.errors import ConfigError
from llama_jax.kernels import cudnn
from llama_jax.model.attention import MaskInfo, attention


def _runs_reference(row, m):
  """Lengths and starts of the runs of equal ids, -1 padded to m (starts to m + 1), and overflow."""
  starts = [i for i in range(len(row)) if i == 0 or row[i] != row[i - 1]]
  lengths = [b - a for a, b in zip(starts, starts[1:] + [len(row)])]
  pad = lambda xs, n: (xs + [-1] * n)[:n]
  return pad(lengths, m), pad(starts, m) + [-1], len(starts) > m


def test_segment_runs_equal_a_python_reference():
  """Documents, padding (0) at the end, a single document, one token per document, a row with more runs
  than the bound (flagged), and an id that recurs (two runs)."""
  t, m = 12, 4
  rows = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0],
                   [5] * 12,
                   [1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                   [1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 6],
                   [1, 1, 2, 2, 1, 1, 0, 0, 0, 0, 0, 0]], np.int32)
  lengths, starts, over = (np.asarray(x) for x in jax.jit(cudnn.segment_runs, static_argnums=1)(jnp.asarray(rows), m))
  assert lengths.shape == (len(rows), m) and starts.shape == (len(rows), m + 1)
  assert lengths.dtype == starts.dtype == np.int32
  for b, row in enumerate(rows.tolist()):
    want_len, want_start, want_over = _runs_reference(row, m)
    assert lengths[b].tolist() == want_len, b
    assert starts[b].tolist() == want_start, b
    assert bool(over[b]) == want_over, b
  assert over.tolist() == [False, False, False, True, False]
  assert lengths[0].tolist() == [3, 2, 4, 3] and starts[0].tolist() == [0, 3, 5, 9, -1]
  assert lengths[0].sum() == t


def _qkv(dtype=jnp.float32):
  return (jnp.zeros((1, 16, 2, 2, 8), dtype), jnp.zeros((1, 16, 2, 8), dtype), jnp.zeros((1, 16, 2, 8), dtype))


def test_refuses_off_gpu():
  """On this CPU backend: a one-line error naming the flag and the fix, at trace time."""
  with pytest.raises(ConfigError, match=r"^--attention_impl=cudnn needs an NVIDIA GPU, but the backend is "
                                        r"'cpu'; use --attention_impl=auto \(splash on TPU, cudnn on GPU, "
                                        r"einsum on CPU\) or einsum\."):
    jax.eval_shape(lambda q, k, v: attention(q, k, v, MaskInfo.self_attention(), "cudnn"), *_qkv(jnp.bfloat16))


def test_refuses_what_it_cannot_compute_on_a_gpu():
  """float32 inputs, row indices (context parallelism), and packed documents without a Hopper GPU (here:
  no CUDA device at all)."""
  with pytest.raises(ConfigError, match=r"needs bfloat16 or float16 inputs, got float32; use --dtype=bfloat16"):
    cudnn.check_supported("gpu", jnp.float32, MaskInfo.self_attention())
  idx = jnp.zeros((1, 16), jnp.int32)
  with pytest.raises(ConfigError, match=r"cannot take row indices .* use --attention_impl=blockwise\.$"):
    cudnn.check_supported("gpu", jnp.bfloat16, MaskInfo.self_attention(row_index_BT=idx))
  with pytest.raises(ConfigError, match=r"packed documents need cuDNN's packed layout, which needs a Hopper "
                                        r"GPU or later \(sm_90\)"):
    cudnn.check_supported("gpu", jnp.bfloat16, MaskInfo.self_attention(jnp.ones((1, 16), jnp.int32)))
  cudnn.check_supported("gpu", jnp.bfloat16, MaskInfo.self_attention())  # one causal row: supported
