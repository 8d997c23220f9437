"""The grain input pipeline: documents -> token ids -> packed rows of T tokens -> mixed, sharded batches.

Sources: plain-text files (a file is a document), JSONL (a line's `field`, default "text", is a
document) and ArrayRecord (a record is one UTF-8 document, read lazily). Text and JSONL are tokenized once
and cached as `.npz` under `cache_dir`, keyed by the file's hash and the tokenizer's.

Packing concatenates documents, as the paper's pretraining does, and splits them at row ends
(concat-then-split): no token is dropped and no padding is spent except at the end of a finite stream. A
split document's continuation opens a new segment; with `restart_positions` its positions restart at 0,
since under the document mask [P §3.2] it cannot see its first part anyway. Every row carries, all [T]:
  inputs       token ids (pad_id on padding)
  targets      next token of the same document; at a row end that is the first token of the next row
  segment_ids  1, 2, 3, ... per document chunk in the row, 0 on padding
  positions    0.. per segment (restart_positions) or 0..T-1 across the row
  loss_mask    1 where `targets` is a real next token: 0 on a document's last token and on padding
and `source_id` []: index of the source that filled the row. Mixing picks whole rows, so weights are
shares of tokens (the paper's data mix is stated in tokens) and can be checked by counting `source_id`.

The pretraining runner does not use `train_dataset`: it reads `llama_jax/data/stream.py`'s one global
stream (the same rows whatever the process layout, one JSON state, stages that continue it). This file's
packer is that stream's reference in the tests; `train_dataset` shards documents by process.

State: `it = iter(train_dataset(...))`; `it.get_state()` is a JSON-able dict and `it.set_state(s)` on
a fresh iterator resumes with exactly the same batches. Orbax: `grain.checkpoint.CheckpointSave(it)` /
`grain.checkpoint.CheckpointRestore(it)` as an item of `ocp.args.Composite` (handler
`grain.checkpoint.CheckpointHandler`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Literal

import grain
import numpy as np

from llama_jax.errors import ConfigError
from llama_jax.data.tokenizers import Tokenizer

Format = Literal["auto", "text", "jsonl", "array_record"]
FEATURES = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


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


class _PackIterator(grain.DatasetIterator):
  """Concat-then-split packing; its state is the parent's state at the current document + an offset."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, restart_positions: bool):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._restart = seq_len, pad_id, restart_positions
    self._doc: dict | None = None  # the document being split across rows
    self._doc_pos = 0
    self._doc_state: Any = None

  def _next_doc(self) -> dict | None:
    while True:
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        return None
      if len(doc["tokens"]):
        self._doc, self._doc_pos, self._doc_state = doc, 0, state
        return doc

  def __next__(self) -> dict[str, np.ndarray]:
    T = self._seq_len
    row = {k: np.zeros(T, np.int32) for k in FEATURES}
    row["inputs"][:] = self._pad_id
    row["targets"][:] = self._pad_id
    source_id, n, seg = -1, 0, 0
    while n < T:
      doc = self._doc or self._next_doc()
      if doc is None:
        break
      toks, p = doc["tokens"], self._doc_pos
      take = min(T - n, len(toks) - p)
      seg += 1
      if source_id < 0:
        source_id = int(doc["source_id"])
      row["inputs"][n:n + take] = toks[p:p + take]
      row["segment_ids"][n:n + take] = seg
      row["positions"][n:n + take] = np.arange(take) if self._restart else np.arange(n, n + take)
      # Targets run to the document's next token, even when that token opens the next row.
      nxt = toks[p + 1:p + take + 1]
      row["targets"][n:n + len(nxt)] = nxt
      row["loss_mask"][n:n + len(nxt)] = 1
      n += take
      self._doc_pos = p + take
      if self._doc_pos == len(toks):
        self._doc = None
    if n == 0:
      raise StopIteration
    return {**row, "source_id": np.int32(source_id)}

  def get_state(self) -> dict:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "doc_pos": 0}
    return {"parent": self._doc_state, "doc_pos": self._doc_pos}

  def set_state(self, state: dict):
    self._parent.set_state(state["parent"])
    self._doc = None
    if state["doc_pos"]:
      self._next_doc()
      self._doc_pos = state["doc_pos"]


class PackIterDataset(grain.IterDataset):
  """Packs a stream of {"tokens", "source_id"} documents into rows of `seq_len` (see module doc)."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int, restart_positions: bool = True):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._restart = seq_len, pad_id, restart_positions

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._restart)


def _check(seq_len: int, batch_size: int, process_index: int, process_count: int):
  if not isinstance(seq_len, int) or seq_len < 2:
    raise ConfigError(f"--seq_len={seq_len}: must be an integer >= 2 (a row needs an input and a target).")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ConfigError(f"--batch_size={batch_size}: must be a positive integer (rows per process).")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} must be in [0, process_count={process_count}).")


def _shard(docs: grain.MapDataset, process_index: int, process_count: int, flag: str, i: int):
  docs = docs[process_index::process_count]
  if len(docs) == 0:
    raise ConfigError(f"{flag}: source {i} has fewer documents than processes ({process_count}); "
                      "every process needs at least one.")
  return docs


def _read_options(read_threads: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(1, 64 * read_threads))


def _with_source_id(docs: grain.MapDataset, i: int) -> grain.MapDataset:
  return docs.map(lambda t: {"tokens": t, "source_id": np.int32(i)})


def train_dataset(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    restart_positions: bool = True,
    cache_dir: str | None = None,
    read_threads: int = 0,
) -> grain.IterDataset:
  """Batches of [batch_size, seq_len] int32 arrays (and source_id [batch_size]) for one process.

  Each process reads a disjoint 1/process_count of every source's documents. Documents are shuffled by
  `seed` (a new order each epoch), repeated `num_epochs` times (None: forever), packed per source, and
  rows are mixed by the sources' weights. A finite run stops when its first source runs out.
  `read_threads` > 0 prefetches documents in threads: worth it only for ArrayRecord on slow storage, as
  cached token arrays are in memory and per-element thread hand-offs cost more than they save.
  """
  _check(seq_len, batch_size, process_index, process_count)
  if not sources:
    raise ConfigError("--train_files: give at least one training file.")
  weights = [float(s.weight) for s in sources]
  if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
    raise ConfigError(f"--train_weights={weights}: mixing weights must be finite, >= 0 and sum to > 0.")
  packed, kept = [], []
  for i, (src, w) in enumerate(zip(sources, weights)):
    if w == 0:
      continue  # an explicit 0 turns a source off; grain's mix refuses zero proportions
    docs = _shard(documents(src, tokenizer, cache_dir, "--train_files"), process_index, process_count,
                  "--train_files", i)
    if shuffle:
      docs = docs.shuffle(seed=(seed * 1_000_003 + i) % 2**32)
    docs = docs.repeat(num_epochs)
    docs = _with_source_id(docs, i).to_iter_dataset(_read_options(read_threads))
    rows = PackIterDataset(docs, seq_len, tokenizer.pad_id, restart_positions)
    packed.append(rows)
    kept.append(w)
  ds = packed[0] if len(packed) == 1 else grain.IterDataset.mix(packed, kept)
  return ds.batch(batch_size, drop_remainder=True)


def eval_dataset(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    restart_positions: bool = True,
    cache_dir: str | None = None,
    read_threads: int = 0,
) -> grain.IterDataset:
  """Every held-out document of this process once, in file order, packed; the last batch is padded.

  Padded rows have segment_ids 0 and loss_mask 0, so a sum of losses over all batches is exact.
  """
  _check(seq_len, batch_size, process_index, process_count)
  if not sources:
    raise ConfigError("--eval_files: give at least one held-out file.")
  docs = grain.MapDataset.concatenate([
      _with_source_id(_shard(documents(s, tokenizer, cache_dir, "--eval_files"), process_index,
                             process_count, "--eval_files", i), i)
      for i, s in enumerate(sources)])
  rows = PackIterDataset(docs.to_iter_dataset(_read_options(read_threads)), seq_len, tokenizer.pad_id,
                         restart_positions)
  return rows.batch(batch_size, drop_remainder=False).map(
      lambda b: _pad_batch(b, batch_size, tokenizer.pad_id))


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  """Fills a short last batch with empty rows so every batch has one shape (one compiled eval step)."""
  n = len(batch["inputs"])
  if n == batch_size:
    return batch
  out = {}
  for k, v in batch.items():
    fill = pad_id if k in ("inputs", "targets") else (-1 if k == "source_id" else 0)
    out[k] = np.concatenate([v, np.full((batch_size - n, *v.shape[1:]), fill, v.dtype)])
  return out
