"""Model configuration: one frozen dataclass, the published Llama 3 sizes as values.

Numbers from "The Llama 3 Herd of Models" (Table 3) and Meta's llama-models `ModelArgs`; see
../shared/reference/llama3.md. Tiny test presets derive from real ones with `dataclasses.replace`, so
they keep the real RoPE theta, scaling and epsilon.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from llama_jax.errors import ConfigError

RematPolicy = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"]
AttentionImpl = Literal["auto", "einsum", "xla", "cudnn", "splash", "blockwise"]
DType = Literal["float32", "bfloat16", "float16"]
# The output head: "lm" = next-token logits [B, T, V]; "reward" = one scalar per row from the final normed
# hidden state of its last real token (the reward model, llama_jax/training/posttrain_losses.py).
Head = Literal["lm", "reward"]

LLAMA3_VOCAB = 128_256  # 128,000 BPE ranks + 256 special tokens


def ffn_dim(dim: int, multiplier: float, multiple_of: int) -> int:
  """Meta's FFN width: round up to `multiple_of` of int(multiplier * int(2 * 4D / 3))."""
  hidden = int(multiplier * int(2 * 4 * dim / 3))
  return multiple_of * math.ceil(hidden / multiple_of)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1 frequency scaling of RoPE (Meta's `apply_scaling`, HF rope_type 'llama3')."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a dense Llama 3 decoder."""

  vocab_size: int = LLAMA3_VOCAB
  dim: int = 4096  # D
  num_layers: int = 32  # L
  num_heads: int = 32  # N
  num_kv_heads: int = 8  # K
  head_dim: int = 128  # H
  mlp_dim: int = 14336  # F
  norm_eps: float = 1e-5
  rope_theta: float = 500_000.0
  rope_scaling: RopeScaling | None = RopeScaling()
  max_seq_len: int = 131_072
  tie_embeddings: bool = False
  # Execution choices that change no value: dtype of the matmuls, layer scan, rematerialization, and
  # how many sequence positions the loss turns into logits at a time.
  dtype: DType = "float32"
  param_dtype: DType = "float32"
  scan_layers: bool = True
  remat_policy: RematPolicy = "none"
  # "auto": splash on TPU, cuDNN on GPU (bf16/fp16), on CPU blockwise in blocks of 64 past 64 positions,
  # einsum below (model/attention.py, resolve).
  attention_impl: AttentionImpl = "auto"
  attention_block_size: int = 512  # queries × keys per block of attention_impl="blockwise" or "splash"
  # Tokens per chunk of the output layer + cross-entropy on each device (training/losses.py: its rows x
  # loss_chunk / rows positions): fp32 logits exist for loss_chunk x V per device at a time, never
  # [B, T, V]; their gradient is taken in the same pass. Smaller chunks keep the logits in cache on a
  # CPU (the 45M peer model, 8 x 512 on one device: 2048 = 256 positions, step 6.54 -> 5.79 s vs one
  # chunk); each chunk adds its output-weight gradient into an unreduced fp32 copy of W, so on an
  # accelerator a chunk of 2048 tokens keeps that read-modify-write small against the chunk's matmuls.
  loss_chunk: int = 2048
  head: Head = "lm"

  def __post_init__(self):
    def need(ok: bool, field: str, msg: str):
      if not ok:
        raise ConfigError(f"ModelConfig.{field}: {msg}")

    for f in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
              "max_seq_len", "attention_block_size", "loss_chunk"):
      v = getattr(self, f)
      need(isinstance(v, int) and v > 0, f, f"must be a positive integer, got {v!r}.")
    need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
         f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}; "
         "grouped-query attention needs num_heads = G * num_kv_heads (use a divisor of num_heads).")
    need(self.head_dim % 2 == 0, "head_dim",
         f"RoPE rotates pairs of features, so head_dim must be even, got {self.head_dim}.")
    need(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}.")
    need(self.rope_theta > 0, "rope_theta", f"must be > 0 (Llama 3 uses 500000), got {self.rope_theta}.")
    for f, choices in (("dtype", DType), ("param_dtype", DType), ("remat_policy", RematPolicy),
                       ("attention_impl", AttentionImpl), ("head", Head)):
      allowed = choices.__args__
      need(getattr(self, f) in allowed, f, f"got {getattr(self, f)!r}; choose one of {allowed}.")
    s = self.rope_scaling
    if s is not None:
      need(s.factor >= 1.0, "rope_scaling.factor",
           f"must be >= 1 (8 for Llama 3.1, 32 for 3.2-1B/3B), got {s.factor}.")
      need(0 < s.low_freq_factor < s.high_freq_factor, "rope_scaling.low_freq_factor",
           f"need 0 < low_freq_factor < high_freq_factor, got {s.low_freq_factor} and "
           f"{s.high_freq_factor} (Llama 3.1 uses 1 and 4).")
      need(s.original_max_position > 0, "rope_scaling.original_max_position",
           f"must be > 0 (Llama 3.1 uses 8192), got {s.original_max_position}.")

  @property
  def q_per_kv(self) -> int:  # G
    return self.num_heads // self.num_kv_heads

  def param_count(self) -> int:
    """Closed-form parameter count (the tests check it against jax.eval_shape of the model)."""
    d, h = self.dim, self.head_dim
    attn = d * self.num_heads * h * 2 + d * self.num_kv_heads * h * 2
    layer = attn + 3 * d * self.mlp_dim + 2 * d
    # The reward head replaces the output layer [D, V] by a vector [D].
    out = d if self.head == "reward" else (0 if self.tie_embeddings else self.vocab_size * d)
    return self.num_layers * layer + d + self.vocab_size * d + out


# Llama 3 (April 2024): same as 3.1 without RoPE scaling, 8K context.
LLAMA3_8B = ModelConfig(dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        mlp_dim=ffn_dim(4096, 1.3, 1024), rope_scaling=None, max_seq_len=8192)
LLAMA3_70B = dataclasses.replace(LLAMA3_8B, dim=8192, num_layers=80, num_heads=64,
                                 mlp_dim=ffn_dim(8192, 1.3, 4096))
# Llama 3.1: RoPE scaling factor 8, 128K context.
LLAMA31_8B = dataclasses.replace(LLAMA3_8B, rope_scaling=RopeScaling(factor=8.0), max_seq_len=131_072)
LLAMA31_70B = dataclasses.replace(LLAMA3_70B, rope_scaling=RopeScaling(factor=8.0), max_seq_len=131_072)
LLAMA31_405B = dataclasses.replace(LLAMA31_8B, dim=16384, num_layers=126, num_heads=128,
                                   mlp_dim=ffn_dim(16384, 1.2, 4096))
# Llama 3.2 text models: tied embeddings, RoPE scaling factor 32.
LLAMA32_1B = dataclasses.replace(LLAMA31_8B, dim=2048, num_layers=16, num_heads=32, head_dim=64,
                                 mlp_dim=ffn_dim(2048, 1.5, 256), tie_embeddings=True,
                                 rope_scaling=RopeScaling(factor=32.0))
LLAMA32_3B = dataclasses.replace(LLAMA32_1B, dim=3072, num_layers=28, num_heads=24, head_dim=128,
                                 mlp_dim=ffn_dim(3072, 1.0, 256))

# Tiny presets for tests and the CPU default run: real RoPE/theta/eps, toy sizes. Two layers run
# unrolled: a scan's stacked per-layer buffers (zeroed, then written slice by slice) cost more than the
# loop saves at this depth (train step 0.88x; it compiles no slower).
TINY = dataclasses.replace(LLAMA31_8B, vocab_size=256, dim=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=2048, scan_layers=False)
TINY_TIED = dataclasses.replace(LLAMA32_1B, vocab_size=256, dim=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=2048,
                                scan_layers=False)

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B,
    "llama3.1-8b": LLAMA31_8B, "llama3.1-70b": LLAMA31_70B, "llama3.1-405b": LLAMA31_405B,
    "llama3.2-1b": LLAMA32_1B, "llama3.2-3b": LLAMA32_3B,
    "tiny": TINY, "tiny-tied": TINY_TIED,
}


def from_dict(fields: dict) -> ModelConfig:
  """A ModelConfig from `dataclasses.asdict` of one (e.g. read back from JSON)."""
  fields = dict(fields)
  if fields.get("rope_scaling") is not None:
    fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
  return ModelConfig(**fields)


def get_preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ConfigError(f"model preset {name!r} does not exist; choose one of {sorted(PRESETS)}.")
  return PRESETS[name]
