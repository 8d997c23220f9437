"""Meta's original Llama checkpoints in: params.json + consolidated.*.pth (model-parallel shards).

The reader presents Meta's tensors under HF's names and layout (layout.table), so both importers share
one assembly. Meta's layout rotates adjacent pairs with RoPE; HF's converter permutes each head's q/k
rows to evens-then-odds (`rotate_half`), and so do we on import.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Mapping

import numpy as np
from jax.sharding import Mesh

from llama_jax.config import PRESETS, ModelConfig, RopeScaling, ffn_dim
from llama_jax.errors import ConfigError
from llama_jax.interop import layout


class MetaReader:
  """Meta consolidated.*.pth (model-parallel shards concatenated), presented under HF names/layout."""

  config_file = "params.json"
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
      import torch  # noqa: PLC0415 (Meta's checkpoints are torch pickles: only this path needs torch)
    except ImportError:
      raise ConfigError("reading Meta's consolidated.*.pth needs PyTorch: pip install torch") from None
    self._files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not self._files:
      raise ConfigError(f"{path}: no consolidated.*.pth files there; expected Meta's checkpoint "
                        "directory (params.json + consolidated.*.pth).")
    self._shards = []
    for f in self._files:
      try:
        self._shards.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
      except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError on corrupt files
        raise ConfigError(f"{f}: not a readable torch checkpoint ({e}); the file is truncated or corrupt: "
                          "download it again.") from None
    self._config = config

  def _meta_key(self, key: str) -> tuple[str, int | None]:
    if key in self._TOP:
      return self._TOP[key]
    prefix, rest = key[len("model.layers."):].split(".", 1)
    meta, dim = self._NAMES[rest]
    return f"layers.{prefix}.{meta}", dim

  def _parts(self, key: str):
    meta, dim = self._meta_key(key)
    return [s.get(meta) for s in (self._shards if dim is not None else self._shards[:1])], dim

  def shape(self, key: str) -> tuple[int, ...] | None:
    parts, dim = self._parts(key)
    if any(p is None for p in parts):
      return None
    shape = list(parts[0].shape)
    if dim is not None and len(shape) > dim:
      shape[dim] = sum(p.shape[dim] for p in parts)
    return tuple(shape)

  def file_of(self, key: str) -> str:
    return ", ".join(self._files) if len(self._files) < 3 else f"{self._files[0]} ... ({len(self._files)} files)"

  def get(self, key: str) -> np.ndarray:
    parts, dim = self._parts(key)
    parts = [p.float().numpy() for p in parts]
    w = np.concatenate(parts, axis=dim) if len(parts) > 1 else parts[0]
    if key.endswith("q_proj.weight"):
      w = layout.interleaved_to_halves(w, self._config.num_heads)
    elif key.endswith("k_proj.weight"):
      w = layout.interleaved_to_halves(w, self._config.num_kv_heads)
    return w


def config_from_meta(meta: Mapping[str, Any], rope_scaling_factor: float | None = None,
                     **overrides) -> ModelConfig:
  """ModelConfig from Meta's params.json.

  params.json only says `use_scaled_rope`; Meta's code then hard-codes factor 8, which is wrong for
  3.2-1B/3B (32). Pass `rope_scaling_factor`, or the factor of the published preset of the same shape is
  used (8 if none matches).
  """
  try:
    d, n = meta["dim"], meta["n_heads"]
    fields = dict(
        vocab_size=meta["vocab_size"], dim=d, num_layers=meta["n_layers"], num_heads=n,
        num_kv_heads=meta.get("n_kv_heads") or n, head_dim=d // n,
        mlp_dim=ffn_dim(d, meta.get("ffn_dim_multiplier") or 1.0, meta["multiple_of"]),
        norm_eps=meta["norm_eps"], rope_theta=float(meta.get("rope_theta", 500_000.0)),
        tie_embeddings=d in (2048, 3072) and meta["n_layers"] in (16, 28))
  except KeyError as e:
    raise ConfigError(f"params.json has no {e.args[0]!r}; use the params.json that came with the "
                      "weights.") from None
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


def read_config(path: str, rope_scaling_factor: float | None = None, **config_overrides) -> ModelConfig:
  _, meta = layout.read_json(path, "params.json",
                             "Meta's checkpoint directory (params.json + consolidated.*.pth)",
                             "use the params.json that came with the weights.")
  return config_from_meta(meta, rope_scaling_factor, **config_overrides)


def load_meta(path: str, mesh: Mesh, rope_scaling_factor: float | None = None,
              **config_overrides) -> tuple[ModelConfig, dict]:
  """Meta's original checkpoint directory (params.json + consolidated.*.pth) → (config, params)."""
  config = read_config(path, rope_scaling_factor, **config_overrides)
  return config, layout.assemble(MetaReader(path, config), config, mesh)
