"""Cache-free sampling: the oracle of the KV-cache generator (llama_jax/inference/generate.py).

No KV cache: each new token re-runs the model over a fixed-length buffer, so the whole loop is one
compiled program; causality makes the not-yet-written tail of the buffer invisible. Quadratic in the
length: use generate.py, which the tests hold equal to this token for token.

`next_token` (greedy, temperature, top-k, top-p) is shared by both samplers, with one key per new
token, split from the caller's as `rng, key = split(rng)`: same key, same logits, same token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from llama_jax.errors import ConfigError
from llama_jax.config import ModelConfig
from llama_jax.model import factory


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if temperature < 0:
    raise ConfigError(f"--temperature={temperature}: must be >= 0 (0: greedy).")
  if top_k < 0:
    raise ConfigError(f"--top_k={top_k}: must be >= 0 (0: no top-k filter).")
  if not 0 < top_p <= 1:
    raise ConfigError(f"--top_p={top_p}: must be in (0, 1] (1: no nucleus filter).")


def check_prompts(config: ModelConfig, prompts: list[list[int]], max_new_tokens: int) -> int:
  """The buffer length prompt + new tokens, after checking the prompts fit."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("generate: every prompt needs at least one token (e.g. BOS).")
  length = max(len(p) for p in prompts) + max_new_tokens
  if length > config.max_seq_len:
    raise ConfigError(f"prompt + max_new_tokens = {length} exceeds ModelConfig.max_seq_len="
                      f"{config.max_seq_len}; shorten the prompt or --sample_tokens.")
  return length


def filter_logits(logits_BV: Float[Array, "B V"], temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> Float[Array, "B V"]:
  """Logits / temperature, with -inf outside the top k and outside the nucleus (the smallest set of
  most likely tokens whose probability reaches top_p; Holtzman et al. 2019). Ties at either boundary are
  kept. Needs temperature > 0."""
  # fp32 whatever the model's dtype: the nucleus is a cumulative sum of probabilities.
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # A token is in the nucleus when the tokens above it hold less than top_p (so the first always is).
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_B = jnp.sum(before_BV < top_p, axis=-1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, kept_B[:, None] - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def next_token(key: jax.Array, logits_BV: Float[Array, "B V"], temperature: float, top_k: int = 0,
               top_p: float = 1.0) -> Int[Array, "B"]:
  """Greedy (temperature 0: argmax, the key unused) or a draw from the filtered softmax."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits_BV, temperature, top_k, top_p)).astype(jnp.int32)


def generate(config: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, rng: jax.Array | None = None, stop_id: int | None = None,
             pad_id: int = 0, top_k: int = 0, top_p: float = 1.0) -> list[list[int]]:
  """Continue each prompt by up to `max_new_tokens` tokens; returns only the new tokens."""
  check_sampling(temperature, top_k, top_p)
  length = check_prompts(config, prompts, max_new_tokens)
  buf = np.full((len(prompts), length), pad_id, np.int32)
  for i, p in enumerate(prompts):
    buf[i, : len(p)] = p
  lens = np.array([len(p) for p in prompts], np.int32)
  rng = jax.random.key(0) if rng is None else rng
  out = _generate(config, max_new_tokens, float(temperature), int(top_k), float(top_p))(
      params, jnp.asarray(buf), jnp.asarray(lens), rng)
  out = np.asarray(out)
  result = []
  for i, p in enumerate(prompts):
    new = out[i, len(p): len(p) + max_new_tokens].tolist()
    if stop_id is not None and stop_id in new:
      new = new[: new.index(stop_id)]
    result.append(new)
  return result


def _generate(config: ModelConfig, max_new_tokens: int, temperature: float, top_k: int, top_p: float):
  model = factory.make_model(config)

  @jax.jit
  def run(params, buf_BT, lens_B, rng):
    def step(i, carry):
      buf_BT, rng = carry
      logits_BTV = model.apply({"params": params}, buf_BT)
      at_B = lens_B + i - 1  # position whose logits predict the next token
      logits_BV = jnp.take_along_axis(logits_BTV, at_B[:, None, None], axis=1)[:, 0]
      rng, key = jax.random.split(rng)
      next_B = next_token(key, logits_BV, temperature, top_k, top_p)
      buf_BT = buf_BT.at[jnp.arange(buf_BT.shape[0]), at_B + 1].set(next_B.astype(buf_BT.dtype))
      return buf_BT, rng

    buf_BT, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buf_BT, rng))
    return buf_BT

  return run
