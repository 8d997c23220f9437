"""Model parameters straight into their sharded layout: eval_shape → shardings → jitted init."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llama_jax.parallel import sharding
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.model import factory

Params = Any


def _dummy_tokens():
  return jnp.zeros((1, 1), jnp.int32)


def abstract_params(config: ModelConfig) -> Params:
  """Shapes/dtypes of the params (boxed with their logical axes), without allocating anything."""
  model = factory.make_model(config)
  return jax.eval_shape(model.init, jax.random.key(0), _dummy_tokens())["params"]


def param_shardings(config: ModelConfig, mesh: Mesh) -> Params:
  """NamedShardings for the (unboxed) param tree on `mesh`."""
  sharding.validate(config, mesh)
  return sharding.shardings_of(abstract_params(config), mesh, sharding.logical_rules(config, mesh))


def abstract_sharded_params(config: ModelConfig, mesh: Mesh) -> Params:
  """Unboxed ShapeDtypeStructs carrying their shardings on `mesh`: a restore target, allocating nothing."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(abstract_params(config)), param_shardings(config, mesh))


@functools.lru_cache(maxsize=8)
def _jitted_init(config: ModelConfig, mesh: Mesh):
  # Cached: a fresh closure per call would be traced and compiled again for the same config and mesh.
  model = factory.make_model(config)

  def init(rng):
    return nn.unbox(model.init(rng, _dummy_tokens())["params"])

  return jax.jit(init, out_shardings=param_shardings(config, mesh))


def init_params(config: ModelConfig, mesh: Mesh, rng: jax.Array) -> Params:
  """Random params created directly in their shards: no device ever holds the whole model."""
  return _jitted_init(config, mesh)(rng)


def count_params(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))


def reward_params_from_lm(lm_params: Params, config: ModelConfig, mesh: Mesh, rng: jax.Array) -> Params:
  """A language model's params (laid out on `mesh`, e.g. from interop/init_from.load_pretrained with
  `head="lm"`) as the start of the reward model `config` (head="reward", same shape): the trunk is kept,
  the output layer dropped, and a fresh scalar head drawn as the model's init draws it (Llama 3 §4.1.2
  trains the reward model on top of the pre-trained checkpoint)."""
  if config.head != "reward":
    raise ConfigError(f"reward_params_from_lm: ModelConfig.head is {config.head!r}; pass the reward "
                     "model's config (head='reward').")
  shardings = param_shardings(config, mesh)
  d = config.dim
  draw = lambda r: nn.initializers.normal(stddev=d**-0.5)(r, (d,), config.param_dtype)
  params = {k: v for k, v in lm_params.items() if k != "lm_head"}
  params["reward_head"] = jax.jit(draw, out_shardings=shardings["reward_head"])(rng)
  want, got = jax.tree.structure(shardings), jax.tree.structure(params)
  if want != got:
    raise ConfigError(f"reward_params_from_lm: the LM params do not fit the reward model's ModelConfig "
                      f"(tree {got} vs {want}); load the LM with the same shape fields.")
  return params
