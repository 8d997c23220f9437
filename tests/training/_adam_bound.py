"""The bound on how far two AdamW runs drift apart when fed gradients that differ by reduction-order
noise: the tolerance of every test that compares params after optimizer steps on different layouts."""

import jax
import numpy as np


def _adam_weights(step, b):
  """Bias-corrected weights w_j of the gradients g_1..g_t in Adam's moment at step t: Σ_j w_j g_j (or g_j²)."""
  j = np.arange(1, step + 1)
  return (1 - b) * b ** (step - j) / (1 - b**step)


def adam_param_tolerance(grads_a, grads_b, lrs, opt, params):
  """Elementwise bound on |params_a - params_b| after len(lrs) AdamW steps fed grads_a[t] vs grads_b[t].

  Adam's update is u = m̂ / (√v̂ + ε) with m̂ = Σ_j a_j g_j, v̂ = Σ_j b_j g_j². By Cauchy–Schwarz
  |u| ≤ U = √(Σ_j a_j²/b_j), and ∂u/∂g_j ≤ (|a_j| + U√b_j) / (√v̂ + ε) with √v̂ ≥ √b_j |g_j| for every j.
  So a gradient difference δ moves the update by at most min(2U, Σ_j (|a_j| + U√b_j) δ_j / D), D = ε +
  max_j √b_j (|g_j| − δ_j): tiny where the gradient is large, up to 2U (a sign flip) where it is below
  the noise. Adam is *not* Lipschitz in the gradient at a fixed small tolerance: a coordinate with
  |g| ≲ ε = 1e-5 turns an ulp-level reduction-order difference δ ≈ 1e-8 into lr·δ/ε ≈ 3e-6 per step.
  Plus float32 rounding of p + lr·u (and the decoupled decay) each step: 2⁻²² |p| + lr·U·2⁻²⁰.
  Clipping is applied to both gradient sequences first, as the optimizer does.
  """
  def clipped(grads):
    norm = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(grads)))
    scale = 1.0 if opt.clip_norm is None else min(1.0, opt.clip_norm / norm)
    return jax.tree.map(lambda x: x.astype(np.float64) * scale, grads)

  ga = [clipped(g) for g in grads_a]
  gb = [clipped(g) for g in grads_b]

  def leaf_tol(p, *gs):
    n = len(lrs)
    g, d = [np.abs(x) for x in gs[:n]], [np.abs(x - y) for x, y in zip(gs[:n], gs[n:])]
    tol = np.zeros(p.shape)
    for t, lr in enumerate(lrs, start=1):
      a, b = _adam_weights(t, opt.b1), _adam_weights(t, opt.b2)
      big_u = np.sqrt(np.sum(a**2 / b))
      denom = opt.eps + np.max([np.sqrt(b[j]) * np.maximum(g[j] - d[j], 0) for j in range(t)], axis=0)
      du = sum((abs(a[j]) + big_u * np.sqrt(b[j])) * d[j] for j in range(t)) / denom
      tol += lr * np.minimum(2 * big_u, du) + 2.0**-22 * np.abs(p) + lr * big_u * 2.0**-20
    return tol

  return jax.tree.map(leaf_tol, params, *ga, *gb)
