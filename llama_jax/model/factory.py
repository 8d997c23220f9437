"""The one place a model is built from its config: params, the train and eval steps and sampling all call
`make_model`, so a new head (e.g. a reward head) plugs in here, as a function of the config, once."""

from __future__ import annotations

import flax.linen as nn

from llama_jax.config import ModelConfig
from llama_jax.model.transformer import Transformer


def make_model(config: ModelConfig) -> nn.Module:
  """The Flax module for `config`: tokens [B, T] (+ positions, segment ids) → logits [B, T, V] in fp32,
  or with `config.head == "reward"` one fp32 reward per row (read at `last_index_B`)."""
  return Transformer(config)
