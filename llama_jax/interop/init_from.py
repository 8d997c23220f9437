"""`--init_from=hf:/path|meta:/path|gguf:/file.gguf|orbax:/path`: pretrained weights, laid out on the mesh."""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh

from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.interop import gguf, hf, layout, meta, orbax

FORMS = ("hf:/path (Hugging Face), meta:/path (Meta consolidated), gguf:/file.gguf (llama.cpp) or orbax:/path "
         "(convert.py --to_format=orbax)")
# The fields that fix the params' shapes and meaning; the run keeps its own dtypes, scan, remat,
# attention implementation and max_seq_len.
SHAPE_FIELDS = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                "tie_embeddings", "rope_theta", "rope_scaling", "norm_eps", "head")


def parse(spec: str) -> tuple[str, str]:
  kind, sep, path = spec.partition(":")
  if not sep or kind not in ("hf", "meta", "gguf", "orbax") or not path:
    raise ConfigError(f"--init_from={spec!r}: expected {FORMS}.")
  return kind, path


def differences(loaded: ModelConfig, expect: ModelConfig) -> list[str]:
  return [f"{f} {getattr(loaded, f)!r} (checkpoint) vs {getattr(expect, f)!r} (run)"
          for f in SHAPE_FIELDS if getattr(loaded, f) != getattr(expect, f)]


_READ_CONFIG = {"hf": hf.read_config, "meta": meta.read_config, "gguf": gguf.read_config,
                "orbax": orbax.read_config}


def read_config(spec: str) -> ModelConfig:
  """The model config a checkpoint holds (no weights are read)."""
  kind, path = parse(spec)
  try:
    return _READ_CONFIG[kind](path)
  except ConfigError as e:
    raise ConfigError(f"--init_from={spec}: {e}") from None


def adopt_shape(spec: str, run_model: ModelConfig) -> ModelConfig:
  """`run_model` with the checkpoint's shape (SHAPE_FIELDS): the weights decide what the model is, the
  run keeps its execution choices (dtypes, scan, remat, attention implementation, max_seq_len)."""
  loaded = read_config(spec)
  return dataclasses.replace(run_model, **{f: getattr(loaded, f) for f in SHAPE_FIELDS})


def load_pretrained(spec: str, mesh: Mesh, *, expect: ModelConfig | None = None) -> tuple[ModelConfig, Any]:
  """(config, params on `mesh`) from `spec`.

  With `expect` (the run's config), the checkpoint must be that model (SHAPE_FIELDS); the params then
  come in `expect`'s param_dtype and the returned config is `expect`.
  """
  kind, path = parse(spec)
  try:
    config = _READ_CONFIG[kind](path)
    if expect is not None:
      diff = differences(config, expect)
      if diff:
        raise ConfigError(f"holds another model than the run's: {'; '.join(diff)}; choose the run's "
                          "model flags to match the checkpoint, or another checkpoint.")
      config = expect
    if kind == "orbax":
      return config, orbax.restore_params(path, config, mesh)
    reader = (hf.SafetensorsReader(path) if kind == "hf" else gguf.GGUFReader(path, config) if kind == "gguf"
              else meta.MetaReader(path, config))
    return config, layout.assemble(reader, config, mesh)
  except ConfigError as e:
    raise ConfigError(f"--init_from={spec}: {e}") from None
