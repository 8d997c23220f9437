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
