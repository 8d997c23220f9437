"""Packed rows: the one packer, the training stream that mixes its rows, and the held-out pass.

Documents come from `pipeline.documents` (a grain MapDataset of int32 token arrays per source, read from
cached token arrays or lazily from ArrayRecord); everything from documents to batches happens here.

Packing concatenates documents, as the paper's pretraining does, and splits them at row ends
(concat-then-split): no token is dropped and no padding is spent except at the end of the held-out pass.
A split document's continuation opens a new segment; with `restart_positions` its positions restart at 0,
since under the document mask [P §3.2] it cannot see its first part anyway. Every row carries, all [T]:
  inputs       token ids (pad_id on padding)
  targets      next token of the same document; at a row end that is the first token of the next row
  segment_ids  1, 2, 3, ... per document chunk in the row, 0 on padding
  positions    0.. per segment (restart_positions) or 0..T-1 across the row
  loss_mask    1 where `targets` is a real next token: 0 on a document's last token and on padding
and `source_id` []: index of the source that filled the row (-1 on an empty row).

Why not a grain pipeline per process: a per-process pipeline makes the data a function of the process
layout. Processes holding the same batch shard (a tensor group across hosts) would read different rows,
a checkpoint would hold one iterator state per process (unreadable on another process count), and a new
batch/sequence stage would need a new pipeline, i.e. a fresh shuffle that replays the first documents.

Here the training stream is a deterministic function of (sources, weights, seed) alone:
  - each source's documents are visited in a permutation drawn from (seed, source, epoch), epoch after
    epoch;
  - rows are packed concat-then-split from that document order (above);
  - each row comes from one source, chosen deterministically: the source whose token count is furthest
    below its weight's share (weights are shares of tokens, as the paper states its mix, across stages;
    a weight of 0 turns a source off).
Its state is global and small: per source (epoch, index in the permutation, offset in that document),
and row tokens drawn per source. Every process walks the same state for the whole global batch, but fills
(tokenizes, copies) only the rows it holds (`rows=`), so the only per-host cost that grows with the global
batch is the bookkeeping of a few integers per row. Consequences:
  - processes that hold the same rows feed the same rows, whatever the mesh (defect: replicated shards);
  - the state is the same on every process: process 0 saves it as JSON, and a run resumes on any number
    of processes and any mesh with the same global stream;
  - a new stage asks for another (batch_size, seq_len) from the same state: the packer continues at the
    document and token where the previous stage stopped; nothing is replayed or skipped.
A source whose documents are read lazily (ArrayRecord) is tokenized for its lengths on every process.

The held-out pass (`HeldOut`) is the same packer over the held-out sources' documents concatenated in
file order, not shuffled, for one epoch: every document once, the last batch padded with empty rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from llama_jax.data import pipeline
from llama_jax.data.tokenizers import Tokenizer
from llama_jax.errors import ConfigError

STATE_VERSION = 1
FEATURES = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _check_shape(batch_size: int, seq_len: int) -> None:
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise ConfigError(f"--seq_len={seq_len}: must be an integer >= 2 (a row needs an input and a target).")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ConfigError(f"--batch_size={batch_size}: must be a positive integer (rows per global batch).")


def _empty_batch(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """`batch_size` empty rows: pad tokens, segment 0, no loss, source -1."""
  out = {k: np.zeros((batch_size, seq_len), np.int32) for k in FEATURES}
  out["inputs"][:] = out["targets"][:] = pad_id
  out["source_id"] = np.full(batch_size, -1, np.int32)
  return out


class TrainStream:
  """Packed rows of `docs_per_source` (each a sequence of int32 token arrays) mixed by `weights`."""

  def __init__(self, docs_per_source: Sequence[Any], weights: Sequence[float], *, seed: int, pad_id: int,
               restart_positions: bool = True, shuffle: bool = True):
    if not docs_per_source:
      raise ConfigError("--train_files: give at least one training file.")
    weights = [float(w) for w in weights]
    if len(weights) != len(docs_per_source):
      raise ConfigError("--train_weights: give one weight per --train_files entry.")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
      raise ConfigError(f"--train_weights={weights}: mixing weights must be finite, >= 0 and sum to > 0.")
    for i, docs in enumerate(docs_per_source):
      if len(docs) == 0:
        raise ConfigError(f"--train_files: source {i} has no documents.")
    self._docs, self._weights = list(docs_per_source), weights
    self._seed, self._pad_id, self._restart, self._shuffle = seed, pad_id, restart_positions, shuffle
    self._orders: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation)
    self.set_state(self.initial_state())

  @classmethod
  def from_sources(cls, sources: Sequence[pipeline.Source], tokenizer: Tokenizer, *, seed: int = 0,
                   restart_positions: bool = True, cache_dir: str | None = None) -> "TrainStream":
    """The stream of `sources` (files, weights) tokenized by `tokenizer`; see `pipeline.documents`."""
    return cls([pipeline.documents(s, tokenizer, cache_dir, "--train_files") for s in sources],
               [s.weight for s in sources], seed=seed, pad_id=tokenizer.pad_id,
               restart_positions=restart_positions)

  # ----------------------------------------------------------------------------- state
  def initial_state(self) -> dict:
    k = len(self._docs)
    return {"version": STATE_VERSION, "sources": [{"epoch": 0, "index": 0, "offset": 0} for _ in range(k)],
            "tokens": [0] * k}

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "sources": [dict(s) for s in self._pos], "tokens": list(self._tokens)}

  def set_state(self, state: dict) -> None:
    if state.get("version") != STATE_VERSION or len(state["sources"]) != len(self._docs):
      raise ConfigError(f"the checkpoint's data state ({len(state.get('sources', []))} sources, version "
                        f"{state.get('version')}) does not fit this run's {len(self._docs)} --train_files; "
                        "resume with the same --train_files.")
    self._pos = [{"epoch": int(s["epoch"]), "index": int(s["index"]), "offset": int(s["offset"])}
                 for s in state["sources"]]
    self._tokens = [int(t) for t in state["tokens"]]

  # ----------------------------------------------------------------------------- document order
  def _doc_id(self, i: int) -> int:
    """Index (in source i's file order) of the document at source i's position."""
    epoch, n = self._pos[i]["epoch"], len(self._docs[i])
    if not self._shuffle:
      return self._pos[i]["index"]
    cached = self._orders.get(i)
    if cached is None or cached[0] != epoch:
      order = np.random.default_rng([self._seed % 2**32, i, epoch]).permutation(n)
      self._orders[i] = cached = (epoch, order)
    return int(cached[1][self._pos[i]["index"]])

  def _advance_doc(self, i: int) -> None:
    p = self._pos[i]
    p["index"], p["offset"] = p["index"] + 1, 0
    if p["index"] == len(self._docs[i]):
      p["epoch"], p["index"] = p["epoch"] + 1, 0

  def _row_spans(self, i: int, seq_len: int, stop_at_epoch_end: bool = False
                 ) -> list[tuple[int, int, int, int]]:
    """(source, doc, start, take) chunks filling one row of source i; advances the position.

    With `stop_at_epoch_end` the row ends early (shorter than seq_len) where source i's epoch ends."""
    spans, n, empty_run, epoch = [], 0, 0, self._pos[i]["epoch"]
    while n < seq_len and not (stop_at_epoch_end and self._pos[i]["epoch"] != epoch):
      d, start = self._doc_id(i), self._pos[i]["offset"]
      length = len(self._docs[i][d])
      if length == 0:  # an empty document holds nothing to pack
        empty_run += 1
        if empty_run > len(self._docs[i]):
          raise ConfigError(f"--train_files: source {i} has only empty documents.")
        self._advance_doc(i)
        continue
      take = min(seq_len - n, length - start)
      spans.append((i, d, start, take))
      n += take
      self._pos[i]["offset"] = start + take
      if start + take == length:
        self._advance_doc(i)
    return spans

  def _pick_source(self, seq_len: int) -> int:
    # The source furthest below its share after this row: deterministic, no state but the counts.
    total = sum(self._tokens) + seq_len
    kept = [i for i, w in enumerate(self._weights) if w > 0]
    wsum = sum(self._weights)
    return min(kept, key=lambda i: (self._tokens[i] + seq_len) / total - self._weights[i] / wsum)

  # ----------------------------------------------------------------------------- batches
  def next_batch(self, batch_size: int, seq_len: int, rows: Sequence[int] | None = None
                 ) -> dict[str, np.ndarray]:
    """The next global batch: [batch_size, seq_len] arrays of FEATURES and source_id [batch_size].

    Only the rows in `rows` (default: all) are filled; the others are empty and must not be read.
    """
    _check_shape(batch_size, seq_len)
    wanted = np.zeros(batch_size, bool)
    wanted[np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)] = True
    out = _empty_batch(batch_size, seq_len, self._pad_id)
    for r in range(batch_size):
      i = self._pick_source(seq_len)
      self._tokens[i] += seq_len
      spans = self._row_spans(i, seq_len)
      if wanted[r]:
        self._fill(out, r, spans)
    return out

  def _epoch_batches(self, batch_size: int, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the rest of source 0's epoch; the last row ends with the epoch and the last batch is
    filled up with empty rows (segment_ids 0, loss_mask 0), so every batch has one shape."""
    _check_shape(batch_size, seq_len)
    epoch = self._pos[0]["epoch"]
    while self._pos[0]["epoch"] == epoch:
      out, r = _empty_batch(batch_size, seq_len, self._pad_id), 0
      while r < batch_size and self._pos[0]["epoch"] == epoch:
        spans = self._row_spans(0, seq_len, stop_at_epoch_end=True)
        if spans:  # none only when the epoch ended in empty documents
          self._fill(out, r, spans)
          r += 1
      if r:
        yield out

  def _fill(self, out: dict[str, np.ndarray], r: int, spans) -> None:
    """Row r of `out` (empty) from the chunks `spans`: the one packer of training and held-out rows."""
    out["source_id"][r] = spans[0][0]
    n = 0
    for seg, (i, d, p, take) in enumerate(spans, 1):
      toks = np.asarray(self._docs[i][d])
      out["inputs"][r, n:n + take] = toks[p:p + take]
      out["segment_ids"][r, n:n + take] = seg
      out["positions"][r, n:n + take] = np.arange(take) if self._restart else np.arange(n, n + take)
      # Targets run to the document's next token, even when that token opens the next row.
      nxt = toks[p + 1:p + take + 1]
      out["targets"][r, n:n + len(nxt)] = nxt
      out["loss_mask"][r, n:n + len(nxt)] = 1
      n += take

  def batches(self, batch_size: int, seq_len: int, rows: Sequence[int] | None = None) -> "Batches":
    """An iterator of `next_batch(batch_size, seq_len, rows)` that shares (and saves) this stream's state."""
    return Batches(self, batch_size, seq_len, rows)


class Batches:
  """`next(it)` = `stream.next_batch(...)` with fixed shapes; `get_state`/`set_state` are the stream's."""

  def __init__(self, stream: TrainStream, batch_size: int, seq_len: int, rows: Sequence[int] | None):
    self.stream, self.batch_size, self.seq_len, self.rows = stream, batch_size, seq_len, rows

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self.stream.next_batch(self.batch_size, self.seq_len, self.rows)

  def get_state(self) -> dict:
    return self.stream.get_state()

  def set_state(self, state: dict) -> None:
    self.stream.set_state(state)


class _Chained:
  """The documents of several sources as one sequence, source after source."""

  def __init__(self, parts: Sequence[Any]):
    self._parts = list(parts)
    self._ends = np.cumsum([len(p) for p in self._parts])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, d: int) -> Any:
    k = int(np.searchsorted(self._ends, d, side="right"))
    return self._parts[k][d - (int(self._ends[k - 1]) if k else 0)]


class HeldOut:
  """Every held-out document once, in file order (source after source), packed as the training rows are,
  in [batch_size, seq_len] batches; the last batch is padded with empty rows (segment_ids 0, loss_mask 0,
  source_id -1), so a sum of losses over all batches is exact. Each `iter()` is a fresh pass, the same on
  every process. Rows may span two sources and carry source_id 0 (the sources are one concatenation)."""

  def __init__(self, docs_per_source: Sequence[Any], *, batch_size: int, seq_len: int, pad_id: int,
               restart_positions: bool = True):
    if not docs_per_source:
      raise ConfigError("--eval_files: give at least one held-out file.")
    _check_shape(batch_size, seq_len)
    self._docs = _Chained(docs_per_source)
    if len(self._docs) == 0:
      raise ConfigError("--eval_files: the held-out files hold no documents.")
    self.batch_size, self.seq_len, self._pad_id, self._restart = batch_size, seq_len, pad_id, restart_positions

  @classmethod
  def from_sources(cls, sources: Sequence[pipeline.Source], tokenizer: Tokenizer, *, batch_size: int,
                   seq_len: int, restart_positions: bool = True, cache_dir: str | None = None) -> "HeldOut":
    return cls([pipeline.documents(s, tokenizer, cache_dir, "--eval_files") for s in sources],
               batch_size=batch_size, seq_len=seq_len, pad_id=tokenizer.pad_id,
               restart_positions=restart_positions)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    one = TrainStream([self._docs], [1.0], seed=0, pad_id=self._pad_id, restart_positions=self._restart,
                      shuffle=False)
    return one._epoch_batches(self.batch_size, self.seq_len)
