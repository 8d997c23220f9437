"""Weights import/export: logits against Hugging Face transformers (PyTorch) after import, and back."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config as C
from llama_jax.interop import weights as hf_weights
from llama_jax.model import params as P
from llama_jax.parallel import sharding
from llama_jax.model.transformer import Transformer, rope_frequencies

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, T = 4, 24  # B splits over the 4 data x fsdp shards of the mesh test

# (name, kv heads, llama3 rope scaling, tied embeddings): every head layout, scaling on/off, tied/untied.
CASES = [("mha_scaled_untied", 4, True, False), ("gqa_scaled_tied", 2, True, True),
         ("mqa_plain_untied", 1, False, False)]


def _hf_model(tmp_path_factory, kv_heads, scaled, tied):
  torch.manual_seed(kv_heads)
  # original_max_position_embeddings=64 puts the short test sequence in all three regimes of the
  # Llama 3.1 scaling (unchanged, smoothed, divided) for head_dim 16.
  scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=64) if scaled else None
  cfg = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, rope_theta=500_000.0,
      rope_scaling=scaling, tie_word_embeddings=tied, max_position_embeddings=2048, rms_norm_eps=1e-5,
      attn_implementation="eager")
  model = transformers.LlamaForCausalLM(cfg).eval()
  # Random norm gains so a transposed or missing norm cannot hide.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  path = tmp_path_factory.mktemp("hf") / "model"
  model.save_pretrained(path)
  return model, str(path)


def _hf_logits(model, tokens, positions=None):
  with torch.no_grad():
    kw = {} if positions is None else {"position_ids": torch.tensor(positions)}
    return model(torch.tensor(tokens), **kw).logits.numpy()


def _apply(config, params, tokens, mesh, positions=None, segment_ids=None):
  with sharding.use(mesh, sharding.logical_rules(config, mesh)):
    fn = jax.jit(lambda p, t, pos, seg: Transformer(config).apply({"params": p}, t, pos, seg))
    return np.asarray(fn(params, tokens, positions, segment_ids))


def _one_device_mesh():
  return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _assert_close(ours, ref):
  err = np.abs(ours - ref)
  assert err.max() <= 1e-4, f"max abs error {err.max():.3g}"
  rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert rel <= 1e-5, f"relative error {rel:.3g}"


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def hf_case(request, tmp_path_factory):
  _, kv, scaled, tied = request.param
  model, path = _hf_model(tmp_path_factory, kv, scaled, tied)
  tokens = np.random.default_rng(kv).integers(0, 128, (B, T)).astype(np.int32)
  return model, path, tokens, _hf_logits(model, tokens)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (1, 4, 2)], ids=["1dev", "fsdp4xtensor2"])
def test_logits_match_hf_and_export_round_trips(hf_case, mesh_shape, tmp_path):
  model, path, tokens, ref = hf_case
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(*mesh_shape, devices=devices)
  config, params = hf_weights.load_hf(path, mesh)
  assert config.tie_embeddings == model.config.tie_word_embeddings
  assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(params))
  _assert_close(_apply(config, params, tokens, mesh), ref)

  if mesh_shape == (1, 4, 2):
    # Export from the sharded layout, reload in transformers: same logits.
    hf_weights.save_hf(params, config, str(tmp_path / "out"), dtype="float32", max_shard_bytes=100_000)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager").eval()
    _assert_close(_hf_logits(reloaded, tokens), ref)


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

  meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
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
      meta[f"layers.{i}.{m}.weight"] = w
  # Two model-parallel shards, split the way Meta's parallel layers split them.
  split_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "tok_embeddings": 0,
               "output": 0}
  shards = [{}, {}]
  for k, v in meta.items():
    dim = next((d for n, d in split_dim.items() if f".{n}." in f".{k}"), None)
    for r, part in enumerate(v.chunk(2, dim) if dim is not None else (v, v)):
      shards[r][k] = part.clone()
  for r, s in enumerate(shards):
    torch.save(s, tmp_path / f"consolidated.{r:02d}.pth")
  (tmp_path / "params.json").write_text(
      '{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128, "multiple_of": 64,'
      ' "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": true}')

  mesh = sharding.make_mesh(1, 4, 2)
  config, params = hf_weights.load_meta(str(tmp_path), mesh, rope_scaling_factor=8.0)
  assert config.mlp_dim == 192 and config.rope_scaling.factor == 8.0
  tokens = np.random.default_rng(1).integers(0, 128, (B, T)).astype(np.int32)
  _assert_close(_apply(config, params, tokens, mesh), _hf_logits(model, tokens))


def test_convert_cli_hf_to_orbax_to_hf(hf_case, tmp_path):
  """experiments/convert.py both ways: HF → llama_jax (Orbax) → HF gives the original logits."""
  import subprocess
  import sys
  model, path, tokens, ref = hf_case
  env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
  for args in (["--from_format=hf", f"--input={path}", "--to_format=orbax", f"--output={tmp_path}/o"],
               ["--from_format=orbax", f"--input={tmp_path}/o", "--to_format=hf", "--hf_dtype=float32",
                f"--output={tmp_path}/hf"]):
    proc = subprocess.run([sys.executable, "experiments/convert.py", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
  reloaded = transformers.LlamaForCausalLM.from_pretrained(f"{tmp_path}/hf", attn_implementation="eager")
  _assert_close(_hf_logits(reloaded.eval(), tokens), ref)
