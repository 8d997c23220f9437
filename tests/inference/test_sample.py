"""Greedy generation — the cache-free sampler and the KV-cache generator, on 1 and 8 devices — against
Hugging Face's greedy `generate` on the same weights."""

import jax
import pytest

from llama_jax.interop import hf
from llama_jax.parallel import sharding
from llama_jax.errors import ConfigError
from llama_jax.inference import generate as cached
from llama_jax.inference.sample import generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_greedy_matches_hf_generate(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, rope_theta=500_000.0,
                                 rms_norm_eps=1e-5, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(tmp_path)
  mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  config, params = hf.load_hf(str(tmp_path), mesh)
  prompts = [[5, 17, 33], [7, 9, 11, 13, 90]]
  ours = generate(config, params, prompts, max_new_tokens=10)
  for prompt, new in zip(prompts, ours):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert new == ref[0, len(prompt):].tolist()
  # The KV-cache generator on one device and sharded over 8 (fsdp 4 x tensor 2) gives HF's tokens too.
  assert cached.generate(config, params, prompts, 10, mesh=mesh) == ours
  mesh8 = sharding.make_mesh(fsdp=4, tensor=2)
  _, params8 = hf.load_hf(str(tmp_path), mesh8)
  assert cached.generate(config, params8, prompts, 10, mesh=mesh8) == ours
  # Sampling at a temperature draws valid tokens; a stop id cuts the continuation.
  sampled = generate(config, params, prompts, 10, temperature=1.0, rng=jax.random.key(1))
  assert all(0 <= t < 96 for s in sampled for t in s)
  cut = generate(config, params, prompts[:1], 10, stop_id=ours[0][3])
  assert cut[0] == ours[0][: ours[0].index(ours[0][3])]
  with pytest.raises(ConfigError, match="max_seq_len"):
    generate(config, params, prompts, config.max_seq_len)
