"""Meta consolidated import: interleaved RoPE rows and model-parallel shards give the HF model's logits."""

import jax
import numpy as np
import pytest

from llama_jax.errors import ConfigError
from llama_jax.interop import meta
from llama_jax.parallel import sharding
from llama_jax.model.transformer import Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, T = 4, 24  # B splits over the 4 data x fsdp shards of the mesh


def _apply(config, params, tokens, mesh):
  with sharding.use(mesh, sharding.logical_rules(config, mesh)):
    return np.asarray(jax.jit(lambda p, t: Transformer(config).apply({"params": p}, t))(params, tokens))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _assert_close(ours, ref):
  err = np.abs(ours - ref)
  assert err.max() <= 1e-4, f"max abs error {err.max():.3g}"
  rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert rel <= 1e-5, f"relative error {rel:.3g}"


def test_meta_consolidated_import(tmp_path):
  """Meta's layout (interleaved RoPE rows, model-parallel shards) imports to the HF model's logits."""
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, rope_theta=500_000.0, rms_norm_eps=1e-5,
      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192), attn_implementation="eager")
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

  def unpermute(w, n):  # HF halves → Meta's interleaved pairs (inverse of the HF converter's permute)
    out, d = w.shape
    return w.view(n, 2, out // n // 2, d).transpose(1, 2).reshape(out, d)

  sd_meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
          "output.weight": sd["lm_head.weight"]}
  names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
           "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
           "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
           "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
           "post_attention_layernorm": "ffn_norm"}
  for i in range(2):
    for hf, m in names.items():
      w = sd[f"model.layers.{i}.{hf}.weight"]
      if hf == "self_attn.q_proj":
        w = unpermute(w, 4)
      elif hf == "self_attn.k_proj":
        w = unpermute(w, 2)
      sd_meta[f"layers.{i}.{m}.weight"] = w
  # Two model-parallel shards, split the way Meta's parallel layers split them.
  split_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "tok_embeddings": 0,
               "output": 0}
  shards = [{}, {}]
  for k, v in sd_meta.items():
    dim = next((d for n, d in split_dim.items() if f".{n}." in f".{k}"), None)
    for r, part in enumerate(v.chunk(2, dim) if dim is not None else (v, v)):
      shards[r][k] = part.clone()
  for r, s in enumerate(shards):
    torch.save(s, tmp_path / f"consolidated.{r:02d}.pth")
  (tmp_path / "params.json").write_text(
      '{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128, "multiple_of": 64,'
      ' "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": true}')

  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  config, params = meta.load_meta(str(tmp_path), mesh, rope_scaling_factor=8.0)
  assert config.mlp_dim == 192 and config.rope_scaling.factor == 8.0
  tokens = np.random.default_rng(1).integers(0, 128, (B, T)).astype(np.int32)
  _assert_close(_apply(config, params, tokens, mesh), _hf_logits(model, tokens))


def test_missing_params_json_is_one_clear_error(tmp_path):
  with pytest.raises(ConfigError, match=r"no params.json; expected Meta's checkpoint directory"):
    meta.load_meta(str(tmp_path), sharding.make_mesh(fsdp=8))
