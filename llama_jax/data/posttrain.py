"""Post-training data: JSONL dialogs for SFT and preference pairs for DPO / the reward model, as batches.

Files (JSONL, one object per line; blank lines ignored; other top-level keys such as an id are ignored):
  SFT          {"messages": [message, ...]}                        at least one assistant message
  preference   {"prompt": P, "chosen": R, "rejected": R}
               P: a string (one user message) or a list of messages;
               R: a string (one assistant message), one message object, or a list of messages (e.g. a tool
                  call with eom, the ipython answer, the final answer) that ends with an assistant message.
A message is {"role", "content"} plus optional "eom"/"python_tag" booleans (data/chat.py).

Every line is validated: not UTF-8, not JSON, a missing or wrong-typed field, an unknown role or message key,
empty content, no assistant turn, identical chosen and rejected, or a dialog longer than the row. A bad line
is one message `file:line: what is wrong; the fix`; `on_bad_line="fail"` (--on_bad_line) raises it as a
ConfigError, "skip" prints it, drops the line, and counts it in the `ReadReport`. Nothing is repaired.

Batches (the contract of issue 10, /work/wt/POSTTRAIN.md), all numpy:
  SFT (`SFTStream`): stream.FEATURES [B, T] (+ the host-side source_id [B], as the pretraining stream):
    whole dialogs packed first-fit in order into rows, never split (a continuation could not see its
    prompt under the document mask), each its own segment with positions from 0, the row's rest padded
    (segment 0); loss_mask[t] = 1 iff targets[t] is assistant content or its terminator.
    The pretraining packer (stream.TrainStream) splits documents at row ends, so it does not fit.
  Preference (`PreferenceStream`): [B, C=2, T], C=0 chosen, C=1 rejected, one pair per b:
    inputs, targets, segment_ids (1 on the dialog, 0 on padding), positions        int32 [B, C, T]
    response_mask  1 where targets[t] is a token of an assistant message of the response (its header,
                   content, terminator); tool output (ipython) inside the response is 0      float32
    format_mask    1 where targets[t] is a formatting token (header, role, "\\n\\n", eot/eom)  float32
    last_index     index of the row's last real token (<|eot_id|>; ChatML: the "\\n" after <|im_end|>)
                                                                                        int32 [B, C]
    pair_index     the pair's index among the files' good lines, -1 on a padding pair (host side: not a
                   contract feature, the key of `ref_logp_table`)                     int32 [B]
  `ref_logp` [B, C] float32 is added by `with_ref_logp(batches, score=...)`: the scoring pass of the
  reference model (the losses' side) run on each batch before the train step, or `table=ref_logp_table(
  ...)`: that pass run once over all pairs and looked up by pair_index. It is never state.

Both streams are deterministic functions of (data, seed) with a small JSON state (epoch, index in the
epoch's permutation, number of examples), saved and restored as stream.TrainStream's is; every process
walks the whole batch and fills only its `rows`. A different number of examples (other files, another
--on_bad_line) refuses the state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from llama_jax.data import stream as stream_lib
from llama_jax.data.chat import ChatFormat, Rendered, check_dialog, render
from llama_jax.data.tokenizers import Tokenizer
from llama_jax.errors import ConfigError

OnBadLine = Literal["fail", "skip"]
STATE_VERSION = 1
C = 2  # chosen, rejected
PREFERENCE_FEATURES = ("inputs", "targets", "segment_ids", "positions", "response_mask", "format_mask",
                       "last_index")
_MAX_PRINTED = 20  # skipped lines printed one by one; the rest only counted


@dataclasses.dataclass
class ReadReport:
  """What a reader kept and skipped: `skipped` holds one `file:line: ...` message per dropped line."""

  path: str
  kept: int = 0
  skipped: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Pair:
  """A preference pair: chosen and rejected dialogs (the same prompt tokens first), per-token masks."""

  chosen: Rendered
  rejected: Rendered
  chosen_response: np.ndarray  # int32 [len(chosen)]: 1 on the response's assistant-message tokens
  rejected_response: np.ndarray
  prompt_len: int  # tokens of the shared prompt (BOS included)


# --- reading ------------------------------------------------------------------------------------------

def _read_files(paths: str | Sequence[str], parse: Callable[[Any], Any], on_bad_line: OnBadLine, flag: str
                ) -> tuple[list[Any], list[ReadReport]]:
  """The examples of one file or of several, concatenated in the order given (that order is the index
  `pair_index` and the shuffle refer to)."""
  if on_bad_line not in ("fail", "skip"):
    raise ConfigError(f"--on_bad_line={on_bad_line!r}: use 'fail' or 'skip'.")
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  if not paths:
    raise ConfigError(f"{flag}: give at least one JSONL file.")
  items, reports = [], []
  for path in paths:
    got, report = _read_jsonl(path, parse, on_bad_line, flag)
    items += got
    reports.append(report)
  return items, reports


def _read_jsonl(path: str, parse: Callable[[Any], Any], on_bad_line: OnBadLine, flag: str
                ) -> tuple[list[Any], ReadReport]:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"{flag}: {path!r} does not exist or is not a file.")
  items, report = [], ReadReport(path)
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ConfigError(f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                            "re-encode the file as UTF-8.") from None
        try:
          obj = json.loads(line.rstrip("\r\n"))  # so a column counts within the line
        except json.JSONDecodeError as e:
          raise ConfigError(f"not JSON ({e.msg} at column {e.colno}); write one JSON object per line."
                            ) from None
        if not isinstance(obj, dict):
          raise ConfigError(f"a JSON {type(obj).__name__}, not an object; write one JSON object per line.")
        items.append(parse(obj))
      except ConfigError as e:
        msg = f"{path}:{lineno}: {e}"
        if on_bad_line == "fail":
          raise ConfigError(f"{msg} (--on_bad_line=skip drops such lines)") from None
        report.skipped.append(msg)
        if len(report.skipped) <= _MAX_PRINTED:
          print(f"skipped {msg}", file=sys.stderr, flush=True)
  report.kept = len(items)
  if report.skipped:
    print(f"{flag}: {path}: skipped {len(report.skipped)} bad lines, kept {report.kept} "
          "(--on_bad_line=skip)", file=sys.stderr, flush=True)
  if not items:
    raise ConfigError(f"{flag}: {path!r} has no usable lines ({len(report.skipped)} bad); fix the file.")
  return items, report


def _field(obj: dict, key: str) -> Any:
  if key not in obj:
    raise ConfigError(f"no {key!r} field; every line needs {key!r}.")
  return obj[key]


def _check_len(n: int, seq_len: int, what: str) -> None:
  if n > seq_len:
    raise ConfigError(f"{what} is {n} tokens, longer than the row (--seq_len={seq_len}); raise --seq_len or "
                      "shorten the dialog.")


def read_sft(paths: str | Sequence[str], tok: Tokenizer, fmt: ChatFormat, seq_len: int,
             on_bad_line: OnBadLine = "fail", flag: str = "--sft_files"
             ) -> tuple[list[Rendered], list[ReadReport]]:
  """The dialogs of SFT JSONL files (`{"messages": [...]}` per line), rendered and validated; a report
  per file."""

  def parse(obj: dict) -> Rendered:
    messages = _field(obj, "messages")
    check_dialog(messages, fmt, "'messages'")
    if not any(m["role"] == "assistant" for m in messages):
      raise ConfigError("'messages' has no assistant message, so nothing is learned; add the assistant's "
                        "answer or drop the line.")
    r = render(tok, fmt, messages)
    _check_len(len(r), seq_len, "the dialog")
    return r

  return _read_files(paths, parse, on_bad_line, flag)


def _prompt_messages(p: Any, fmt: ChatFormat) -> list[dict]:
  if isinstance(p, str):
    p = [{"role": "user", "content": p}]
  elif not isinstance(p, list):
    raise ConfigError(f"'prompt' is a {type(p).__name__}; write a string or a list of messages.")
  check_dialog(p, fmt, "'prompt'")
  return p


def _response_messages(r: Any, key: str, fmt: ChatFormat) -> list[dict]:
  if isinstance(r, str):
    r = [{"role": "assistant", "content": r}]
  elif isinstance(r, dict):
    r = [r]
  elif not isinstance(r, list):
    raise ConfigError(f"{key!r} is a {type(r).__name__}; write a string, a message or a list of messages.")
  check_dialog(r, fmt, repr(key))
  if r[-1]["role"] != "assistant":
    raise ConfigError(f"{key!r} ends with a {r[-1]['role']} message; a response ends with the assistant's.")
  return r


def _render_response(tok: Tokenizer, fmt: ChatFormat, prompt: Rendered, messages: list[dict]
                     ) -> tuple[Rendered, np.ndarray]:
  """prompt + response messages (the same ids as rendering the whole dialog), and the response mask."""
  parts = [render(tok, fmt, [m], bos=False) for m in messages]
  cat = lambda xs: np.concatenate(xs).astype(np.int32)  # noqa: E731
  full = Rendered(cat([prompt.ids] + [p.ids for p in parts]),
                  cat([prompt.trained] + [p.trained for p in parts]),
                  cat([prompt.format] + [p.format for p in parts]))
  response = cat([np.zeros(len(prompt), np.int32)]
                 + [np.full(len(p), int(m["role"] == "assistant"), np.int32) for p, m in zip(parts, messages)])
  return full, response


def read_preferences(paths: str | Sequence[str], tok: Tokenizer, fmt: ChatFormat, seq_len: int,
                     on_bad_line: OnBadLine = "fail", flag: str = "--preference_files"
                     ) -> tuple[list[Pair], list[ReadReport]]:
  """The pairs of preference JSONL files (`{"prompt", "chosen", "rejected"}` per line), validated; a
  report per file."""

  def parse(obj: dict) -> Pair:
    prompt_msgs = _prompt_messages(_field(obj, "prompt"), fmt)
    chosen_msgs = _response_messages(_field(obj, "chosen"), "chosen", fmt)
    rejected_msgs = _response_messages(_field(obj, "rejected"), "rejected", fmt)
    prompt = render(tok, fmt, prompt_msgs)
    chosen, chosen_resp = _render_response(tok, fmt, prompt, chosen_msgs)
    rejected, rejected_resp = _render_response(tok, fmt, prompt, rejected_msgs)
    if np.array_equal(chosen.ids, rejected.ids):
      raise ConfigError("'chosen' and 'rejected' are the same tokens, so the pair prefers nothing; drop it.")
    _check_len(len(chosen), seq_len, "prompt + chosen")
    _check_len(len(rejected), seq_len, "prompt + rejected")
    return Pair(chosen, rejected, chosen_resp, rejected_resp, len(prompt))

  return _read_files(paths, parse, on_bad_line, flag)


# --- batches ------------------------------------------------------------------------------------------

class _Order:
  """A deterministic walk over n items, epoch after epoch, in a permutation drawn from (seed, epoch);
  its state is {"version", "epoch", "index"}."""

  def __init__(self, n: int, seed: int, shuffle: bool, flag: str):
    if n == 0:
      raise ConfigError(f"{flag}: no examples to train on.")
    self._n, self._seed, self._shuffle, self._flag = n, seed, shuffle, flag
    self._perm: tuple[int, np.ndarray] | None = None
    self.set_state(self.initial_state())

  def initial_state(self) -> dict:
    return {"version": STATE_VERSION, "epoch": 0, "index": 0, "examples": self._n}

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "epoch": self.epoch, "index": self.index, "examples": self._n}

  def set_state(self, state: dict) -> None:
    if state.get("version") != STATE_VERSION or state.get("examples") != self._n:
      raise ConfigError(f"the checkpoint's data state ({state.get('examples')} examples, version "
                        f"{state.get('version')}) does not fit this run's {self._n} examples; resume with the "
                        f"same {self._flag} and --on_bad_line.")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

  def current(self) -> int:
    if not self._shuffle:
      return self.index
    if self._perm is None or self._perm[0] != self.epoch:
      self._perm = (self.epoch, np.random.default_rng([self._seed % 2**32, self.epoch]).permutation(self._n))
    return int(self._perm[1][self.index])

  def advance(self) -> None:
    self.index += 1
    if self.index == self._n:
      self.epoch, self.index = self.epoch + 1, 0


class _Stream:
  """State and iterator plumbing shared by the SFT and preference streams."""

  _order: _Order

  def initial_state(self) -> dict:
    return self._order.initial_state()

  def get_state(self) -> dict:
    return self._order.get_state()

  def set_state(self, state: dict) -> None:
    self._order.set_state(state)

  def batches(self, batch_size: int, seq_len: int, rows: Sequence[int] | None = None) -> stream_lib.Batches:
    """An iterator of `next_batch(batch_size, seq_len, rows)` that shares (and saves) this stream's state."""
    return stream_lib.Batches(self, batch_size, seq_len, rows)

  def next_batch(self, batch_size: int, seq_len: int, rows: Sequence[int] | None = None
                 ) -> dict[str, np.ndarray]:
    raise NotImplementedError


def _wanted(batch_size: int, rows: Sequence[int] | None) -> np.ndarray:
  wanted = np.zeros(batch_size, bool)
  wanted[np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)] = True
  return wanted


class SFTStream(_Stream):
  """Rows of whole dialogs (see the module docstring), the pretraining FEATURES."""

  def __init__(self, dialogs: Sequence[Rendered], *, seed: int, pad_id: int, shuffle: bool = True,
               flag: str = "--sft_files"):
    self._dialogs, self._pad_id = list(dialogs), pad_id
    self._order = _Order(len(self._dialogs), seed, shuffle, flag)

  def _row(self, order: _Order, seq_len: int, stop_at_epoch_end: bool = False) -> list[int]:
    """Dialog indices filling one row, first-fit in order; advances `order`."""
    out, n, epoch = [], 0, order.epoch
    while not (stop_at_epoch_end and order.epoch != epoch):
      d = order.current()
      length = len(self._dialogs[d])
      _check_len(length, seq_len, f"SFT dialog {d}")  # read with a larger --seq_len than this batch's
      if n + length > seq_len:
        break
      out.append(d)
      n += length
      order.advance()
    return out

  def _fill(self, out: dict[str, np.ndarray], r: int, dialogs: list[int]) -> None:
    out["source_id"][r], n = 0, 0
    for seg, d in enumerate(dialogs, 1):
      x = self._dialogs[d]
      k = len(x)
      out["inputs"][r, n:n + k] = x.ids
      out["segment_ids"][r, n:n + k] = seg
      out["positions"][r, n:n + k] = np.arange(k)
      out["targets"][r, n:n + k - 1] = x.ids[1:]
      # loss on a target position iff its target token is trained (assistant content or terminator).
      out["loss_mask"][r, n:n + k - 1] = x.trained[1:]
      n += k

  def next_batch(self, batch_size: int, seq_len: int, rows: Sequence[int] | None = None
                 ) -> dict[str, np.ndarray]:
    """The next global batch: [batch_size, seq_len] arrays of stream.FEATURES and source_id [batch_size]
    (0: every row holds at least one dialog). Only the rows in `rows` are filled."""
    stream_lib._check_shape(batch_size, seq_len)
    wanted = _wanted(batch_size, rows)
    out = stream_lib._empty_batch(batch_size, seq_len, self._pad_id)
    for r in range(batch_size):
      dialogs = self._row(self._order, seq_len)
      if wanted[r]:
        self._fill(out, r, dialogs)
    return out

  def in_file_order(self, batch_size: int, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Every dialog once in file order, packed as above (held-out loss), the last batch filled up with
    empty rows (segment 0, loss_mask 0, source_id -1); leaves this stream's state alone."""
    stream_lib._check_shape(batch_size, seq_len)
    order = _Order(len(self._dialogs), 0, False, "")
    while order.epoch == 0:
      out = stream_lib._empty_batch(batch_size, seq_len, self._pad_id)
      for r in range(batch_size):
        if order.epoch == 0:
          self._fill(out, r, self._row(order, seq_len, stop_at_epoch_end=True))
      yield out


class PreferenceStream(_Stream):
  """Batches of preference pairs, [B, 2, T] (see the module docstring)."""

  def __init__(self, pairs: Sequence[Pair], *, seed: int, pad_id: int, shuffle: bool = True,
               flag: str = "--preference_files"):
    self._pairs, self._pad_id = list(pairs), pad_id
    self._order = _Order(len(self._pairs), seed, shuffle, flag)

  def _empty(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros((batch_size, C, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids",
                                                                         "positions")}
    out["inputs"][:] = out["targets"][:] = self._pad_id
    out["response_mask"] = np.zeros((batch_size, C, seq_len), np.float32)
    out["format_mask"] = np.zeros((batch_size, C, seq_len), np.float32)
    out["last_index"] = np.zeros((batch_size, C), np.int32)
    out["pair_index"] = np.full(batch_size, -1, np.int32)
    return out

  def _fill(self, out: dict[str, np.ndarray], b: int, p: int, seq_len: int) -> None:
    pair = self._pairs[p]
    out["pair_index"][b] = p
    for c, (x, resp) in enumerate(((pair.chosen, pair.chosen_response),
                                   (pair.rejected, pair.rejected_response))):
      k = len(x)
      _check_len(k, seq_len, f"preference pair {p}")
      out["inputs"][b, c, :k] = x.ids
      out["segment_ids"][b, c, :k] = 1
      out["positions"][b, c, :k] = np.arange(k)
      out["targets"][b, c, :k - 1] = x.ids[1:]
      # Masks sit on target positions: t is marked iff the token it predicts (ids[t + 1]) is.
      out["response_mask"][b, c, :k - 1] = resp[1:]
      out["format_mask"][b, c, :k - 1] = x.format[1:]
      out["last_index"][b, c] = k - 1

  def next_batch(self, batch_size: int, seq_len: int, rows: Sequence[int] | None = None
                 ) -> dict[str, np.ndarray]:
    """The next `batch_size` pairs, epoch after epoch; only the pairs in `rows` are filled."""
    stream_lib._check_shape(batch_size, seq_len)
    wanted = _wanted(batch_size, rows)
    out = self._empty(batch_size, seq_len)
    for b in range(batch_size):
      p = self._order.current()
      self._order.advance()
      if wanted[b]:
        self._fill(out, b, p, seq_len)
    return out

  def in_file_order(self, batch_size: int, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Every pair once in file order (held-out evaluation, a scoring pass), the last batch filled up with
    empty pairs (pair_index -1, all masks 0); leaves this stream's state alone."""
    stream_lib._check_shape(batch_size, seq_len)
    for start in range(0, len(self._pairs), batch_size):
      out = self._empty(batch_size, seq_len)
      for b, p in enumerate(range(start, min(start + batch_size, len(self._pairs)))):
        self._fill(out, b, p, seq_len)
      yield out


Score = Callable[[dict[str, np.ndarray]], Any]  # batch -> ref_logp [B, C]


def _checked(ref: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
  ref = np.asarray(ref, np.float32)
  want = batch["last_index"].shape
  if ref.shape != want:
    raise ConfigError(f"the scoring pass returned ref_logp of shape {ref.shape}, not [B, C] = {want}; "
                      "score must sum log-probs per row.")
  return ref


def ref_logp_table(pairs: PreferenceStream, score: Score, batch_size: int, seq_len: int) -> np.ndarray:
  """The scoring pass once over every pair (file order): ref_logp [N, C] float32, row = pair_index. The
  reference model is frozen, so one pass serves every epoch (`with_ref_logp(batches, table=...)`)."""
  table = np.full((len(pairs._pairs), C), np.nan, np.float32)
  for batch in pairs.in_file_order(batch_size, seq_len):
    real = batch["pair_index"] >= 0
    table[batch["pair_index"][real]] = _checked(score(batch), batch)[real]
  return table


class Scored:
  """`batches` with `ref_logp` [B, C] float32 added to each batch: by `score(batch)`, the reference model's
  scoring pass (e.g. `lambda b: score(ref_params, b)` from the losses), run on the batch; or looked up by
  pair_index in a `table` from `ref_logp_table`. The state is `batches`'s: ref_logp is never state."""

  def __init__(self, batches: Any, score: Score | None = None, table: np.ndarray | None = None):
    if (score is None) == (table is None):
      raise ConfigError("with_ref_logp: give either score= (a scoring pass per batch) or table= "
                        "(from ref_logp_table), not both or neither.")
    self.batches, self._score, self._table = batches, score, table

  def __iter__(self) -> "Scored":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.batches)
    if self._score is not None:
      return {**batch, "ref_logp": _checked(self._score(batch), batch)}
    idx = batch["pair_index"]
    ref = np.where((idx >= 0)[:, None], self._table[np.maximum(idx, 0)], 0).astype(np.float32)
    return {**batch, "ref_logp": ref}

  def get_state(self) -> dict:
    return self.batches.get_state()

  def set_state(self, state: dict) -> None:
    self.batches.set_state(state)


def with_ref_logp(batches: Any, score: Score | None = None, table: np.ndarray | None = None) -> Scored:
  return Scored(batches, score, table)
