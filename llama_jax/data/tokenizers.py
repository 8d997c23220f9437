"""Tokenizers behind one small interface: our own SentencePiece BPE, and Meta's Llama 3 tiktoken BPE.

Both give `encode(text, bos, eos) -> ids`, `decode(ids) -> text`, `vocab_size`, `bos_id`, `eos_id`,
`pad_id`. Our SentencePiece models are trained for exact round trips (identity normalization, no
whitespace folding, byte fallback); Meta's `tokenizer.model` is a tiktoken file of 128,000 ranks plus
256 special tokens (../shared/reference/llama3.md, Meta's llama-models `models/llama3/tokenizer.py`).

Train a tokenizer:
  python -m llama_jax.data.tokenizers train --input a.txt b.txt --vocab_size 4096 --model_prefix /tmp/spm
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import Protocol

from llama_jax.errors import ConfigError


class Tokenizer(Protocol):
  """What the data pipeline and the trainers need of a tokenizer."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  fingerprint: str  # changes when the vocabulary does; keys caches of token ids

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

  def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


def _file_fingerprint(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def _check_file(path: str, flag: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"{flag}={path!r}: no such file.")
  return path


# --- SentencePiece -----------------------------------------------------------------------------------

# Fixed special ids for every model we train, so configs need not read the model to know them.
SPM_UNK, SPM_BOS, SPM_EOS, SPM_PAD = 0, 1, 2, 3

# The Llama 3 chat special tokens (data/chat.py) for our SentencePiece models. Where their ids live:
#  - a model trained with `chat_tokens=True` holds them as control symbols at the fixed ids 4..8 (in this
#    order), inside its vocabulary; SentencePiece never produces a control symbol from text, so user text
#    cannot forge a header or an end of turn;
#  - a model trained without them (every pretraining tokenizer so far) gets them appended at training time
#    by `with_chat_tokens()`: ids sp_size .. sp_size+4, and `vocab_size` rounded up to a multiple of
#    SPM_CHAT_VOCAB_MULTIPLE (so the vocabulary still divides a tensor-parallel degree). The model needs
#    that many embedding rows: a pretrained checkpoint grows new rows (`check_model_vocab` says how many).
SPM_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
SPM_CHAT_FIRST_ID = 4
SPM_CHAT_VOCAB_MULTIPLE = 128


class SentencePieceTokenizer:
  """A trained SentencePiece model (see `train_sentencepiece`)."""

  def __init__(self, model_path: str):
    import sentencepiece as spm

    model_path = _check_file(model_path, "--tokenizer")
    self.model_path = model_path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=model_path)
    except RuntimeError as e:  # sentencepiece raises RuntimeError("INTERNAL: could not parse ModelProto ...")
      raise ConfigError(f"--tokenizer={model_path}: not a SentencePiece model nor a tiktoken BPE file "
                        f"({str(e).splitlines()[0]}).") from e
    self.vocab_size: int = self._sp.vocab_size()
    self.bos_id: int = self._sp.bos_id()
    self.eos_id: int = self._sp.eos_id()
    # A model without a pad piece pads with EOS; padding is masked out by segment id 0 anyway.
    self.pad_id: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    self.fingerprint = "spm-" + _file_fingerprint(model_path)
    # Chat specials the model holds as control symbols (trained with `chat_tokens=True`), name -> id.
    self.special_tokens: dict[str, int] = {}
    for name in SPM_CHAT_TOKENS:
      i = self._sp.piece_to_id(name)
      if i != self._sp.unk_id() and self._sp.is_control(i):
        self.special_tokens[name] = i
    self._set_chat_ids()

  def _set_chat_ids(self) -> None:
    st = self.special_tokens
    self.start_header_id = st.get("<|start_header_id|>")
    self.end_header_id = st.get("<|end_header_id|>")
    self.eom_id = st.get("<|eom_id|>")
    self.eot_id = st.get("<|eot_id|>")
    self.python_tag_id = st.get("<|python_tag|>")
    self._special_names = {i: n for n, i in st.items()}

  def with_chat_tokens(self) -> "SentencePieceTokenizer":
    """This tokenizer with the Llama 3 chat specials: itself if the model holds them, else a copy with
    them appended after the model's pieces and `vocab_size` rounded up (see SPM_CHAT_TOKENS)."""
    if all(n in self.special_tokens for n in SPM_CHAT_TOKENS):
      return self
    import copy  # noqa: PLC0415

    out = copy.copy(self)
    base = self._sp.vocab_size()
    out.special_tokens = {n: base + k for k, n in enumerate(SPM_CHAT_TOKENS)}
    m = SPM_CHAT_VOCAB_MULTIPLE
    out.vocab_size = -(-(base + len(SPM_CHAT_TOKENS)) // m) * m
    out.fingerprint = self.fingerprint + "+chat"
    out._set_chat_ids()
    return out

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    return self.encode_batch([text], bos=bos, eos=eos)[0]

  def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
    ids = self._sp.encode(list(texts), out_type=int, add_bos=bos, add_eos=eos,
                          num_threads=os.cpu_count())
    return [list(x) for x in ids]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; BOS/EOS/pad vanish, chat specials show by name (as tiktoken shows Meta's)."""
    ids = [int(i) for i in ids]
    if not self._special_names:
      return self._sp.decode(ids)
    parts, run = [], []
    for i in ids:
      name = self._special_names.get(i)
      if name is None:
        run.append(i)
      else:
        parts += [self._sp.decode(run), name]
        run = []
    return "".join(parts + [self._sp.decode(run)])


def train_sentencepiece(
    input_files: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    *,
    input_sentence_size: int = 200_000,
    max_sentence_length: int = 16_384,
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
    seed_sentencepiece_size: int = 200_000,
    seed: int = 0,
    chat_tokens: bool = False,
) -> SentencePieceTokenizer:
  """Trains a BPE SentencePiece model on text files (one sentence per line) -> `{model_prefix}.model`.

  Identity normalization, kept whitespace runs, split digits and byte fallback make
  `decode(encode(x)) == x` for any string: characters outside the vocabulary become UTF-8 byte pieces.
  `input_sentence_size` lines are sampled from the inputs, which bounds training time.

  Deterministic: we draw the sample ourselves with `seed` (SentencePiece's own sampler differs from one
  process to the next even with `set_random_generator_seed`), and the paths, prefix and thread count
  that SentencePiece records in the model are cleared, so the same text and settings give the same
  `.model` bytes wherever and by whichever process it is trained.

  `chat_tokens` reserves the Llama 3 chat specials as control symbols at ids 4..8 (SPM_CHAT_TOKENS).
  """
  import sentencepiece as spm

  if not input_files:
    raise ConfigError("--input: give at least one text file to train the tokenizer on.")
  for f in input_files:
    _check_file(f, "--input")
  n_special = 4 + (len(SPM_CHAT_TOKENS) if chat_tokens else 0)
  if vocab_size < 260 + n_special:
    raise ConfigError(f"--vocab_size={vocab_size}: needs room for 256 byte pieces, {n_special} specials and "
                      f"merges; use at least {260 + n_special} (2048-4096 for the default corpus).")
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  import tempfile  # noqa: PLC0415

  try:
    with tempfile.TemporaryDirectory() as tmp:
      sample = _sample_lines(input_files, os.path.join(tmp, "sample.txt"), input_sentence_size, seed)
      _train(spm, [sample], model_prefix, vocab_size, 0, max_sentence_length, character_coverage,
             num_threads, seed_sentencepiece_size, SPM_CHAT_TOKENS if chat_tokens else ())
  except RuntimeError as e:
    if "Vocabulary size" not in str(e):
      raise
    # The vocabulary must hold every kept character, 256 byte pieces and the specials.
    raise ConfigError(f"--vocab_size={vocab_size} is too small for this text: {e}") from e
  _clear_provenance(model_prefix + ".model")
  return SentencePieceTokenizer(model_prefix + ".model")


def _sample_lines(input_files: Sequence[str], out: str, size: int, seed: int) -> str:
  """Writes `size` lines drawn without replacement by `seed` (all lines if size <= 0 or fewer), in input
  order, to `out`. Two passes over the inputs: the line count, then the chosen lines."""
  import numpy as np  # noqa: PLC0415

  def lines():
    for path in input_files:
      with open(path, "rb") as f:
        yield from f

  n = sum(1 for _ in lines())
  keep = None if size <= 0 or n <= size else set(
      np.random.default_rng(seed).choice(n, size, replace=False).tolist())
  with open(out, "wb") as f:
    for i, line in enumerate(lines()):
      if keep is None or i in keep:
        f.write(line if line.endswith(b"\n") else line + b"\n")
  return out


def _clear_provenance(model_file: str) -> None:
  """Removes where and how the model was trained (input paths, prefix, threads) from its trainer spec:
  they change nothing in tokenization but would make the bytes depend on the directory and machine."""
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_file, "rb") as f:
    proto.ParseFromString(f.read())
  spec = proto.trainer_spec
  del spec.input[:]
  spec.model_prefix = ""
  spec.num_threads = 1
  tmp = f"{model_file}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(proto.SerializeToString())
  os.replace(tmp, model_file)


def _train(spm, input_files, model_prefix, vocab_size, input_sentence_size, max_sentence_length,
           character_coverage, num_threads, seed_sentencepiece_size, control_symbols=()):
  spm.SentencePieceTrainer.train(
      input=",".join(os.fspath(f) for f in input_files),
      model_prefix=model_prefix,
      model_type="bpe",
      vocab_size=vocab_size,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      # Without the dummy "▁" prefix a document tokenizes the same alone or concatenated.
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,  # indentation in code becomes a few pieces, not many
      split_digits=True,
      byte_fallback=True,
      character_coverage=character_coverage,
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=False,  # the sample is ours (`_sample_lines`): nothing left to shuffle
      max_sentence_length=max_sentence_length,
      seed_sentencepiece_size=seed_sentencepiece_size,
      unk_id=SPM_UNK, bos_id=SPM_BOS, eos_id=SPM_EOS, pad_id=SPM_PAD,
      control_symbols=list(control_symbols),  # ids right after the 4 above: SPM_CHAT_FIRST_ID..
      num_threads=num_threads or os.cpu_count() or 1,
      minloglevel=2,
  )


# --- Llama 3 (tiktoken) ------------------------------------------------------------------------------

# Meta's pre-tokenizer split (llama-models `models/llama3/tokenizer.py`).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
_NAMED_SPECIAL = [
    "<|begin_of_text|>",  # 128000
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",  # 128004
    "<|step_id|>",
    "<|start_header_id|>",  # 128006
    "<|end_header_id|>",
    "<|eom_id|>",  # 128008, end of message
    "<|eot_id|>",  # 128009, end of turn
    "<|python_tag|>",  # 128010
]
LLAMA3_SPECIAL_TOKENS = _NAMED_SPECIAL + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(_NAMED_SPECIAL))
]
DIALOG_ROLES = ("system", "user", "assistant", "ipython")

# tiktoken's Rust core is slow on long runs without whitespace; Meta splits inputs the same way.
_MAX_ENCODE_CHARS = 400_000
_MAX_NO_WHITESPACE_CHARS = 25_000


def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
  """Meta's split of a string into pieces with at most `max_len` consecutive (non-)whitespace chars."""
  current_len, current_is_space, start = 0, None, 0
  for i, ch in enumerate(s):
    is_space = ch.isspace()
    if current_is_space is None or is_space != current_is_space:
      current_len, current_is_space = 0, is_space
    current_len += 1
    if current_len > max_len:
      yield s[start:i]
      start, current_len = i, 1
  yield s[start:]


class Llama3Tokenizer:
  """Meta's Llama 3 tokenizer: tiktoken BPE (128,000 ranks) + 256 special tokens at 128000+."""

  def __init__(self, model_path: str):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    model_path = _check_file(model_path, "--tokenizer")
    try:
      ranks = load_tiktoken_bpe(model_path)
    except Exception as e:  # a sentencepiece proto or any other file
      raise ConfigError(f"--tokenizer={model_path!r} is not a tiktoken BPE file ({e}).") from e
    n = len(ranks)
    self.special_tokens = {tok: n + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
    self._enc = tiktoken.Encoding(name=os.path.basename(model_path), pat_str=LLAMA3_PATTERN,
                                  mergeable_ranks=ranks, special_tokens=self.special_tokens)
    self.model_path = model_path
    self.vocab_size: int = n + LLAMA3_NUM_SPECIAL
    self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
    self.eos_id: int = self.special_tokens["<|end_of_text|>"]
    self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
    self.start_header_id = self.special_tokens["<|start_header_id|>"]
    self.end_header_id = self.special_tokens["<|end_header_id|>"]
    self.eom_id = self.special_tokens["<|eom_id|>"]
    self.eot_id = self.special_tokens["<|eot_id|>"]
    self.python_tag_id = self.special_tokens["<|python_tag|>"]
    self.stop_ids = frozenset({self.eos_id, self.eom_id, self.eot_id})
    self.fingerprint = "tiktoken-" + _file_fingerprint(model_path)

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Text to ids. Special-token strings inside `text` are encoded as plain text (Meta's default)."""
    ids: list[int] = [self.bos_id] if bos else []
    for i in range(0, len(text), _MAX_ENCODE_CHARS):
      for piece in _split_whitespaces_or_nonwhitespaces(text[i:i + _MAX_ENCODE_CHARS],
                                                        _MAX_NO_WHITESPACE_CHARS):
        ids.extend(self._enc.encode_ordinary(piece))
    if eos:
      ids.append(self.eos_id)
    return ids

  def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
    return [self.encode(t, bos=bos, eos=eos) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode([int(i) for i in ids])

  def with_chat_tokens(self) -> "Llama3Tokenizer":
    return self  # Meta's file holds the chat specials


def check_model_vocab(vocab_size: int, tok: Tokenizer, flag: str = "ModelConfig.vocab_size") -> None:
  """Every id `tok` can produce (its chat specials included) must have an embedding row."""
  if vocab_size < tok.vocab_size:
    raise ConfigError(
        f"{flag}={vocab_size}: the tokenizer has {tok.vocab_size} ids (chat specials included); set "
        f"{flag}={tok.vocab_size} and grow a pretrained checkpoint's embedding by "
        f"{tok.vocab_size - vocab_size} rows.")


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+\s*$")


def load_tokenizer(path: str) -> Tokenizer:
  """Opens each kind of tokenizer file: tiktoken text (`base64 rank` lines), a GGUF model file (its byte-level
  BPE, llama_jax.data.gguf_file) or a SentencePiece proto."""
  path = _check_file(path, "--tokenizer")
  with open(path, "rb") as f:
    first = f.readline(256)
  if first.startswith(b"GGUF"):
    from llama_jax.data import gguf_file  # noqa: PLC0415 (only GGUF files need the gguf package)
    return gguf_file.GGUFTokenizer(path)
  if _TIKTOKEN_LINE.match(first):
    return Llama3Tokenizer(path)
  return SentencePieceTokenizer(path)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m llama_jax.data.tokenizers")
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train a SentencePiece BPE model for exact round trips")
  train.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
  train.add_argument("--vocab_size", type=int, required=True)
  train.add_argument("--model_prefix", required=True, help="writes {prefix}.model and {prefix}.vocab")
  train.add_argument("--input_sentence_size", type=int, default=200_000)
  args = parser.parse_args(argv)
  tok = train_sentencepiece(args.input, args.model_prefix, args.vocab_size,
                            input_sentence_size=args.input_sentence_size)
  print(f"wrote {tok.model_path} (vocab {tok.vocab_size})")


if __name__ == "__main__":
  main()
