"""llama_jax's own params-only format: an Orbax checkpoint of the params + model_config.json beside it.

What `experiments/convert.py --to_format=orbax` writes and `--init_from=orbax:/path` reads. (The
training checkpoints with optimizer state and data position are llama_jax.training.checkpoint's.)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from llama_jax import config as config_lib
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.interop import layout
from llama_jax.model import params as params_lib

CONFIG_FILE = "model_config.json"


def save_params(path: str, params: Any, config: ModelConfig) -> None:
  """Model weights alone (no optimizer), with the ModelConfig beside them."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{path} is a file; give a directory (new or empty) to write the params into.")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(config), f, indent=2)


def read_config(path: str) -> ModelConfig:
  fix = "re-export the params with experiments/convert.py --to_format=orbax."
  cfg_file, fields = layout.read_json(os.path.abspath(path), CONFIG_FILE,
                                      "a directory written by experiments/convert.py --to_format=orbax", fix)
  try:
    return config_lib.from_dict(fields)
  except (ValueError, TypeError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{cfg_file}: not a ModelConfig ({e}); re-export the params with "
                      "experiments/convert.py --to_format=orbax.") from None


def restore_params(path: str, config: ModelConfig, mesh: jax.sharding.Mesh) -> Any:
  """The params saved by `save_params`, as `config` (its param_dtype) lays them out on `mesh`."""
  target = params_lib.abstract_sharded_params(config, mesh)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(path), "params"), target)


def load_params(path: str, mesh: jax.sharding.Mesh) -> tuple[ModelConfig, Any]:
  """(config, params) saved by `save_params`, laid out on `mesh`."""
  config = read_config(path)
  return config, restore_params(path, config, mesh)
