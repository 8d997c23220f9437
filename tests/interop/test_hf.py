"""HF import/export: logits against Hugging Face transformers (PyTorch) after import, and back; bad files."""

import collections
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llama_jax import config as C
from llama_jax.interop import hf
from llama_jax.model import params as P
from llama_jax.errors import ConfigError
from llama_jax.parallel import sharding
from llama_jax.model.transformer import Transformer

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
  data, fsdp, tensor = mesh_shape
  mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[: data * fsdp * tensor])
  config, params = hf.load_hf(path, mesh)
  assert config.tie_embeddings == model.config.tie_word_embeddings
  assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(params))
  _assert_close(_apply(config, params, tokens, mesh), ref)

  if mesh_shape == (1, 4, 2):
    # Export from the sharded layout, reload in transformers: same logits.
    hf.save_hf(params, config, str(tmp_path / "out"), dtype="float32", max_shard_bytes=100_000)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager").eval()
    _assert_close(_hf_logits(reloaded, tokens), ref)


# ----------------------------------------------------------------------------- our own tiny checkpoint
CFG4 = dataclasses.replace(C.TINY, num_layers=4)  # more layers than any cache of two would hide


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  params = P.init_params(CFG4, mesh, jax.random.key(0))
  path = str(tmp_path_factory.mktemp("tiny") / "hf")
  hf.save_hf(params, CFG4, path, dtype="float32")
  return path, jax.device_get(params)


def _fsdp4_tensor2():
  return sharding.make_mesh(fsdp=4, tensor=2)


def test_each_tensor_read_once_per_host(tiny_ckpt, monkeypatch):
  path, ref = tiny_ckpt
  reads = collections.Counter()
  get = hf.SafetensorsReader.get

  def counting_get(self, key):
    reads[key] += 1
    return get(self, key)

  monkeypatch.setattr(hf.SafetensorsReader, "get", counting_get)
  config, params = hf.load_hf(path, _fsdp4_tensor2())
  assert len(reads) == 3 + 9 * CFG4.num_layers  # embed, final norm, lm_head; 9 per layer
  assert set(reads.values()) == {1}, {k: n for k, n in reads.items() if n != 1}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), b)  # fp32 in, fp32 out: bit-exact


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.k_proj.weight", "model.layers.3.mlp.up_proj.weight"])
def test_wrong_shape_in_any_layer_is_one_clear_error(tiny_ckpt, tmp_path, key):
  path = _copy(tiny_ckpt[0], tmp_path / "bad")
  tensors = load_file(f"{path}/model.safetensors")
  tensors[key] = np.ascontiguousarray(tensors[key][: tensors[key].shape[0] // 2])
  save_file(tensors, f"{path}/model.safetensors")
  want = (32, 64) if "k_proj" in key else (128, 64)  # K*H = 2*16 rows; F = 128 rows
  got = (want[0] // 2, 64)
  with pytest.raises(ConfigError, match=rf"model.safetensors: tensor {key} has shape \({got[0]}, 64\), but "
                     rf"config.json implies \({want[0]}, 64\); .*use the pair that belongs together"):
    hf.load_hf(path, _fsdp4_tensor2())


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_or_truncated_file_is_one_clear_error(tiny_ckpt, tmp_path, damage):
  path = _copy(tiny_ckpt[0], tmp_path / "bad")
  blob = open(f"{path}/model.safetensors", "rb").read()
  with open(f"{path}/model.safetensors", "wb") as f:
    f.write(blob[: len(blob) // 2] if damage == "truncated" else b"not a safetensors file" * 4)
  with pytest.raises(ConfigError, match=r"model.safetensors: not a readable safetensors file \(.*\); "
                     "the file is truncated or corrupt: download or export it again"):
    hf.load_hf(path, _fsdp4_tensor2())


def test_reexport_replaces_a_sharded_export(tiny_ckpt, tmp_path):
  _, ref = tiny_ckpt
  out = str(tmp_path / "out")
  hf.save_hf(ref, CFG4, out, dtype="float32", max_shard_bytes=100_000)
  assert hf.INDEX in os.listdir(out) and len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
  hf.save_hf(ref, CFG4, out, dtype="float32")
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
  _, params = hf.load_hf(out, _fsdp4_tensor2())
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_export_writes_the_tokenizers_bos_eos(tiny_ckpt, tmp_path):
  _, ref = tiny_ckpt
  hf.save_hf(ref, CFG4, str(tmp_path / "a"), dtype="float32")  # Llama 3 base defaults
  cfg = json.load(open(tmp_path / "a" / "config.json"))
  assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (128000, 128001)
  hf.save_hf(ref, CFG4, str(tmp_path / "b"), dtype="float32", bos_id=1, eos_id=[2, 7])
  model_cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "b"))
  gen_cfg = transformers.GenerationConfig.from_pretrained(str(tmp_path / "b"))
  assert (model_cfg.bos_token_id, model_cfg.eos_token_id) == (1, [2, 7])
  assert (gen_cfg.bos_token_id, gen_cfg.eos_token_id) == (1, [2, 7])


def test_export_into_a_file_is_one_clear_error(tiny_ckpt, tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(ConfigError, match="is a file; give a directory"):
    hf.save_hf(tiny_ckpt[1], CFG4, str(tmp_path / "f"))
