"""Llama-architecture GGUF files in (llama.cpp's format): the config, the weights dequantized, the tokenizer.

A GGUF file holds the model config as `llama.*` metadata, every tensor (F32/F16/BF16 or block-quantized:
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and a byte-level BPE tokenizer (`tokenizer.ggml.*`). The reader presents
the tensors under HF's names and layout (layout.table), dequantized to fp32 with the `gguf` package
(llama.cpp's own Python reader), so one assembly serves HF, Meta and GGUF. llama.cpp's converter
(convert_hf_to_gguf.py `LlamaModel.permute`) reorders each head's q/k rows from HF's halves back to
Meta's interleaved RoPE pairs; we undo that on import, as for Meta's checkpoints.

Quantized weights are dequantized once: the params are fp32 copies of what the file stores (a Q4 model
stays a Q4 model's values, now trainable), not the original full-precision checkpoint.

  python experiments/convert.py --from_format=gguf --input=/m/SmolLM2-135M-Instruct.Q4_1.gguf --output=/ckpt/o
  python experiments/pretrain.py ... --init_from=gguf:/m/SmolLM2-135M-Instruct.Q4_1.gguf --tokenizer=<same file>
"""

from __future__ import annotations

import os

import numpy as np
from jax.sharding import Mesh

from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.errors import ConfigError
from llama_jax.data.gguf_file import GGUFTokenizer, _gguf, metadata, open_gguf  # noqa: F401 (GGUFTokenizer: re-exported)
from llama_jax.interop import layout

# Dequantized by gguf.quants and round-tripped in tests/interop/test_gguf.py. K-quants (Q4_K_M, ...) are
# not: the gguf package cannot write them, so nothing here checks their dequantization.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
_FIX_TYPE = ("requantize it to Q8_0 with llama.cpp's `llama-quantize --allow-requantize IN OUT Q8_0`, or "
             "import the original Hugging Face checkpoint with hf:/path")

# HF key suffix (layout.table) → llama.cpp tensor name.
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(hf_key: str) -> str:
  if hf_key in _TOP_NAMES:
    return _TOP_NAMES[hf_key]
  i, rest = hf_key[len("model.layers."):].split(".", 1)
  return f"blk.{i}.{_LAYER_NAMES[rest]}"


# ----------------------------------------------------------------------------- config
def _llama3_rope_factors(s: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
  """What llama.cpp's converter stores as rope_freqs.weight for HF rope_type 'llama3' (Meta's formula)."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * np.pi / freqs
  smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  mid = 1.0 / ((1 - smooth) / s.factor + smooth)
  return np.where(wavelen < s.original_max_position / s.high_freq_factor, 1.0,
                  np.where(wavelen > s.original_max_position / s.low_freq_factor, s.factor, mid))


def _rope_scaling(reader, path: str, head_dim: int, theta: float) -> RopeScaling | None:
  kind = metadata(reader, "llama.rope.scaling.type")
  if kind not in (None, "none"):
    raise ConfigError(f"{path}: llama.rope.scaling.type={kind!r}; only Llama 3.1's frequency scaling "
                      "(stored as rope_freqs.weight) and no scaling can be imported.")
  t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
  if t is None:
    return None
  got = np.asarray(t.data, np.float64).reshape(-1)
  # The file keeps only the factors; Llama 3.1/3.2 all use low 1, high 4, original context 8192.
  s = RopeScaling(factor=float(got.max()))
  if got.shape != (head_dim // 2,) or not np.allclose(got, _llama3_rope_factors(s, head_dim, theta), rtol=1e-5):
    raise ConfigError(f"{path}: rope_freqs.weight is not Llama 3.1's scaling with low_freq_factor=1, "
                      "high_freq_factor=4, original_max_position=8192; import the Hugging Face checkpoint "
                      "with hf:/path instead.")
  return s


def _f32(x) -> float:
  """GGUF stores floats as fp32 (1e-5 reads 9.99999975e-06): the shortest decimal of that fp32, which is
  the value the model was published with (what hf:/path gives for the same model)."""
  return float(str(np.float32(x)))


def config_from_gguf(reader, path: str, **overrides) -> ModelConfig:
  """ModelConfig from a GGUF file's `llama.*` metadata (absent output.weight: tied embeddings)."""
  arch = metadata(reader, "general.architecture")
  if arch != "llama":
    raise ConfigError(f"{path}: general.architecture={arch!r}; only 'llama' GGUF files can be imported "
                      "(Llama, SmolLM, Mistral-7B-style decoders).")
  get = lambda key, default=None: metadata(reader, "llama." + key, default)  # noqa: E731
  try:
    n = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    fields = dict(
        dim=dim, num_layers=int(get("block_count")), num_heads=n,
        num_kv_heads=int(get("attention.head_count_kv", n)), mlp_dim=int(get("feed_forward_length")),
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(get("rope.freq_base", 10_000.0)), max_seq_len=int(get("context_length")))
  except TypeError:  # int(None): a key the file lacks
    raise ConfigError(f"{path}: llama.* metadata incomplete (needs embedding_length, block_count, "
                      "feed_forward_length, attention.head_count, attention.layer_norm_rms_epsilon, "
                      "context_length); the file was not written by llama.cpp's converter: convert it "
                      "again.") from None
  head_dim = int(get("attention.key_length", dim // n))
  rope_dim = int(get("rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise ConfigError(f"{path}: llama.rope.dimension_count={rope_dim} but head_dim={head_dim}; partial "
                      "rotary embeddings are not Llama's and cannot be imported.")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  vocab = get("vocab_size") or (len(tokens.data) if tokens is not None else None) or (
      int(embed.shape[-1]) if embed is not None else None)
  if vocab is None:
    raise ConfigError(f"{path}: no llama.vocab_size, tokenizer or token_embd.weight; not a complete model "
                      "file: convert it again.")
  names = {t.name for t in reader.tensors}
  fields.update(vocab_size=int(vocab), head_dim=head_dim, tie_embeddings="output.weight" not in names,
                rope_scaling=_rope_scaling(reader, path, head_dim, fields["rope_theta"]))
  fields.update(overrides)
  return ModelConfig(**fields)


def read_config(path: str, **config_overrides) -> ModelConfig:
  return config_from_gguf(open_gguf(path), os.fspath(path), **config_overrides)


# ----------------------------------------------------------------------------- weights
class GGUFReader:
  """A GGUF file's tensors under HF names and layout (layout.Reader), dequantized to fp32."""

  def __init__(self, path: str, config: ModelConfig):
    self.path = os.fspath(path)
    self.config_file = os.path.basename(self.path)  # the metadata that promised the shapes is in the file
    self._reader = open_gguf(self.path)
    self._tensors = {t.name: t for t in self._reader.tensors}
    self._config = config
    for t in self._reader.tensors:
      if t.tensor_type.name not in SUPPORTED_TYPES:
        raise ConfigError(f"{self.path}: tensor {t.name} is {t.tensor_type.name}, which is not imported "
                          f"(supported: {', '.join(SUPPORTED_TYPES)}); {_FIX_TYPE}.")

  def shape(self, key: str) -> tuple[int, ...] | None:
    t = self._tensors.get(gguf_name(key))
    # GGUF lists dimensions fastest-first (ggml's ne); numpy's order is the reverse.
    return None if t is None else tuple(int(n) for n in reversed(t.shape))

  def file_of(self, key: str) -> str:
    return self.path

  def get(self, key: str) -> np.ndarray:
    gguf = _gguf()
    t = self._tensors[gguf_name(key)]
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:  # gguf raises bare ValueErrors/asserts on blocks that do not add up
      raise ConfigError(f"{self.path}: tensor {t.name} ({t.tensor_type.name}) cannot be dequantized ({e}); "
                        "the file is corrupt: download it again.") from None
    w = np.asarray(w, np.float32).reshape(self.shape(key))
    if key.endswith("q_proj.weight"):
      w = layout.interleaved_to_halves(w, self._config.num_heads)
    elif key.endswith("k_proj.weight"):
      w = layout.interleaved_to_halves(w, self._config.num_kv_heads)
    return w


def load_gguf(path: str, mesh: Mesh, **config_overrides) -> tuple[ModelConfig, dict]:
  """A Llama-architecture .gguf file → (ModelConfig, fp32 params sharded over `mesh`)."""
  config = read_config(path, **config_overrides)
  return config, layout.assemble(GGUFReader(path, config), config, mesh)


def special_ids(path: str) -> tuple[int | None, int | None]:
  """(bos, eos) ids the file's tokenizer names (for an HF export's config.json)."""
  reader = open_gguf(path)
  bos, eos = (metadata(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
  return (None if bos is None else int(bos)), (None if eos is None else int(eos))
