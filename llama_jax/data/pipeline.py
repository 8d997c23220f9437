"""Documents: files -> token ids, one int32 array (BOS ... EOS) per document, as a grain MapDataset.

Sources: plain-text files (a file is a document), JSONL (a line's `field`, default "text", is a
document) and ArrayRecord (a record is one UTF-8 document, read lazily). Text and JSONL are tokenized once
and cached as `.npz` under `cache_dir`, keyed by the file's hash and the tokenizer's.

Grain is the document source layer only: `documents()` returns a `grain.MapDataset` over the cached token
arrays or the ArrayRecord file. Packing documents into rows, mixing sources and the held-out pass are
`llama_jax/data/stream.py`'s (`TrainStream`, `HeldOut`): one global stream whose rows and JSON state do not
depend on the process layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Literal

import grain
import numpy as np

from llama_jax.errors import ConfigError
from llama_jax.data.tokenizers import Tokenizer

Format = Literal["auto", "text", "jsonl", "array_record"]


@dataclasses.dataclass(frozen=True)
class Source:
  """One data source: files of one format, and its mixing weight."""

  paths: tuple[str, ...] | str
  weight: float = 1.0
  format: Format = "auto"
  field: str = "text"  # JSONL only

  @property
  def path_list(self) -> list[str]:
    return [self.paths] if isinstance(self.paths, (str, os.PathLike)) else list(self.paths)


def _format_of(path: str, fmt: Format) -> str:
  if fmt != "auto":
    return fmt
  if path.endswith((".jsonl", ".json")):
    return "jsonl"
  if ".array_record" in path or path.endswith(".arrayrecord"):
    return "array_record"
  return "text"


def _decode(raw: bytes, path: str, flag: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(f"{flag}: {path!r} is not UTF-8: byte 0x{raw[e.start]:02x} at byte offset "
                      f"{e.start} ({e.reason}).") from e


def read_documents(path: str, fmt: Format = "auto", field: str = "text", flag: str = "--train_files",
                   ) -> list[str]:
  """The documents of a text file (one) or a JSONL file (one per non-blank line), validated."""
  if not os.path.isfile(path):
    raise ConfigError(f"{flag}: {path!r} does not exist or is not a file.")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw.strip():
    raise ConfigError(f"{flag}: {path!r} is empty.")
  text = _decode(raw, path, flag)
  if _format_of(path, fmt) == "text":
    return [text]
  docs = []
  for lineno, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{flag}: {path!r} line {lineno} is not JSON ({e.msg}).") from e
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
      raise ConfigError(f"{flag}: {path!r} line {lineno} has no string field {field!r} "
                        f"(choose the field with --text_field).")
    docs.append(obj[field])
  return docs


class _PackedDocs:
  """Documents stored as one flat token array plus offsets; doc i = tokens[offsets[i]:offsets[i+1]]."""

  def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
    self.tokens, self.offsets = tokens, offsets

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def tokenize_file(path: str, tokenizer: Tokenizer, fmt: Format = "auto", field: str = "text",
                  cache_dir: str | None = None, flag: str = "--train_files") -> _PackedDocs:
  """Token ids of each document of a text/JSONL file, with BOS and EOS; cached when `cache_dir` is set."""
  if not os.path.isfile(path):
    raise ConfigError(f"{flag}: {path!r} does not exist or is not a file.")
  cache = None
  if cache_dir is not None:
    with open(path, "rb") as f:
      key = hashlib.sha256(f.read() + f"|{fmt}|{field}|{tokenizer.fingerprint}".encode()).hexdigest()[:24]
    cache = os.path.join(cache_dir, f"{os.path.basename(path)}.{key}.npz")
    if os.path.isfile(cache):
      with np.load(cache) as z:
        return _PackedDocs(z["tokens"], z["offsets"])
  docs = read_documents(path, fmt, field, flag)
  ids = tokenizer.encode_batch(docs, bos=True, eos=True)
  offsets = np.zeros(len(ids) + 1, np.int64)
  np.cumsum([len(x) for x in ids], out=offsets[1:])
  tokens = np.fromiter((t for x in ids for t in x), np.int32, count=int(offsets[-1]))
  if cache is not None:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cache + f".tmp{os.getpid()}.npz"
    np.savez(tmp, tokens=tokens, offsets=offsets)
    os.replace(tmp, cache)  # atomic: concurrent processes never read half a file
  return _PackedDocs(tokens, offsets)


def documents(source: Source, tokenizer: Tokenizer, cache_dir: str | None = None,
              flag: str = "--train_files") -> grain.MapDataset:
  """A MapDataset of int32 token arrays (BOS ... EOS), one per document of the source, in file order."""
  paths = source.path_list
  if not paths:
    raise ConfigError(f"{flag}: a source has no files.")
  parts = []
  for path in paths:
    fmt = _format_of(os.fspath(path), source.format)
    if fmt == "array_record":
      parts.append(_array_record_docs(path, tokenizer, flag))
    else:
      docs = tokenize_file(path, tokenizer, fmt, source.field, cache_dir, flag)
      parts.append(grain.MapDataset.source(docs))
  return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


def _array_record_docs(path: str, tokenizer: Tokenizer, flag: str) -> grain.MapDataset:
  if not os.path.isfile(path):
    raise ConfigError(f"{flag}: {path!r} does not exist or is not a file.")
  src = grain.sources.ArrayRecordDataSource([path])
  if len(src) == 0:
    raise ConfigError(f"{flag}: {path!r} has no records.")

  def tokenize(i: int, raw: bytes) -> np.ndarray:
    text = _decode(raw, f"{path} record {i}", flag)
    return np.asarray(tokenizer.encode(text, bos=True, eos=True), np.int32)

  # Lazy: ArrayRecord is for corpora too big to tokenize up front.
  return grain.MapDataset.source(src).map_with_index(tokenize)
