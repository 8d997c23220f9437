"""Generation with a KV cache: one jitted program of a prefill and a `while_loop` of decode steps.

Prompts are right-padded into one [B, T] buffer (each row's tokens at row indices 0..len-1, as in
training, so RoPE positions and the cache slots are the row indices). The prefill runs the whole
buffer once and writes every slot 0..T-1; the padding it writes past a row's prompt is never seen
(the causal mask hides slots past the query) and is overwritten as that row's new tokens arrive. Each
decode step feeds every row its last token at its own row index len_b + i - 1: one token per row per
step, whatever the prompt lengths. A row that emits a stop token is done: it emits `pad_id` from then
on, and the loop ends when every row is done (or after `max_new_tokens`).

Sampling is `sample.next_token` with the same key sequence as the cache-free sampler
(llama_jax/inference/sample.py), which stays the oracle: the tests hold the two equal token for token.
`rng` may instead be one key per prompt ([B] keys): each row then splits its own key, so a row's draws
depend only on its key and its prompt, not on which rows share the batch (rejection sampling seeds each
(prompt, sample) this way).
On a mesh the params keep their layout and the cache is laid out by the rules table (B over the batch
axes, K over `tensor`); the batch is padded to a multiple of the data-parallel degree.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.inference import sample
from llama_jax.model import cache as kv_cache, factory
from llama_jax.parallel import sharding


def generate(config: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng: jax.Array | None = None,
             stop_ids: Sequence[int] = (), pad_id: int = 0, mesh: Mesh | None = None) -> list[list[int]]:
  """Continue each prompt by up to `max_new_tokens` tokens; returns the new tokens, up to (without) the
  first stop token. temperature 0 is greedy; top_k 0 and top_p 1 filter nothing."""
  new_BE, _ = generate_tokens(config, params, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, rng=rng, stop_ids=stop_ids, pad_id=pad_id, mesh=mesh)
  out = []
  for row in new_BE.tolist():
    cut = [i for i, t in enumerate(row) if t in stop_ids]
    out.append(row[: cut[0]] if cut else row)
  return out


def generate_tokens(config: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int, *,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    rng: jax.Array | None = None, stop_ids: Sequence[int] = (), pad_id: int = 0,
                    mesh: Mesh | None = None) -> tuple[np.ndarray, int]:
  """(new_BE: the new tokens [len(prompts), max_new_tokens], stop tokens included and `pad_id` after
  them; the number of tokens the loop produced per row before every row was done).
  `rng`: one key for the batch, or [len(prompts)] keys, one per row (see the module docstring)."""
  sample.check_sampling(temperature, top_k, top_p)
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens}: generate at least 1 token (--max_new_tokens, "
                      "--sample_tokens).")
  length = sample.check_prompts(config, prompts, max_new_tokens)
  rows = len(prompts)
  rng = jax.random.key(0) if rng is None else rng
  per_row = rng.ndim == 1
  if per_row and rng.shape[0] != rows:
    raise ConfigError(f"generate: {rng.shape[0]} keys for {rows} prompts; give one key, or one per prompt.")
  if mesh is not None and mesh.shape["context"] > 1:
    raise ConfigError(f"generation splits no sequence, but the mesh has --mesh_context="
                      f"{mesh.shape['context']}; use --mesh_context=1.")
  if mesh is not None:  # a whole number of rows per data-parallel device; the extra rows are dropped
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    prompts = list(prompts) + [prompts[-1]] * (-rows % n)
    if per_row:
      rng = jnp.concatenate([rng, jnp.repeat(rng[-1:], -rows % n, axis=0)])
  buf_BT = np.full((len(prompts), max(len(p) for p in prompts)), pad_id, np.int32)
  for i, p in enumerate(prompts):
    buf_BT[i, : len(p)] = p
  lens_B = np.array([len(p) for p in prompts], np.int32)
  run = _program(config, mesh, max_new_tokens, length, float(temperature), int(top_k), float(top_p),
                 tuple(int(s) for s in stop_ids), int(pad_id), per_row)
  context = (sharding.use(mesh, sharding.logical_rules(config, mesh)) if mesh is not None
             else contextlib.nullcontext())
  with context:
    new_BE, steps = run(params, buf_BT, lens_B, rng)
  return np.asarray(new_BE)[:rows], int(steps)


@functools.lru_cache(maxsize=16)
def _program(config: ModelConfig, mesh: Mesh | None, max_new_tokens: int, length: int, temperature: float,
             top_k: int, top_p: float, stop_ids: tuple[int, ...], pad_id: int, per_row: bool = False):
  # Cached per settings (and mesh: the logical constraints resolve against it when traced).
  del mesh
  model = factory.make_model(config)

  def prefill(params, tokens_BT, cache):
    return model.apply({"params": params}, tokens_BT, cache=cache)

  def decode(params, tokens_B, index_B, cache):
    logits_BTV, cache = model.apply({"params": params}, tokens_B[:, None], row_index_BT=index_B[:, None],
                                    cache=cache)
    return logits_BTV[:, 0], cache

  def draw(rng, logits_BV):
    if not per_row:
      rng, key = jax.random.split(rng)
      return rng, sample.next_token(key, logits_BV, temperature, top_k, top_p)
    # One key per row, split as a lone row's would be: vmapped draws equal the unbatched ones.
    rng_B2 = jax.vmap(jax.random.split)(rng)
    def one(key, logits_V):
      return sample.next_token(key, logits_V[None], temperature, top_k, top_p)[0]

    return rng_B2[:, 0], jax.vmap(one)(rng_B2[:, 1], logits_BV)

  def emit(i, logits_BV, rng, done_B, new_BE):
    rng, tokens_B = draw(rng, logits_BV)
    tokens_B = jnp.where(done_B, pad_id, tokens_B)
    new_BE = jax.lax.dynamic_update_slice_in_dim(new_BE, tokens_B[:, None], i, axis=1)
    return tokens_B, rng, done_B | jnp.isin(tokens_B, jnp.asarray(stop_ids, jnp.int32)), new_BE

  @jax.jit
  def run(params, prompt_BT, lens_B, rng):
    b = prompt_BT.shape[0]
    logits_BTV, cache = prefill(params, prompt_BT, kv_cache.init(config, b, length))
    logits_BV = jnp.take_along_axis(logits_BTV, (lens_B - 1)[:, None, None], axis=1)[:, 0]
    new_BE = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    carry = emit(0, logits_BV, rng, jnp.zeros((b,), bool), new_BE)

    def unfinished(c):
      i, _, _, done_B, _, _ = c
      return (i < max_new_tokens) & ~jnp.all(done_B)

    def step(c):  # token i - 1 (at row index len + i - 1) in, token i out
      i, tokens_B, rng, done_B, new_BE, cache = c
      logits_BV, cache = decode(params, tokens_B, lens_B + i - 1, cache)
      return (i + 1, *emit(i, logits_BV, rng, done_B, new_BE), cache)

    steps, _, _, _, new_BE, _ = jax.lax.while_loop(unfinished, step, (jnp.int32(1), *carry, cache))
    return new_BE, steps

  return run
