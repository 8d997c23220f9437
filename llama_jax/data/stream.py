"""The training stream: one global, process-independent sequence of packed rows.

Why not a grain pipeline per process: a per-process pipeline makes the data a function of the process
layout. Processes holding the same batch shard (a tensor group across hosts) would read different rows,
a checkpoint would hold one iterator state per process (unreadable on another process count), and a new
batch/sequence stage would need a new pipeline, i.e. a fresh shuffle that replays the first documents.

Here the stream is a deterministic function of (sources, weights, seed) alone:
  - each source's documents are visited in a permutation drawn from (seed, source, epoch), epoch after
    epoch;
  - rows are packed concat-then-split from that document order, exactly as `pipeline.PackIterDataset`
    does (same features, same targets across row ends, same segment ids and positions);
  - each row comes from one source, chosen deterministically: the source whose token count is furthest
    below its weight's share (weights are shares of tokens, as the paper states its mix, across stages).
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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_jax.data.pipeline import FEATURES
from llama_jax.errors import ConfigError

STATE_VERSION = 1


class TrainStream:
  """Packed rows of `docs_per_source` (each a sequence of int32 token arrays) mixed by `weights`."""

  def __init__(self, docs_per_source: Sequence[Any], weights: Sequence[float], *, seed: int, pad_id: int,
               restart_positions: bool = True, shuffle: bool = True):
    weights = [float(w) for w in weights]
    if len(weights) != len(docs_per_source) or not docs_per_source:
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
    self.last_spans: list[list[tuple[int, int, int, int]]] = []  # per row: (source, doc, start, take)

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

  def _row_spans(self, i: int, seq_len: int) -> list[tuple[int, int, int, int]]:
    """(source, doc, start, take) chunks filling one row of source i; advances the position."""
    spans, n, empty_run = [], 0, 0
    while n < seq_len:
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

    Only the rows in `rows` (default: all) are filled; the others are zeros and must not be read.
    """
    if seq_len < 2 or batch_size < 1:
      raise ConfigError(f"--batch_size={batch_size} x --seq_len={seq_len}: need batch >= 1 and seq >= 2.")
    wanted = np.zeros(batch_size, bool)
    wanted[np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)] = True
    out = {k: np.zeros((batch_size, seq_len), np.int32) for k in FEATURES}
    out["source_id"] = np.full(batch_size, -1, np.int32)
    self.last_spans = []
    for r in range(batch_size):
      i = self._pick_source(seq_len)
      self._tokens[i] += seq_len
      spans = self._row_spans(i, seq_len)
      self.last_spans.append(spans)
      if wanted[r]:
        self._fill(out, r, spans)
    return out

  def _fill(self, out: dict[str, np.ndarray], r: int, spans) -> None:
    out["inputs"][r] = out["targets"][r] = self._pad_id
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


def restore_state(iterator: Any, state: dict) -> Any:
  """Sets a restored global data state on `iterator` (a `Batches`) and returns it."""
  iterator.set_state(state)
  return iterator
