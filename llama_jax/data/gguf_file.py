"""GGUF files (llama.cpp's format) opened once, their metadata, and the tokenizer they carry.

The weights and config are read in llama_jax/interop/gguf.py; the tokenizer is here, beside the other
tokenizers, so `load_tokenizer` opens a .gguf file without reaching up to interop/.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from llama_jax.errors import ConfigError

GGUF_MAGIC = b"GGUF"


def _gguf():
  try:
    import gguf  # noqa: PLC0415 (only GGUF import needs it)
  except ImportError:
    raise ConfigError("reading GGUF files needs the gguf package: pip install gguf==0.19.0") from None
  return gguf


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int):
  """One parse per file version: GGUFReader takes seconds on a 49k-token vocabulary (config, weights and
  tokenizer of one run all read the same file)."""
  del mtime_ns, size  # only the cache key
  gguf = _gguf()
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, OSError) as e:  # bad magic/version, truncated header
    raise ConfigError(f"{path}: not a readable GGUF file ({e}); the file is truncated or corrupt: "
                      "download it again.") from None


def open_gguf(path: str):
  """The file's GGUFReader (memory-mapped: tensors are read when dequantized)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    what = "a directory, not a file" if os.path.isdir(path) else "no such file"
    raise ConfigError(f"{path}: {what}; give the path of a .gguf file.")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != GGUF_MAGIC:
    raise ConfigError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF'); give a .gguf file "
                      "(for a Hugging Face directory use hf:/path).")
  st = os.stat(path)
  return _open(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def metadata(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


# ----------------------------------------------------------------------------- tokenizer
# llama.cpp's pre-tokenizers (llama-vocab.cpp) that we rebuild with HF `tokenizers`: 'smollm' splits every
# digit on its own, then GPT-2's regex; 'gpt2'/'default' is GPT-2's regex alone.
_PRE_TOKENIZERS = ("smollm", "gpt2", "default")


class GGUFTokenizer:
  """The byte-level BPE a GGUF file carries (tokenizer.ggml.model 'gpt2'), e.g. SmolLM2's.

  Built with Hugging Face `tokenizers` (the Rust BPE transformers uses) from the file's vocabulary and
  merges. As in Llama3Tokenizer, `encode` treats special-token strings in the text as plain text: chat
  formats insert the control ids themselves (`special_tokens`; SmolLM2's are ChatML's <|im_start|> and
  <|im_end|>, `im_start_id`/`im_end_id`).
  """

  def __init__(self, path: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    path = os.fspath(path)
    reader = open_gguf(path)
    kind = metadata(reader, "tokenizer.ggml.model")
    pre = metadata(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
      raise ConfigError(f"--tokenizer={path}: tokenizer.ggml.model={kind!r}, pre={pre!r}; only byte-level "
                        f"BPE ('gpt2') with pre-tokenizer {'/'.join(_PRE_TOKENIZERS)} is read from GGUF: give "
                        "the model's own tokenizer file as --tokenizer instead.")
    tokens: list[str] = metadata(reader, "tokenizer.ggml.tokens")
    types: list[int] = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges: list[str] = metadata(reader, "tokenizer.ggml.merges") or []
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    self._tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    self._tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if pre == "smollm" else byte_level)
    self._tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are whole ids, never BPE pieces; added as special so decode can skip them.
    self.special_tokens = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}
    self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.special_tokens])
    self._tok.encode_special_tokens = True  # '<|im_end|>' typed in text stays text
    self.model_path = path
    self.vocab_size: int = len(tokens)
    ids = {k: metadata(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    self.bos_id: int = int(ids["bos"]) if ids["bos"] is not None else 0
    self.eos_id: int = int(ids["eos"]) if ids["eos"] is not None else 0
    # A file without a pad id pads with EOS; padding is masked out by segment id 0 anyway.
    self.pad_id: int = int(ids["padding"]) if ids["padding"] is not None else self.eos_id
    self.im_start_id: int | None = self.special_tokens.get("<|im_start|>")
    self.im_end_id: int | None = self.special_tokens.get("<|im_end|>")
    self.stop_ids = frozenset({self.eos_id} | ({self.im_end_id} if self.im_end_id is not None else set()))
    self.chat_template: str | None = metadata(reader, "tokenizer.chat_template")
    h = hashlib.sha256()
    for part in (pre, "\n".join(tokens), "\n".join(merges)):
      h.update(part.encode() + b"\0")
    self.fingerprint = "gguf-bpe-" + h.hexdigest()[:16]

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    return self.encode_batch([text], bos=bos, eos=eos)[0]

  def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
    out = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [([self.bos_id] if bos else []) + e.ids + ([self.eos_id] if eos else []) for e in out]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
