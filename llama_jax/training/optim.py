"""AdamW with warmup + cosine decay and global-norm clipping (the stages are in stages.py).

"The Llama 3 Herd of Models" §3.4.1: AdamW; 405B peak LR 8e-5, linear warmup over 8,000 steps, cosine
decay to 8e-7 over 1,200,000 steps; peak 3e-4 for 8B and 1.5e-4 for 70B. Betas, eps, weight decay and
clipping are not stated for Llama 3: we use Llama 2's (β = 0.9/0.95, eps 1e-5, weight decay 0.1, clip 1.0).

Gradient accumulation is not an optax wrapper: the train step scans over `grad_accum_steps`
microbatches and makes one optimizer update per call (llama_jax/training/step.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from llama_jax.errors import ConfigError


# The pretraining entry point's flag for each field that has one (--steps sets total_steps).
_FLAGS = {"peak_lr": "--lr", "final_lr": "--final_lr", "warmup_steps": "--warmup_steps",
          "total_steps": "--steps", "grad_accum_steps": "--grad_accum_steps"}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and LR schedule. `total_steps` is where the cosine reaches `final_lr`, warmup included
  (optax's `decay_steps`; the paper's "decaying over 1,200,000 steps" is read the same way)."""

  peak_lr: float = 3e-4
  final_lr: float = 3e-6
  warmup_steps: int = 8000
  total_steps: int = 1_200_000
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-5
  weight_decay: float = 0.1
  # Decay the input embedding like any other matrix (nanoGPT, Megatron-LM, HF Trainer); norm scales are
  # never decayed. Some recipes (e.g. OLMo 2) exempt the embedding: set False for that.
  decay_embeddings: bool = True
  clip_norm: float | None = 1.0
  grad_accum_steps: int = 1
  # After the warmup: "cosine" to final_lr at total_steps (pretraining, [P] §3.4.1), or "linear" — with
  # final_lr=0 the annealing of [P] §3.4.3 ("the learning rate linearly to 0" over the last tokens).
  decay: Literal["cosine", "linear"] = "cosine"

  def __post_init__(self):
    def need(ok: bool, field: str, msg: str):
      if not ok:
        raise ConfigError(f"OptimizerConfig.{field} ({_FLAGS.get(field, 'set in the --config')}): {msg}")

    need(self.peak_lr > 0, "peak_lr", f"must be > 0, got {self.peak_lr}.")
    need(0 <= self.final_lr <= self.peak_lr, "final_lr",
         f"must be in [0, peak_lr={self.peak_lr}], got {self.final_lr} (the paper decays to peak/100).")
    need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps",
         f"must be an integer >= 0, got {self.warmup_steps!r}.")
    need(isinstance(self.total_steps, int) and self.total_steps > self.warmup_steps, "total_steps",
         f"must be an integer > warmup_steps={self.warmup_steps} (it includes the warmup), "
         f"got {self.total_steps!r}.")
    for f in ("b1", "b2"):
      need(0 <= getattr(self, f) < 1, f, f"must be in [0, 1), got {getattr(self, f)}.")
    need(self.eps > 0, "eps", f"must be > 0 (Llama 2 used 1e-5), got {self.eps}.")
    need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}.")
    need(self.clip_norm is None or self.clip_norm > 0, "clip_norm",
         f"must be > 0, or None for no clipping, got {self.clip_norm}.")
    need(isinstance(self.grad_accum_steps, int) and self.grad_accum_steps >= 1, "grad_accum_steps",
         f"must be an integer >= 1, got {self.grad_accum_steps!r}.")
    need(self.decay in ("cosine", "linear"), "decay", f"choose 'cosine' or 'linear', got {self.decay!r}.")


# The paper's schedules. Only the 405B final LR is stated (peak / 100); 8B and 70B assume the same ratio,
# warmup and length.
LLAMA3_405B_OPT = OptimizerConfig(peak_lr=8e-5, final_lr=8e-7, warmup_steps=8000, total_steps=1_200_000)
LLAMA3_70B_OPT = dataclasses.replace(LLAMA3_405B_OPT, peak_lr=1.5e-4, final_lr=1.5e-6)
LLAMA3_8B_OPT = dataclasses.replace(LLAMA3_405B_OPT, peak_lr=3e-4, final_lr=3e-6)


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
  """lr(step): linear 0 → peak over warmup_steps, then cosine (or linear) to final_lr at total_steps,
  then flat.

  The same curve as optax.warmup_cosine_decay_schedule, written to be exact in fp32 to ~1e-7 relative
  everywhere: optax's warmup computes peak·(1 − (1 − s/W)) and its cosine 1 + cos(πx), both losing
  digits to cancellation (3e-4 relative error at step 1 of the 405B schedule). Here the warmup is
  peak·s/W and the cosine uses 1 + cos(πx) = 2·sin²(π(1 − x)/2) with 1 − x from integer step counts.
  """
  peak, final = config.peak_lr, config.final_lr
  warmup, total = config.warmup_steps, config.total_steps

  def schedule(step):
    # fp32 step counts are exact up to 2^24 steps.
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    remaining = jnp.clip((total - step) / (total - warmup), 0.0, 1.0)
    if config.decay == "linear":  # final_lr=0: exactly 0 at total_steps, from integer step counts
      decay = final + (peak - final) * remaining
    else:
      decay = final + (peak - final) * jnp.sin(0.5 * jnp.pi * remaining) ** 2
    return jnp.where(step < warmup, warm, decay)

  return schedule


_EMBEDDINGS = ("embedding",)


def weight_decay_mask(config: OptimizerConfig, params: Any) -> Any:
  """True where weight decay applies: the matrices. Never norm scales (by name: stacked layers give
  them a leading L axis, so ndim cannot tell them from matrices)."""

  def decays(path, _):
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    if name == "scale":
      return False
    return config.decay_embeddings or name not in _EMBEDDINGS

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """clip_by_global_norm → AdamW (decoupled decay, scaled by the LR as in PyTorch's AdamW)."""
  adamw = optax.adamw(learning_rate=make_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay,
                      mask=lambda params: weight_decay_mask(config, params))
  if config.clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
