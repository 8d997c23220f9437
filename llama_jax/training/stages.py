"""The paper's batch-size / sequence-length stages, and the training step each starts at.

"The Llama 3 Herd of Models" §3.4.1: 4M tokens per batch at sequence 4,096; after 252M tokens 8M at
8,192; after 2.87T, 16M.
"""

from __future__ import annotations

import dataclasses

from llama_jax.errors import ConfigError


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
