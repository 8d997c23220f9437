"""Import and export of Llama weights: Hugging Face safetensors, and Meta's consolidated checkpoints.

Import streams tensor by tensor into the sharded layout: each device shard is filled by a callback that
reads only the layer tensors it covers from memory-mapped files, so the host never holds the whole model.
Export writes one tensor at a time into size-capped safetensors shards with an index, as HF does.

HF layout (per layer i, `model.layers.{i}.`): self_attn.{q,k,v,o}_proj.weight [out, in],
mlp.{gate,up,down}_proj.weight, input_layernorm.weight, post_attention_layernorm.weight; plus
model.embed_tokens.weight, model.norm.weight and lm_head.weight (absent when tied).
Meta's consolidated layout rotates adjacent pairs with RoPE; HF's converter permutes each head's q/k rows
to evens-then-odds (`rotate_half`), and so do we on import.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import struct
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from llama_jax.model import params as params_lib
from llama_jax.errors import ConfigError
from llama_jax.config import ModelConfig, RopeScaling

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


# ----------------------------------------------------------------------------- the name/layout table
@dataclasses.dataclass(frozen=True)
class _Entry:
  path: tuple[str, ...]  # where the leaf lives in our param tree
  hf_key: str  # '{i}' stands for the layer index of stacked leaves
  to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
  to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf_key


def _t(x, c):
  return x.T


def _table(config: ModelConfig) -> list[_Entry]:
  d, k, g, h = config.dim, config.num_kv_heads, config.q_per_kv, config.head_dim
  layer = "model.layers.{i}."
  same = lambda x, c: x
  entries = [
      _Entry(("embedding",), "model.embed_tokens.weight", same, same),
      _Entry(("final_norm", "scale"), "model.norm.weight", same, same),
      _Entry(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", same, same),
      _Entry(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", same, same),
      # q_proj rows are query heads n = k*G + g, each H wide: an explicit K×G split.
      _Entry(("layers", "attn", "wq"), layer + "self_attn.q_proj.weight",
             lambda x, c: x.T.reshape(d, k, g, h), lambda x, c: x.reshape(d, k * g * h).T),
      _Entry(("layers", "attn", "wk"), layer + "self_attn.k_proj.weight",
             lambda x, c: x.T.reshape(d, k, h), lambda x, c: x.reshape(d, k * h).T),
      _Entry(("layers", "attn", "wv"), layer + "self_attn.v_proj.weight",
             lambda x, c: x.T.reshape(d, k, h), lambda x, c: x.reshape(d, k * h).T),
      _Entry(("layers", "attn", "wo"), layer + "self_attn.o_proj.weight",
             lambda x, c: x.T.reshape(k, g, h, d), lambda x, c: x.reshape(k * g * h, d).T),
      _Entry(("layers", "mlp", "w_gate"), layer + "mlp.gate_proj.weight", _t, _t),
      _Entry(("layers", "mlp", "w_up"), layer + "mlp.up_proj.weight", _t, _t),
      _Entry(("layers", "mlp", "w_down"), layer + "mlp.down_proj.weight", _t, _t),
  ]
  if not config.tie_embeddings:
    entries.append(_Entry(("lm_head",), "lm_head.weight", _t, _t))
  return entries


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
  n = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=n, num_kv_heads=hf.get("num_key_value_heads") or n,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n, mlp_dim=hf["intermediate_size"],
      norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=scaling,
      max_seq_len=hf.get("max_position_embeddings", 8192),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ConfigError("config.json: attention_bias/mlp_bias are set; Llama 3 has no biases.")
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
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
      "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": torch_dtype,
  }


# ----------------------------------------------------------------------------- readers
class _SafetensorsReader:
  """Memory-mapped safetensors (one file or an index of shards), bf16 included via ml_dtypes."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      raise ConfigError(f"--input={path}: no *.safetensors files there; point it at a directory "
                        "holding a Hugging Face checkpoint (config.json + model*.safetensors).")
    self._where: dict[str, tuple[np.memmap, dict]] = {}
    for name in files:
      fname = os.path.join(path, name)
      with open(fname, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
      data = np.memmap(fname, dtype=np.uint8, mode="r", offset=8 + n)
      for key, info in header.items():
        if key != "__metadata__":
          self._where[key] = (data, info)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def get(self, key: str) -> np.ndarray:
    if key not in self._where:
      raise ConfigError(f"checkpoint has no tensor {key!r}; is it a Llama checkpoint of this config?")
    data, info = self._where[key]
    if info["dtype"] not in _ST_DTYPES:
      raise ConfigError(f"tensor {key!r} has dtype {info['dtype']}; expected one of {list(_ST_DTYPES)}.")
    start, end = info["data_offsets"]
    return data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _meta_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Meta's interleaved RoPE rows → HF's halves, per head (HF convert_llama_weights_to_hf `permute`)."""
  out, d = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(out, d)


class _MetaReader:
  """Meta consolidated.*.pth (model-parallel shards concatenated), presented under HF names/layout."""

  # HF suffix → (Meta suffix, dim along which model-parallel shards were split; None = replicated).
  _NAMES = {
      "self_attn.q_proj.weight": ("attention.wq.weight", 0),
      "self_attn.k_proj.weight": ("attention.wk.weight", 0),
      "self_attn.v_proj.weight": ("attention.wv.weight", 0),
      "self_attn.o_proj.weight": ("attention.wo.weight", 1),
      "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
      "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
      "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
      "input_layernorm.weight": ("attention_norm.weight", None),
      "post_attention_layernorm.weight": ("ffn_norm.weight", None),
  }
  _TOP = {"model.embed_tokens.weight": ("tok_embeddings.weight", 0),  # VocabParallelEmbedding in Llama 3
          "model.norm.weight": ("norm.weight", None), "lm_head.weight": ("output.weight", 0)}

  def __init__(self, path: str, config: ModelConfig):
    try:
      import torch  # Meta's checkpoints are torch pickles: only this path needs torch.
    except ImportError as e:
      raise ConfigError("--input needs PyTorch to read consolidated.*.pth: pip install torch") from e
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
      raise ConfigError(f"--input={path}: no consolidated.*.pth files there.")
    self._shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    self._config = config

  def _meta_key(self, key: str):
    if key in self._TOP:
      return self._TOP[key]
    prefix, rest = key[len("model.layers."):].split(".", 1)
    meta, dim = self._NAMES[rest]
    return f"layers.{prefix}.{meta}", dim

  def __contains__(self, key: str) -> bool:
    return self._meta_key(key)[0] in self._shards[0]

  def get(self, key: str) -> np.ndarray:
    meta, dim = self._meta_key(key)
    parts = [s[meta].float().numpy() for s in (self._shards if dim is not None else self._shards[:1])]
    w = np.concatenate(parts, axis=dim) if len(parts) > 1 else parts[0]
    if key.endswith("q_proj.weight"):
      w = _meta_permute(w, self._config.num_heads)
    elif key.endswith("k_proj.weight"):
      w = _meta_permute(w, self._config.num_kv_heads)
    return w


def config_from_meta(meta: Mapping[str, Any], rope_scaling_factor: float | None = None,
                     **overrides) -> ModelConfig:
  """ModelConfig from Meta's params.json.

  params.json only says `use_scaled_rope`; Meta's code then hard-codes factor 8, which is wrong for
  3.2-1B/3B (32). Pass `rope_scaling_factor`, or the factor of the published preset of the same shape is
  used (8 if none matches).
  """
  from llama_jax.config import PRESETS, ffn_dim  # noqa: PLC0415 (kept local: only importers need it)

  d, n = meta["dim"], meta["n_heads"]
  fields = dict(
      vocab_size=meta["vocab_size"], dim=d, num_layers=meta["n_layers"], num_heads=n,
      num_kv_heads=meta.get("n_kv_heads") or n, head_dim=d // n,
      mlp_dim=ffn_dim(d, meta.get("ffn_dim_multiplier") or 1.0, meta["multiple_of"]),
      norm_eps=meta["norm_eps"], rope_theta=float(meta.get("rope_theta", 500_000.0)),
      tie_embeddings=d in (2048, 3072) and meta["n_layers"] in (16, 28))
  scaling = None
  if meta.get("use_scaled_rope"):
    if rope_scaling_factor is None:
      same = [p for p in PRESETS.values() if p.dim == d and p.num_layers == meta["n_layers"]
              and p.rope_scaling is not None]
      rope_scaling_factor = same[0].rope_scaling.factor if same else 8.0
    scaling = RopeScaling(factor=rope_scaling_factor)
  fields["rope_scaling"] = scaling
  fields.update(overrides)
  return ModelConfig(**fields)


# ----------------------------------------------------------------------------- import / export
def _assemble(reader, config: ModelConfig, mesh: Mesh):
  """Build each param leaf from its device shards; each shard reads only the layers it covers."""
  shardings = params_lib.param_shardings(config, mesh)
  abstract = params_lib.abstract_params(config)
  dtype = np.dtype(config.param_dtype)

  @functools.lru_cache(maxsize=2)  # the devices of one layer share a read
  def layer_tensor(entry: _Entry, i: int) -> np.ndarray:
    key = entry.hf_key.format(i=i)
    return entry.to_ours(np.asarray(reader.get(key), dtype=np.float32), config).astype(dtype)

  def build(entry: _Entry):
    leaf = _get(abstract, entry.path)
    shape = leaf.value.shape if hasattr(leaf, "value") else leaf.shape

    def callback(index):
      if not entry.stacked:
        return layer_tensor(entry, 0)[index]
      layers = range(config.num_layers)[index[0]]
      return np.stack([layer_tensor(entry, i)[index[1:]] for i in layers])

    expected = shape[1:] if entry.stacked else shape
    got = layer_tensor(entry, 0).shape
    if got != tuple(expected):
      raise ConfigError(f"tensor {entry.hf_key.format(i=0)} has shape {got} after conversion, the config "
                        f"expects {tuple(expected)}: config.json does not match the weights.")
    return jax.make_array_from_callback(shape, _get(shardings, entry.path), callback)

  out: dict = {}
  for entry in _table(config):
    _set(out, entry.path, build(entry))
  return out


def load_hf(path: str, mesh: Mesh, **config_overrides) -> tuple[ModelConfig, dict]:
  """A Hugging Face Llama checkpoint directory → (ModelConfig, params sharded over `mesh`)."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise ConfigError(f"--input={path}: no config.json; expected a Hugging Face checkpoint directory.")
  with open(cfg_file) as f:
    config = config_from_hf(json.load(f), **config_overrides)
  return config, _assemble(_SafetensorsReader(path), config, mesh)


def load_meta(path: str, mesh: Mesh, rope_scaling_factor: float | None = None,
              **config_overrides) -> tuple[ModelConfig, dict]:
  """Meta's original checkpoint directory (params.json + consolidated.*.pth) → (config, params)."""
  with open(os.path.join(path, "params.json")) as f:
    config = config_from_meta(json.load(f), rope_scaling_factor, **config_overrides)
  return config, _assemble(_MetaReader(path, config), config, mesh)


def _host_tensors(params, config: ModelConfig) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
  """(HF key, thunk) in file order; a thunk gathers one layer's tensor to the host."""
  for entry in _table(config):
    leaf = _get(params, entry.path)
    layers = range(config.num_layers) if entry.stacked else [None]
    for i in layers:
      def fetch(leaf=leaf, i=i, entry=entry):
        x = leaf if i is None else leaf[i]
        if not x.is_fully_addressable:
          from jax.experimental import multihost_utils  # noqa: PLC0415
          x = multihost_utils.process_allgather(x)
        return entry.to_hf(np.asarray(jax.device_get(x), np.float32), config)
      yield entry.hf_key.format(i=i), fetch


def save_hf(params, config: ModelConfig, path: str, dtype: str = "bfloat16",
            max_shard_bytes: int = 5 * 2**30) -> None:
  """Write `params` as a HF checkpoint: config.json + size-capped safetensors shards + index."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[dtype]
  write = jax.process_index() == 0
  os.makedirs(path, exist_ok=True)
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
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": {k: names[v] for k, v in weight_map.items()}}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config, dtype), f, indent=2)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value
