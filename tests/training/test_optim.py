"""Optimizer and schedules against float64 NumPy and the paper's numbers."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax import config as C
from llama_jax.training import optim
from llama_jax.model import params as P
from llama_jax.errors import ConfigError


def _lr_float64(step, cfg):
  """The paper's schedule written out: linear warmup from 0, cosine to final_lr at total_steps."""
  step = np.asarray(step, np.float64)
  warm = cfg.peak_lr * step / max(cfg.warmup_steps, 1)
  frac = np.clip((step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps), 0.0, 1.0)
  cos = cfg.final_lr + (cfg.peak_lr - cfg.final_lr) * 0.5 * (1 + np.cos(np.pi * frac))
  return np.where(step < cfg.warmup_steps, warm, cos)


def test_405b_schedule_matches_float64_formula():
  cfg = optim.LLAMA3_405B_OPT
  assert (cfg.peak_lr, cfg.final_lr, cfg.warmup_steps, cfg.total_steps) == (8e-5, 8e-7, 8000, 1_200_000)
  steps = np.concatenate([[0, 1, 2, 4000, 7999, 8000, 8001, 100_000, 604_000, 1_000_000, 1_199_999,
                           1_200_000, 2_000_000], np.linspace(0, 1_300_000, 1001).astype(int)])
  got = np.asarray(jax.jit(jax.vmap(optim.make_schedule(cfg)))(jnp.asarray(steps, jnp.int32)))
  # fp32 against float64, every step from warmup to the floor: a few fp32 ulps.
  np.testing.assert_allclose(got, _lr_float64(steps, cfg), rtol=1e-6, atol=0)
  assert got[0] == 0 and got[5] == pytest.approx(8e-5, rel=1e-7) and got[-1] == pytest.approx(8e-7)
  # Halfway through the decay the LR is the mean of peak and final.
  mid = cfg.warmup_steps + (cfg.total_steps - cfg.warmup_steps) // 2
  assert float(optim.make_schedule(cfg)(mid)) == pytest.approx((8e-5 + 8e-7) / 2, rel=1e-6)


def test_schedule_is_optax_warmup_cosine_up_to_its_rounding():
  cfg = optim.OptimizerConfig(peak_lr=1.0, final_lr=0.1, warmup_steps=2, total_steps=10)
  ref = optax.warmup_cosine_decay_schedule(0.0, 1.0, 2, 10, 0.1)
  for s in range(12):
    assert float(optim.make_schedule(cfg)(s)) == pytest.approx(float(ref(s)), rel=1e-6, abs=1e-7)


def test_presets_and_llama2_defaults():
  assert optim.LLAMA3_8B_OPT.peak_lr == 3e-4 and optim.LLAMA3_70B_OPT.peak_lr == 1.5e-4
  cfg = optim.OptimizerConfig()
  assert (cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.clip_norm) == (0.9, 0.95, 1e-5, 0.1, 1.0)


@pytest.mark.parametrize("override, match", [
    (dict(peak_lr=0.0), r"peak_lr \(--lr\)"), (dict(final_lr=1.0), r"final_lr \(--final_lr\)"),
    (dict(warmup_steps=10, total_steps=10), r"total_steps \(--steps\)"),
    (dict(b2=1.0), r"b2 \(set in the --config\)"), (dict(eps=0.0), r"eps \(set in the --config\)"),
    (dict(clip_norm=-1.0), r"clip_norm \(set in the --config\)"),
    (dict(grad_accum_steps=0), r"grad_accum_steps \(--grad_accum_steps\)"),
])
def test_config_errors_name_the_flag(override, match):
  """Each message names the pretraining flag that sets the field, or the config where it has none."""
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(optim.OptimizerConfig(), **override)


def _ones_params():
  return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), nn.unbox(P.abstract_params(C.TINY)))


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_hits_matrices_only(decay_embeddings):
  """With zero gradients only the decoupled decay moves a weight: p ← p·(1 − lr·wd)."""
  cfg = optim.OptimizerConfig(peak_lr=1e-2, final_lr=1e-3, warmup_steps=0, total_steps=10,
                              decay_embeddings=decay_embeddings)
  params = _ones_params()
  tx = optim.make_optimizer(cfg)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, jax.jit(tx.init)(params), params)
  new = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
  decayed = np.float32(1 - 1e-2 * 0.1)
  for scale in (new["final_norm"]["scale"], new["layers"]["attn_norm"]["scale"],
                new["layers"]["mlp_norm"]["scale"]):
    np.testing.assert_array_equal(scale, 1.0)
  for w in (new["layers"]["attn"]["wq"], new["layers"]["mlp"]["w_down"], new["lm_head"]):
    np.testing.assert_allclose(w, decayed, rtol=1e-7)
  np.testing.assert_allclose(new["embedding"], decayed if decay_embeddings else 1.0, rtol=1e-7)


def test_clipping_bounds_the_first_adam_step():
  """Clipping comes first: a huge gradient is rescaled to norm 1 and Adam's first step is ±lr anyway,
  but the clipped gradient is what enters the moments."""
  cfg = optim.OptimizerConfig(peak_lr=1e-2, final_lr=1e-3, warmup_steps=0, total_steps=10, weight_decay=0.0)
  params = {"w": jnp.zeros((4,))}
  tx = optim.make_optimizer(cfg)
  state = tx.init(params)
  g = {"w": jnp.array([300.0, 400.0, 0.0, 0.0])}  # norm 500
  _, state = tx.update(g, state, params)
  mu = state[1][0].mu["w"]  # chain(clip, adamw): adamw's ScaleByAdamState
  np.testing.assert_allclose(mu, 0.1 * np.array([0.6, 0.8, 0, 0]), rtol=1e-6)


def test_linear_decay_to_zero_for_annealing():
  """[P] §3.4.3: the LR linearly to 0 over the annealing steps; float64 reference, 0 exactly at the end."""
  cfg = optim.OptimizerConfig(peak_lr=1e-3, final_lr=0.0, warmup_steps=3, total_steps=50, decay="linear")
  steps = np.arange(0, 56)
  got = np.asarray(jax.jit(jax.vmap(optim.make_schedule(cfg)))(jnp.asarray(steps, jnp.int32)))
  s = steps.astype(np.float64)
  want = np.where(s < 3, 1e-3 * s / 3, 1e-3 * np.clip((50 - s) / 47, 0, 1))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  # The update of the last step (optax count 49) uses peak/47; from count 50 on the LR is exactly 0.
  assert got[49] == pytest.approx(1e-3 / 47, rel=1e-6) and np.all(got[50:] == 0.0)
  with pytest.raises(ConfigError, match=r"OptimizerConfig.decay.*choose 'cosine' or 'linear'"):
    optim.OptimizerConfig(decay="step")
