"""Documents: text, JSONL and ArrayRecord sources, the token cache, and errors naming the flag."""

import json
import os

import numpy as np
import pytest

from llama_jax.data import pipeline as data
from llama_jax.data import stream as stream_lib
from llama_jax.errors import ConfigError


class ByteTokenizer:
  """UTF-8 bytes shifted past 4 specials: exact, instant, and independent of the code under test."""

  vocab_size, pad_id, bos_id, eos_id = 260, 0, 1, 2
  fingerprint = "bytes-v1"

  def encode(self, text, bos=False, eos=False):
    return [self.bos_id] * bos + [b + 4 for b in text.encode()] + [self.eos_id] * eos

  def encode_batch(self, texts, bos=False, eos=False):
    return [self.encode(t, bos, eos) for t in texts]

  def decode(self, ids):
    return bytes(i - 4 for i in ids if i >= 4).decode()


TOK = ByteTokenizer()


def write_jsonl(path, texts, field="text"):
  with open(path, "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({field: t}) + "\n")
  return str(path)


def docs_of_stream(batches):
  """Non-pad input tokens of all rows in order, split at BOS back into documents."""
  stream = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  starts = np.flatnonzero(stream == TOK.bos_id)
  return [tuple(x) for x in np.split(stream, starts[1:])]


def test_documents_in_file_order(tmp_path):
  texts = ["first", "second ✓", "third\nline"]
  path = write_jsonl(tmp_path / "d.jsonl", texts, field="body")
  docs = data.documents(data.Source(path, field="body"), TOK)
  assert [d.tolist() for d in docs] == [TOK.encode(t, bos=True, eos=True) for t in texts]
  assert all(d.dtype == np.int32 for d in docs)


def test_text_and_array_record_sources(tmp_path):
  (tmp_path / "a.txt").write_text("one document\n\nwith blank lines\n")
  ar = pytest.importorskip("array_record.python.array_record_module")
  w = ar.ArrayRecordWriter(str(tmp_path / "b.array_record"), "group_size:1")
  for t in ["record one", "record two ✓"]:
    w.write(t.encode())
  w.close()
  srcs = [data.Source(str(tmp_path / "a.txt")), data.Source(str(tmp_path / "b.array_record"))]
  docs = docs_of_stream(list(stream_lib.HeldOut.from_sources(srcs, TOK, seq_len=16, batch_size=2)))
  assert [TOK.decode(d) for d in docs] == ["one document\n\nwith blank lines\n", "record one", "record two ✓"]


def test_token_cache(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", ["cached text", "more"])
  a = data.tokenize_file(path, TOK, cache_dir=str(tmp_path / "cache"))
  assert len(os.listdir(tmp_path / "cache")) == 1
  b = data.tokenize_file(path, TOK, cache_dir=str(tmp_path / "cache"))
  want = [TOK.encode(t, True, True) for t in ["cached text", "more"]]
  assert [x.tolist() for x in a] == [x.tolist() for x in b] == want


def test_bad_files_raise_config_error(tmp_path):
  train = lambda path: stream_lib.TrainStream.from_sources([data.Source(str(path))], TOK)
  with pytest.raises(ConfigError, match=r"--train_files.*does not exist"):
    train(tmp_path / "missing.jsonl")
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ConfigError, match=r"--train_files.*empty"):
    train(tmp_path / "empty.txt")
  (tmp_path / "latin1.txt").write_bytes("naïve".encode("latin-1"))
  with pytest.raises(ConfigError, match=r"--train_files.*latin1.txt.*not UTF-8.*byte offset 2"):
    train(tmp_path / "latin1.txt")
  with pytest.raises(ConfigError, match=r"--eval_files.*latin1.txt.*byte offset 2"):
    stream_lib.HeldOut.from_sources([data.Source(str(tmp_path / "latin1.txt"))], TOK, seq_len=8,
                                    batch_size=2)
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
  with pytest.raises(ConfigError, match=r"line 2 has no string field 'text'.*--text_field"):
    train(tmp_path / "bad.jsonl")
  (tmp_path / "notjson.jsonl").write_text('{"text": "ok"}\n{"text": \n')
  with pytest.raises(ConfigError, match=r"--train_files.*notjson.jsonl.*line 2 is not JSON"):
    train(tmp_path / "notjson.jsonl")
