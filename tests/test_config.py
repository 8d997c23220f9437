"""Config and mesh validation: bad values fail early with a message that names the field and the fix."""

import dataclasses

import jax
import pytest

from llama_jax import config as C
from llama_jax.parallel import sharding


@pytest.mark.parametrize("change, field", [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(rope_scaling=C.RopeScaling(factor=0.5)), "rope_scaling.factor"),
    (dict(rope_scaling=C.RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)), "low_freq_factor"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(dtype="fp8"), "dtype"),
    (dict(remat_policy="sometimes"), "remat_policy"),
])
def test_invalid_configs_name_the_field(change, field):
  with pytest.raises(C.ConfigError, match=field):
    dataclasses.replace(C.TINY, **change)


def test_presets_keep_the_real_numerics():
  for name in ("tiny", "tiny-tied"):
    tiny = C.get_preset(name)
    assert tiny.rope_theta == 500_000.0 and tiny.norm_eps == 1e-5
  assert C.LLAMA31_8B.rope_scaling.factor == 8 and C.LLAMA32_1B.rope_scaling.factor == 32
  assert C.LLAMA3_8B.rope_scaling is None and C.LLAMA32_3B.tie_embeddings
  with pytest.raises(C.ConfigError, match="model preset 'llama4' does not exist; choose one of"):
    C.get_preset("llama4")


@pytest.mark.parametrize("mesh, match", [
    (dict(data=1, fsdp=3, tensor=1), r"--mesh_fsdp=3 = 3 devices, but 8 are available"),
    (dict(data=3, fsdp=-1, tensor=1), "--mesh_data=3"),
    (dict(data=1, fsdp=1, tensor=0), "--mesh_tensor=0"),
])
def test_bad_mesh_shapes(mesh, match):
  with pytest.raises(C.ConfigError, match=match):
    sharding.make_mesh(**mesh)


def test_mesh_must_fit_the_model():
  mesh = sharding.make_mesh(fsdp=1, tensor=8)
  # 8 tensor shards cannot split 2 KV heads nor 2 query heads per KV head.
  with pytest.raises(C.ConfigError, match="--mesh_tensor=8 can split neither num_kv_heads=2"):
    sharding.validate(C.TINY, mesh)
  with pytest.raises(C.ConfigError, match=r"ModelConfig.dim=60 is not divisible by --mesh_fsdp=8"):
    sharding.validate(dataclasses.replace(C.TINY, dim=60), sharding.make_mesh(fsdp=8))
  with pytest.raises(C.ConfigError, match="--batch_size=6 does not divide"):
    sharding.check_batch(6, sharding.make_mesh(data=2, fsdp=2, tensor=2))
  assert len(jax.devices()) == 8
