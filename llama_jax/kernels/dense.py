"""The model's projections (activation × weight einsums) with a weight gradient XLA computes in place.

`dense(spec, x, w)` is `jnp.einsum(spec, x, w)` (the oracle, `dense_oracle`) for specs of the form
"<lead><in>,<in><out>-><lead><out>" — "BTD,DF->BTF", "BTKGH,KGHD->BTD": the activation's leading (batch,
position) dims, the contracted feature dims, the weight's output dims. Forward and input gradient are the
oracle's einsums; only the weight gradient is written differently.

Why: autodiff writes the weight gradient as dot(dy, x) contracting the leading dims, then a transpose
to the weight's order. A dot that contracts two leading dims is not in the [M, K] × [K, N] form matmul
libraries take, so XLA rewrites it (DotDecomposer) by transposing its first operand to put the
contracted dims last: here dy, the gradient of the wider side. On the 45M benchmark model that is the
[B·T, F] gradient of the MLP's gate and up projections (F = 3·D), transposed by fusions that also
compute the SiLU backward with strided reads: 0.36 s of a 5.7 s CPU step (benchmarks/profile_step.py).
Here the weight gradient is one dot whose first operand is the narrower of x and dy, so the one transpose
XLA adds is of the smaller array (x [B·T, D] for gate and up). The arithmetic is the same sum over the
leading dims in the same dtype; only the dot's operand order differs from autodiff's (measured on CPU
only).

The forward rule is the einsum itself, so remat policies that save dots (`dots_saveable`, ...) see and
save its dot_general as they do the oracle's (tests/kernels/test_dense.py compares the saved residuals).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _split(spec: str) -> tuple[str, str, str]:
  """'BTD,DF->BTF' -> ('BT', 'D', 'F'); a ValueError naming the spec if it is not lead+in, in+out."""
  try:
    inputs, out = spec.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
  except ValueError:
    raise ValueError(f"dense: spec {spec!r} is not 'x,w->out'.") from None
  if not (xs + ws + out).isalpha() or len(set(xs)) < len(xs) or len(set(ws)) < len(ws):
    raise ValueError(f"dense: spec {spec!r} must name each dimension of x and of w once, by a letter.")
  contracted = "".join(c for c in xs if c in ws)
  lead, feat_out = xs[:len(xs) - len(contracted)], ws[len(contracted):]
  if not contracted or xs != lead + contracted or ws != contracted + feat_out or out != lead + feat_out:
    raise ValueError(f"dense: spec {spec!r} is not '<lead><in>,<in><out>-><lead><out>' (e.g. "
                     "'BTD,DF->BTF').")
  return lead, contracted, feat_out


def dense_oracle(spec: str, x, w):
  """The plain einsum `dense` equals (forward and both gradients)."""
  _split(spec)
  return jnp.einsum(spec, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def dense(spec: str, x, w):
  """jnp.einsum(spec, x, w), with the weight gradient computed as one dot over the narrower operand."""
  return dense_oracle(spec, x, w)


def _dense_fwd(spec, x, w):
  # The oracle, not a call of `dense`: under jax.checkpoint a nested custom_vjp call is one opaque step
  # that dot-saving policies do not recognise, so the projection would be recomputed.
  return dense_oracle(spec, x, w), (x, w)


def _dense_bwd(spec, res, dy):
  x, w = res
  lead, contracted, feat_out = _split(spec)
  dx = jnp.einsum(f"{lead}{feat_out},{contracted}{feat_out}->{lead}{contracted}", dy, w)
  n, n_in = len(lead), len(contracted)
  over_lead = (tuple(range(n)), tuple(range(n)))
  # Named for profiles (benchmarks/profile_step.py): "bwd layers/mlp/d_weight BTD,DF->BTF".
  with jax.named_scope(f"d_weight {spec}"):
    if np.prod(x.shape[n:]) <= np.prod(dy.shape[n:]):
      dw = lax.dot_general(x, dy, (over_lead, ((), ())))  # [*in, *out]: w's order
    else:
      dw = lax.dot_general(dy, x, (over_lead, ((), ())))  # [*out, *in]
      n_out = dw.ndim - n_in
      dw = jnp.transpose(dw, tuple(range(n_out, dw.ndim)) + tuple(range(n_out)))
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
