"""--init_from: HF, Meta and Orbax checkpoints of one tiny model load onto a 2x4 mesh exactly."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from llama_jax import config as C
from llama_jax.errors import ConfigError
from llama_jax.interop import hf, init_from, orbax
from llama_jax.model import params as P
from llama_jax.parallel import sharding

torch = pytest.importorskip("torch")

# 4 KV heads so that tensor=4 splits them; mlp_dim 128 = Meta's ffn_dim(64, 0.75, 128).
CFG = dataclasses.replace(C.TINY, num_kv_heads=4)
META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 256, "multiple_of": 128,
               "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
_META = {"self_attn.q_proj": ("attention.wq", 0), "self_attn.k_proj": ("attention.wk", 0),
         "self_attn.v_proj": ("attention.wv", 0), "self_attn.o_proj": ("attention.wo", 1),
         "mlp.gate_proj": ("feed_forward.w1", 0), "mlp.down_proj": ("feed_forward.w2", 1),
         "mlp.up_proj": ("feed_forward.w3", 0), "input_layernorm": ("attention_norm", None),
         "post_attention_layernorm": ("ffn_norm", None)}


def _unpermute(w, n):  # HF halves -> Meta's interleaved RoPE pairs (inverse of HF's converter)
  out, d = w.shape
  return w.reshape(n, 2, out // n // 2, d).transpose(0, 2, 1, 3).reshape(out, d)


def _write_meta(tensors, path):
  """The HF tensors in Meta's names and layout, as two model-parallel shards."""
  meta = {"tok_embeddings.weight": (tensors["model.embed_tokens.weight"], 0),
          "norm.weight": (tensors["model.norm.weight"], None), "output.weight": (tensors["lm_head.weight"], 0)}
  for i in range(CFG.num_layers):
    for name, (m, dim) in _META.items():
      w = tensors[f"model.layers.{i}.{name}.weight"]
      if name == "self_attn.q_proj":
        w = _unpermute(w, CFG.num_heads)
      elif name == "self_attn.k_proj":
        w = _unpermute(w, CFG.num_kv_heads)
      meta[f"layers.{i}.{m}.weight"] = (w, dim)
  for r in range(2):
    shard = {k: torch.from_numpy(np.ascontiguousarray(np.split(w, 2, dim)[r] if dim is not None else w))
             for k, (w, dim) in meta.items()}
    torch.save(shard, path / f"consolidated.{r:02d}.pth")
  (path / "params.json").write_text(json.dumps(META_PARAMS))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("init_from")
  params = P.init_params(CFG, sharding.make_mesh(fsdp=1, devices=jax.devices()[:1]), jax.random.key(3))
  hf.save_hf(params, CFG, str(root / "hf"), dtype="float32")
  orbax.save_params(str(root / "orbax"), params, CFG)
  from safetensors.numpy import load_file  # noqa: PLC0415
  (root / "meta").mkdir()
  _write_meta(load_file(str(root / "hf" / "model.safetensors")), root / "meta")
  return root, jax.device_get(params)


@pytest.mark.parametrize("kind", ["hf", "meta", "orbax"])
def test_each_format_loads_onto_a_2x4_mesh_exactly(sources, kind):
  root, ref = sources
  mesh = sharding.make_mesh(fsdp=2, tensor=4)
  config, params = init_from.load_pretrained(f"{kind}:{root / kind}", mesh, expect=CFG)
  assert config == CFG
  assert jax.tree.structure(params) == jax.tree.structure(ref)
  want = P.param_shardings(CFG, mesh)
  for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(ref), jax.tree.leaves(want)):
    assert a.sharding.is_equivalent_to(s, a.ndim)
    np.testing.assert_array_equal(np.asarray(a), b)  # a permutation and fp32 copies: bit-exact
  # Without `expect`, the checkpoint's own config.
  assert init_from.load_pretrained(f"{kind}:{root / kind}", mesh)[0].dim == CFG.dim


@pytest.mark.parametrize("spec", ["/ckpt/llama", "gs:/ckpt/llama", "hf:", "orbax"])
def test_bad_spec_is_one_clear_error(spec):
  with pytest.raises(ConfigError, match=rf"^--init_from='{spec}': expected hf:/path \(Hugging Face\), "
                     r"meta:/path \(Meta consolidated\), gguf:/file.gguf \(llama.cpp\) or orbax:/path"):
    init_from.load_pretrained(spec, sharding.make_mesh())


@pytest.mark.parametrize("kind, match", [("hf", "no such directory"), ("meta", "no such directory"),
                                         ("orbax", "no such directory")])
def test_missing_path_names_the_flag(tmp_path, kind, match):
  with pytest.raises(ConfigError, match=rf"^--init_from={kind}:{tmp_path}/nope: .*{match}"):
    init_from.load_pretrained(f"{kind}:{tmp_path}/nope", sharding.make_mesh())


def test_a_different_model_lists_the_differences(sources):
  root, _ = sources
  run = dataclasses.replace(CFG, num_layers=3, rope_theta=10_000.0, dtype="bfloat16")
  with pytest.raises(ConfigError, match=r"holds another model than the run's: num_layers 2 \(checkpoint\) vs 3 "
                     r"\(run\); rope_theta 500000.0 \(checkpoint\) vs 10000.0 \(run\); choose"):
    init_from.load_pretrained(f"hf:{root / 'hf'}", sharding.make_mesh(), expect=run)


@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_params_come_in_the_runs_param_dtype(sources, kind):
  root, ref = sources
  run = dataclasses.replace(CFG, param_dtype="bfloat16")
  config, params = init_from.load_pretrained(f"{kind}:{root / kind}", sharding.make_mesh(), expect=run)
  assert config == run
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    assert a.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(a), b.astype(jax.numpy.bfloat16))  # one rounding, same both ways
