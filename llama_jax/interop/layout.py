"""The name/layout table shared by the HF and Meta importers, and the sharded assembly of params.

HF layout (per layer i, `model.layers.{i}.`): self_attn.{q,k,v,o}_proj.weight [out, in],
mlp.{gate,up,down}_proj.weight, input_layernorm.weight, post_attention_layernorm.weight; plus
model.embed_tokens.weight, model.norm.weight and lm_head.weight (absent when tied). Readers present
their tensors under these names and in this layout (the Meta reader converts on the fly).

Assembly reads and converts each tensor once per host, fills the host shards of every addressable
device from it, and hands those to the devices: host memory peaks at one leaf's local shards (the
largest is an MLP stack), never the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.model import params as params_lib


class Reader(Protocol):
  config_file: str  # named in shape errors: the file that promised the shapes

  def shape(self, key: str) -> tuple[int, ...] | None: ...  # None: no such tensor

  def file_of(self, key: str) -> str: ...

  def get(self, key: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple[str, ...]  # where the leaf lives in our param tree
  hf_key: str  # '{i}' stands for the layer index of stacked leaves
  hf_shape: tuple[int, ...]  # of one (layer's) tensor, in HF's layout
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf_key


def read_json(path: str, name: str, expected: str, fix: str) -> tuple[str, Any]:
  """(file, parsed JSON) of `path`/`name`, a checkpoint's config file; each way it can be missing or
  broken is one ConfigError. `expected` says what `path` should be, `fix` what to do about a broken file."""
  if not os.path.isdir(path):
    raise ConfigError(f"{path}: no such directory; give {expected}.")
  cfg_file = os.path.join(path, name)
  if not os.path.exists(cfg_file):
    raise ConfigError(f"{path}: no {name}; expected {expected}.")
  try:
    with open(cfg_file) as f:
      return cfg_file, json.load(f)
  except ValueError as e:
    raise ConfigError(f"{cfg_file}: not JSON ({e}); {fix}") from None


def interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
  """q/k rows of each head from RoPE's interleaved pairs (Meta's layout, and llama.cpp's GGUF) to HF's
  halves (`rotate_half`): HF convert_llama_weights_to_hf `permute`, the inverse of llama.cpp's."""
  out, d = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(out, d)


def table(config: ModelConfig) -> list[Entry]:
  v, d, f = config.vocab_size, config.dim, config.mlp_dim
  k, g, h = config.num_kv_heads, config.q_per_kv, config.head_dim
  layer = "model.layers.{i}."
  same = lambda x: x
  t = lambda x: x.T
  entries = [
      Entry(("embedding",), "model.embed_tokens.weight", (v, d), same, same),
      Entry(("final_norm", "scale"), "model.norm.weight", (d,), same, same),
      Entry(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", (d,), same, same),
      Entry(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", (d,), same, same),
      # q_proj rows are query heads n = k*G + g, each H wide: an explicit K×G split.
      Entry(("layers", "attn", "wq"), layer + "self_attn.q_proj.weight", (k * g * h, d),
            lambda x: x.T.reshape(d, k, g, h), lambda x: x.reshape(d, k * g * h).T),
      Entry(("layers", "attn", "wk"), layer + "self_attn.k_proj.weight", (k * h, d),
            lambda x: x.T.reshape(d, k, h), lambda x: x.reshape(d, k * h).T),
      Entry(("layers", "attn", "wv"), layer + "self_attn.v_proj.weight", (k * h, d),
            lambda x: x.T.reshape(d, k, h), lambda x: x.reshape(d, k * h).T),
      Entry(("layers", "attn", "wo"), layer + "self_attn.o_proj.weight", (d, k * g * h),
            lambda x: x.T.reshape(k, g, h, d), lambda x: x.reshape(k * g * h, d).T),
      Entry(("layers", "mlp", "w_gate"), layer + "mlp.gate_proj.weight", (f, d), t, t),
      Entry(("layers", "mlp", "w_up"), layer + "mlp.up_proj.weight", (f, d), t, t),
      Entry(("layers", "mlp", "w_down"), layer + "mlp.down_proj.weight", (d, f), t, t),
  ]
  if not config.tie_embeddings:
    entries.append(Entry(("lm_head",), "lm_head.weight", (v, d), t, t))
  return entries


def keys(entry: Entry, config: ModelConfig) -> list[str]:
  return [entry.hf_key.format(i=i) for i in range(config.num_layers)] if entry.stacked else [entry.hf_key]


def check_shapes(reader: Reader, config: ModelConfig) -> None:
  """Every tensor of every layer present with the shape the config implies, before anything is read."""
  for entry in table(config):
    for key in keys(entry, config):
      got = reader.shape(key)
      if got is None:
        raise ConfigError(f"the checkpoint has no tensor {key} that {reader.config_file} implies; "
                          f"use the {reader.config_file} that came with these weights.")
      if tuple(got) != entry.hf_shape:
        raise ConfigError(f"{reader.file_of(key)}: tensor {key} has shape {tuple(got)}, but "
                          f"{reader.config_file} implies {entry.hf_shape}; the weights and "
                          f"{reader.config_file} are of different models: use the pair that belongs together.")


def _key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
  return tuple(s.indices(n) for s, n in zip(index, shape))  # slices are not hashable in 3.11


def _build(reader: Reader, entry: Entry, target: jax.ShapeDtypeStruct, config: ModelConfig) -> jax.Array:
  dtype = np.dtype(target.dtype)
  shape = tuple(target.shape)
  index_map = target.sharding.addressable_devices_indices_map(shape)

  def read(key: str) -> np.ndarray:  # once per tensor per host; fp32 for the conversion, then param dtype
    return entry.to_ours(np.asarray(reader.get(key), dtype=np.float32)).astype(dtype)

  # Devices that hold the same shard (replicas) share one host buffer.
  shards = {_key(index, shape): index for index in index_map.values()}
  if not entry.stacked:
    full = read(entry.hf_key)
    bufs = {k: full[index] for k, index in shards.items()}
    del full
  else:
    layers = range(config.num_layers)
    bufs = {k: np.empty([len(range(*s)) for s in k], dtype) for k in shards}
    needed = sorted({i for index in shards.values() for i in layers[index[0]]})
    for i in needed:
      x = read(entry.hf_key.format(i=i))
      for k, index in shards.items():
        mine = layers[index[0]]
        if i in mine:
          bufs[k][mine.index(i)] = x[index[1:]]
  arrays = [jax.device_put(bufs[_key(index, shape)], d) for d, index in index_map.items()]
  return jax.make_array_from_single_device_arrays(shape, target.sharding, arrays)


def assemble(reader: Reader, config: ModelConfig, mesh: Mesh) -> dict:
  """Params laid out on `mesh`, read from `reader` once per tensor per host."""
  check_shapes(reader, config)
  target = params_lib.abstract_sharded_params(config, mesh)
  out: dict = {}
  for entry in table(config):
    set_path(out, entry.path, _build(reader, entry, get_path(target, entry.path), config))
  return out


def get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def set_path(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value
