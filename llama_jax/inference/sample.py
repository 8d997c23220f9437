"""Greedy (or temperature) sampling for a quick look at what a model learned.

No KV cache: each new token re-runs the model over a fixed-length buffer, so the whole loop is one
compiled program; causality makes the not-yet-written tail of the buffer invisible. Good for the short
samples printed at the end of a run, not for serving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.errors import ConfigError
from llama_jax.config import ModelConfig
from llama_jax.model import factory


def generate(config: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, rng: jax.Array | None = None, stop_id: int | None = None,
             pad_id: int = 0) -> list[list[int]]:
  """Continue each prompt by up to `max_new_tokens` tokens; returns only the new tokens."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("generate: every prompt needs at least one token (e.g. BOS).")
  length = max(len(p) for p in prompts) + max_new_tokens
  if length > config.max_seq_len:
    raise ConfigError(f"prompt + max_new_tokens = {length} exceeds ModelConfig.max_seq_len="
                      f"{config.max_seq_len}; shorten the prompt or --sample_tokens.")
  buf = np.full((len(prompts), length), pad_id, np.int32)
  for i, p in enumerate(prompts):
    buf[i, : len(p)] = p
  lens = np.array([len(p) for p in prompts], np.int32)
  rng = jax.random.key(0) if rng is None else rng
  out = _generate(config, max_new_tokens, float(temperature))(params, jnp.asarray(buf), jnp.asarray(lens), rng)
  out = np.asarray(out)
  result = []
  for i, p in enumerate(prompts):
    new = out[i, len(p): len(p) + max_new_tokens].tolist()
    if stop_id is not None and stop_id in new:
      new = new[: new.index(stop_id)]
    result.append(new)
  return result


def _generate(config: ModelConfig, max_new_tokens: int, temperature: float):
  model = factory.make_model(config)

  @jax.jit
  def run(params, buf_BT, lens_B, rng):
    def step(i, carry):
      buf_BT, rng = carry
      logits_BTV = model.apply({"params": params}, buf_BT)
      at_B = lens_B + i - 1  # position whose logits predict the next token
      logits_BV = jnp.take_along_axis(logits_BTV, at_B[:, None, None], axis=1)[:, 0]
      rng, key = jax.random.split(rng)
      if temperature > 0:
        next_B = jax.random.categorical(key, logits_BV / temperature)
      else:
        next_B = jnp.argmax(logits_BV, axis=-1)
      buf_BT = buf_BT.at[jnp.arange(buf_BT.shape[0]), at_B + 1].set(next_B.astype(buf_BT.dtype))
      return buf_BT, rng

    buf_BT, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buf_BT, rng))
    return buf_BT

  return run
