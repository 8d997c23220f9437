"""kernels.dense equals its einsum oracle (forward and both gradients) and float64 NumPy, keeps dtypes,
saves what the oracle saves under every remat policy, rejects specs it does not handle, and its weight
gradient makes XLA transpose the narrower operand."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.kernels.dense import dense, dense_oracle
from llama_jax.model import transformer

# fp32: the same products summed in another order (the float64 values are exact, the inputs being fp32).
# Each output sums at most 32 products of standard normals (|sum| ~ 6); the rounding of such a sum is
# ~sqrt(32) · 6e-8 · 6 ≈ 2e-6 typically, 32 · 6e-8 · 32 ≈ 6e-5 in the worst case of every term ~1 and all
# errors aligned. 1e-5 (absolute plus relative) is 5× the typical error; the inputs are seeded.
TOL = 1e-5

# The model's projections (llama_jax/model/transformer.py) at tiny sizes: B 2, T 16, D 8, F 24, K 2, G 2,
# H 2 (K·G·H = 8 = D, K·H = 4 < D). Gate/up: x narrower than dy; down, k/v: dy narrower; q/o: equal.
SHAPES = {"B": 2, "T": 16, "S": 16, "D": 8, "F": 24, "K": 2, "G": 2, "H": 2}
SPECS = ["BTD,DF->BTF", "BTF,FD->BTD", "BTD,DKGH->BTKGH", "BSD,DKH->BSKH", "BTKGH,KGHD->BTD"]


def _operands(spec, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  (xs, ws), out = spec.split("->")[0].split(","), spec.split("->")[1]
  make = lambda letters: rng.standard_normal([SHAPES[c] for c in letters]).astype(dtype)
  return make(xs), make(ws), make(out)


def _value_and_grads(fn, spec, x, w, r):
  """The output and the gradients (x, w) of <out, r> (r random: every output counts)."""
  f = lambda x, w: ((fn(spec, x, w) * r).sum(), fn(spec, x, w))
  (_, out), (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(x, w)
  return out, dx, dw


@pytest.mark.parametrize("spec", SPECS)
def test_equals_the_oracle_and_float64(spec):
  x, w, r = _operands(spec)
  got = _value_and_grads(dense, spec, x, w, r)
  want = _value_and_grads(dense_oracle, spec, x, w, r)
  xs, ws = spec.split("->")[0].split(",")
  out = spec.split("->")[1]
  x64, w64, r64 = (a.astype(np.float64) for a in (x, w, r))
  exact = (np.einsum(spec, x64, w64), np.einsum(f"{out},{ws}->{xs}", r64, w64),
           np.einsum(f"{xs},{out}->{ws}", x64, r64))
  for name, a, b, c in zip(("out", "dx", "dw"), got, want, exact):
    assert a.shape == b.shape == c.shape, name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=TOL, err_msg=name)
    np.testing.assert_allclose(np.asarray(a), c, atol=TOL, rtol=TOL, err_msg=name)


@pytest.mark.parametrize("spec", ["BTD,DF->BTF", "BTF,FD->BTD"])
def test_gradients_keep_the_operands_dtypes(spec):
  x, w, r = (jnp.asarray(a, jnp.bfloat16) for a in _operands(spec))
  got = _value_and_grads(dense, spec, x, w, r)
  want = _value_and_grads(dense_oracle, spec, x, w, r)
  assert [a.dtype for a in got] == [b.dtype for b in want] == [jnp.bfloat16] * 3
  # bf16 keeps 8 significant bits: one step is 2^-8 to 2^-7 (0.4-0.8%) of a value. The two sum up to 32
  # products in another order and round once each, so they differ by a step or two; 2e-2 relative is
  # 2.5-5 steps (plus 2e-2 absolute for values near 0, where a bf16 step is far below it).
  for name, a, b in zip(("out", "dx", "dw"), got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2,
                               err_msg=name)


@pytest.mark.parametrize("spec, why", [
    ("BTD,FD->BTF", "is not '<lead><in>,<in><out>-><lead><out>'"),
    ("BTD,DF->BFT", "is not '<lead><in>,<in><out>-><lead><out>'"),
    ("TBD,DF->BTF", "is not '<lead><in>,<in><out>-><lead><out>'"),
    ("BTD->BTD", "is not 'x,w->out'"),
    ("BTD,DD->BTD", "must name each dimension of x and of w once"),  # einsum: a diagonal
    ("...D,DF->...F", "must name each dimension of x and of w once, by a letter"),
])
def test_a_spec_it_does_not_handle_is_refused(spec, why):
  x, w = np.ones((2, 3, 4), np.float32), np.ones((4, 4), np.float32)
  with pytest.raises(ValueError, match=re.escape(f"dense: spec {spec!r} {why}")):
    dense(spec, x, w)


@pytest.mark.parametrize("policy", sorted(transformer._REMAT_POLICIES))
def test_remat_saves_what_the_oracle_saves(policy):
  """Under jax.checkpoint with each of the model's remat policies, the SwiGLU MLP built from dense keeps
  the same residuals for its backward as the one built from the oracle: dot-saving policies must see
  dense's dots (a custom_vjp is otherwise one opaque step that they recompute)."""
  x, wg, r = _operands("BTD,DF->BTF")
  wd = _operands("BTF,FD->BTD")[1]

  def residuals(fn):
    def mlp(x, wg, wu, wd):
      return fn("BTF,FD->BTD", jax.nn.silu(fn("BTD,DF->BTF", x, wg)) * fn("BTD,DF->BTF", x, wu), wd)
    f = jax.checkpoint(mlp, policy=transformer._REMAT_POLICIES[policy])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # one line per residual: "f32[2,16,24] output of ..."
      jax.ad_checkpoint.print_saved_residuals(f, x, wg, 2 * wg, wd)
    return sorted(line.split()[0] for line in out.getvalue().splitlines())

  assert residuals(dense) == residuals(dense_oracle)


def _transposed_dy_lines(fn):
  """Lines of the compiled gradient that write the gate projection's output gradient dy [B, T, F]
  transposed: as [F, B·T] or [F, B, T], or in a layout other than row-major. XLA's rewrite of a dot
  contracting two leading dims transposes the dot's first operand. dy comes out of a SiLU backward
  fusion, as in the MLP. (The gate's spec only: for the down and k/v projections dy is the narrower
  operand, transposed by design.)"""
  b, t, d, f = SHAPES["B"], SHAPES["T"], SHAPES["D"], SHAPES["F"]
  x, w, r = _operands("BTD,DF->BTF")
  loss = lambda w: (jax.nn.silu(fn("BTD,DF->BTF", x, w)) * r).sum()
  hlo = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
  wide = re.compile(rf"= f32\[({f},{b * t}|{f},{b},{t})\]|= f32\[{b},{t},{f}\]{{(?!2,1,0}})|"
                    rf"= f32\[{b * t},{f}\]{{(?!1,0}})")
  return [line for line in hlo.splitlines() if wide.search(line)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's dot rewrite and layouts")
def test_the_weight_gradient_transposes_the_narrower_operand():
  """The oracle (autodiff's dot(dy, x)) makes XLA write dy [B, T, F] transposed; dense's dot(x, dy)
  transposes x [B, T, D] instead (D < F), so no [F, B·T] array is written."""
  assert _transposed_dy_lines(dense_oracle), "the oracle no longer transposes dy: revisit kernels/dense.py"
  assert _transposed_dy_lines(dense) == []
