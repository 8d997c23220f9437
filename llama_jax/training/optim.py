"""AdamW with warmup + cosine decay, global-norm clipping, and the batch-size/sequence-length stages.

"The Llama 3 Herd of Models" §3.4.1: AdamW; 405B peak LR 8e-5, linear warmup over 8,000 steps, cosine
decay to 8e-7 over 1,200,000 steps; peak 3e-4 for 8B and 1.5e-4 for 70B. Betas, eps, weight decay and
clipping are not stated for Llama 3: we use Llama 2's (β = 0.9/0.95, eps 1e-5, weight decay 0.1, clip 1.0).
Batch schedule: 4M tokens per batch at sequence 4,096; after 252M tokens 8M at 8,192; after 2.87T, 16M.

Gradient accumulation is not an optax wrapper: the train step scans over `grad_accum_steps`
microbatches and makes one optimizer update per call (llama_jax/training/step.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from llama_jax.errors import ConfigError


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

  def __post_init__(self):
    def need(ok: bool, field: str, msg: str):
      if not ok:
        raise ConfigError(f"OptimizerConfig.{field} (--{field}): {msg}")

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


# The paper's schedules. Only the 405B final LR is stated (peak / 100); 8B and 70B assume the same ratio,
# warmup and length.
LLAMA3_405B_OPT = OptimizerConfig(peak_lr=8e-5, final_lr=8e-7, warmup_steps=8000, total_steps=1_200_000)
LLAMA3_70B_OPT = dataclasses.replace(LLAMA3_405B_OPT, peak_lr=1.5e-4, final_lr=1.5e-6)
LLAMA3_8B_OPT = dataclasses.replace(LLAMA3_405B_OPT, peak_lr=3e-4, final_lr=3e-6)


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
  """lr(step): linear 0 → peak over warmup_steps, then cosine to final_lr at total_steps, then flat.

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
    cosine = final + (peak - final) * jnp.sin(0.5 * jnp.pi * remaining) ** 2
    return jnp.where(step < warmup, warm, cosine)

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


# ---------------------------------------------------------------------------------------------------
# Batch-size / sequence-length stages.


@dataclasses.dataclass(frozen=True)
class Stage:
  """From `start_tokens` tokens seen on: global batches of `batch_size` sequences of `seq_len` tokens."""

  start_tokens: int
  batch_size: int
  seq_len: int

  @property
  def tokens_per_batch(self) -> int:
    return self.batch_size * self.seq_len


# "4M tokens" = 1024 sequences of 4,096 (2^22 tokens); 8M = 1024 x 8,192; 16M = 2048 x 8,192. The
# thresholds are the paper's decimal 252M and 2.87T.
LLAMA3_STAGES = (
    Stage(start_tokens=0, batch_size=1024, seq_len=4096),
    Stage(start_tokens=252_000_000, batch_size=1024, seq_len=8192),
    Stage(start_tokens=2_870_000_000_000, batch_size=2048, seq_len=8192),
)


def validate_stages(stages: tuple[Stage, ...]) -> None:
  if not stages or stages[0].start_tokens != 0:
    raise ConfigError("--stages: the first stage must start at 0 tokens.")
  starts = [s.start_tokens for s in stages]
  if starts != sorted(set(starts)):
    raise ConfigError(f"--stages: start_tokens must be strictly increasing, got {starts}.")
  for s in stages:
    if s.batch_size < 1 or s.seq_len < 1:
      raise ConfigError(f"--stages: batch_size and seq_len must be >= 1, got {s}.")


def stage_at(tokens_seen: int, stages: tuple[Stage, ...] = LLAMA3_STAGES) -> Stage:
  """The stage in force once `tokens_seen` tokens have been trained on."""
  validate_stages(stages)
  return [s for s in stages if s.start_tokens <= tokens_seen][-1]



def stage_start_steps(stages: tuple[Stage, ...]) -> list[int]:
  """For each stage, the number of completed steps after which it is in force.

  Step s+1 runs in the stage of the tokens seen after s steps, so a stage starts at the first step
  boundary at or past its token threshold (e.g. the paper's 252M tokens at 4M per batch: after 61 steps).
  """
  validate_stages(stages)
  starts, step, tokens = [0], 0, 0
  for prev, nxt in zip(stages, stages[1:]):
    n = max(0, -(-(nxt.start_tokens - tokens) // prev.tokens_per_batch))  # ceil
    step, tokens = step + n, tokens + n * prev.tokens_per_batch
    starts.append(step)
  return starts


def parse_stages(text: list[str] | tuple[str, ...]) -> tuple[Stage, ...]:
  """`--stages=0:16x128,1000000:8x256` → Stages (start_tokens:batch_size x seq_len)."""
  out = []
  for item in text:
    try:
      start, shape = item.split(":")
      batch, seq = shape.lower().split("x")
      out.append(Stage(int(float(start)), int(batch), int(seq)))
    except ValueError as e:
      raise ConfigError(f"--stages: {item!r} is not START_TOKENS:BATCHxSEQ (e.g. 0:16x128).") from e
  stages = tuple(out)
  validate_stages(stages)
  return stages
