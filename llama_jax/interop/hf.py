"""Hugging Face Llama checkpoints in and out: config.json + safetensors (one file, or shards + index).

Import reads with `safetensors.safe_open` (bf16 arrives as ml_dtypes.bfloat16), each tensor once per
host, straight into the sharded layout (layout.assemble). Export writes one tensor at a time into
size-capped shards with an index, config.json and generation_config.json, as `save_pretrained` does.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.errors import ConfigError
from llama_jax.interop import layout

LLAMA3_BOS_ID = 128000  # <|begin_of_text|>
LLAMA3_EOS_ID = 128001  # <|end_of_text|>: the base models' EOS (instruct models add 128008, 128009)
INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- configs
def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from a HF LlamaConfig dict (config.json)."""
  if hf.get("model_type", "llama") != "llama":
    raise ConfigError(f"config.json: model_type={hf.get('model_type')!r}; only 'llama' can be imported.")
  rs = hf.get("rope_scaling") or hf.get("rope_parameters")
  scaling = None
  if rs and rs.get("rope_type", rs.get("type")) == "llama3":
    scaling = RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                          high_freq_factor=float(rs["high_freq_factor"]),
                          original_max_position=int(rs["original_max_position_embeddings"]))
  elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
    raise ConfigError(f"config.json: rope_scaling type {rs.get('rope_type')!r} is not Llama 3's "
                      "('llama3'); only that and no scaling are supported.")
  theta = hf.get("rope_theta", (rs or {}).get("rope_theta", 10_000.0))
  try:
    n = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=n, num_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n, mlp_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 8192),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  except KeyError as e:
    raise ConfigError(f"config.json has no {e.args[0]!r}; it is not a LlamaConfig: use the config.json "
                      "that came with the weights.") from None
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ConfigError("config.json: attention_bias/mlp_bias are set; Llama 3 has no biases.")
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(config: ModelConfig, torch_dtype: str = "float32", bos_id: int = LLAMA3_BOS_ID,
                 eos_id: int | Sequence[int] = LLAMA3_EOS_ID) -> dict[str, Any]:
  """A config.json that transformers' LlamaConfig reads back to the same model."""
  s = config.rope_scaling
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
      "hidden_act": "silu", "max_position_embeddings": config.max_seq_len,
      "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
      "rope_scaling": None if s is None else {
          "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
          "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position},
      "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
      "bos_token_id": bos_id, "eos_token_id": _ids(eos_id), "torch_dtype": torch_dtype,
  }


def _ids(x: int | Sequence[int]) -> int | list[int]:
  return int(x) if isinstance(x, (int, np.integer)) else [int(i) for i in x]


# ----------------------------------------------------------------------------- reading
class SafetensorsReader:
  """The tensors of one checkpoint directory (one file, or the shards its index names)."""

  config_file = "config.json"

  def __init__(self, path: str):
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
      try:
        with open(index) as f:
          files = sorted(set(json.load(f)["weight_map"].values()))
      except (ValueError, KeyError) as e:
        raise ConfigError(f"{index}: not a safetensors index ({e}); re-download it, or delete it if "
                          "the directory holds a single model.safetensors.") from None
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      raise ConfigError(f"{path}: no *.safetensors files there; expected a Hugging Face checkpoint "
                        "directory (config.json + model*.safetensors).")
    from safetensors import safe_open  # noqa: PLC0415 (only importers need it)

    self._file: dict[str, str] = {}
    self._handles: dict[str, Any] = {}
    for name in files:
      fname = os.path.join(path, name)
      try:
        handle = safe_open(fname, framework="numpy")
      except Exception as e:  # SafetensorError (corrupt/truncated), FileNotFoundError (index names a lost shard)
        raise ConfigError(f"{fname}: not a readable safetensors file ({e}); the file is truncated or "
                          "corrupt: download or export it again.") from None
      self._handles[fname] = handle
      for key in handle.keys():
        self._file[key] = fname

  def shape(self, key: str) -> tuple[int, ...] | None:
    if key not in self._file:
      return None
    return tuple(self._handles[self._file[key]].get_slice(key).get_shape())

  def file_of(self, key: str) -> str:
    return self._file[key]

  def get(self, key: str) -> np.ndarray:
    try:
      return self._handles[self._file[key]].get_tensor(key)
    except Exception as e:  # a header that passed but data that does not decode
      raise ConfigError(f"{self._file[key]}: tensor {key} cannot be read ({e}); the file is corrupt: "
                        "download or export it again.") from None


def read_config(path: str, **config_overrides) -> ModelConfig:
  _, hf = layout.read_json(path, "config.json",
                           "a Hugging Face checkpoint directory (config.json + model*.safetensors)",
                           "use the config.json that came with the weights.")
  return config_from_hf(hf, **config_overrides)


def load_hf(path: str, mesh: Mesh, **config_overrides) -> tuple[ModelConfig, dict]:
  """A Hugging Face Llama checkpoint directory → (ModelConfig, params sharded over `mesh`)."""
  config = read_config(path, **config_overrides)
  return config, layout.assemble(SafetensorsReader(path), config, mesh)


# ----------------------------------------------------------------------------- writing
def _host_tensors(params, config: ModelConfig) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
  """(HF key, thunk) in file order; a thunk gathers one layer's tensor to the host."""
  for entry in layout.table(config):
    leaf = layout.get_path(params, entry.path)
    layers = range(config.num_layers) if entry.stacked else [None]
    for i in layers:
      def fetch(leaf=leaf, i=i, entry=entry):
        x = leaf if i is None else leaf[i]
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
          from jax.experimental import multihost_utils  # noqa: PLC0415
          x = multihost_utils.process_allgather(x)
        return entry.to_hf(np.asarray(jax.device_get(x), np.float32))
      yield entry.hf_key.format(i=i), fetch


def _is_weight_file(name: str) -> bool:  # of an earlier export, or left by one cut short
  return ((name.startswith("model") and name.endswith(".safetensors")) or name == INDEX
          or (name.startswith("_shard") and name.endswith(".tmp")))


def save_hf(params, config: ModelConfig, path: str, dtype: str = "bfloat16",
            max_shard_bytes: int = 5 * 2**30, *, bos_id: int = LLAMA3_BOS_ID,
            eos_id: int | Sequence[int] = LLAMA3_EOS_ID) -> None:
  """Write `params` as a HF checkpoint: config.json, generation_config.json, safetensors shards + index.

  The weight files of an earlier export into `path` (shards, index) are replaced, never mixed in.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415

  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{path} is a file; give a directory (new or existing) to write the checkpoint into.")
  np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[dtype]
  write = jax.process_index() == 0
  os.makedirs(path, exist_ok=True)
  if write and os.path.exists(os.path.join(path, INDEX)):
    os.remove(os.path.join(path, INDEX))  # first, so no reader pairs the old index with new shards
  shard: dict[str, np.ndarray] = {}
  n_files, size = 0, 0
  weight_map: dict[str, int] = {}

  def flush():
    if write and shard:
      save_file(shard, os.path.join(path, f"_shard{n_files}.tmp"), metadata={"format": "pt"})

  for key, fetch in _host_tensors(params, config):
    x = np.ascontiguousarray(fetch().astype(np_dtype))
    if size and size + x.nbytes > max_shard_bytes:
      flush()
      shard, n_files, size = {}, n_files + 1, 0
    shard[key] = x
    size += x.nbytes
    weight_map[key] = n_files
  flush()
  if not write:
    return
  n = n_files + 1
  names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for i, name in enumerate(names):
    os.replace(os.path.join(path, f"_shard{i}.tmp"), os.path.join(path, name))
  if n > 1:
    with open(os.path.join(path, INDEX), "w") as f:
      json.dump({"metadata": {}, "weight_map": {k: names[v] for k, v in weight_map.items()}}, f, indent=2)
  for stale in sorted(set(os.listdir(path)) - set(names) - {INDEX if n > 1 else ""}):
    if _is_weight_file(stale):
      os.remove(os.path.join(path, stale))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config, dtype, bos_id, eos_id), f, indent=2)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": int(bos_id), "eos_token_id": _ids(eos_id)}, f, indent=2)
