"""Packed rows: the packer against a NumPy reference, the training stream (mixing by tokens, seeded order,
rows by index, JSON state, stage switches), the held-out pass, and errors naming flags."""

import json
import os
import sysconfig

import numpy as np
import pytest

from llama_jax.data import pipeline as data
from llama_jax.data import stream as stream_lib
from llama_jax.data.stream import FEATURES
from llama_jax.data.tokenizers import train_sentencepiece
from llama_jax.errors import ConfigError

from tests.data.test_pipeline import TOK, docs_of_stream, write_jsonl


def doc_set(n, seed=0, lo=3, hi=40):
  """n documents of distinct lengths-ish; token j of document d is 1000*d + j + 10 (so any token names
  its document and place)."""
  rng = np.random.default_rng(seed)
  return [np.arange(10, 10 + int(rng.integers(lo, hi)), dtype=np.int32) + 1000 * d for d in range(n)]


def make(docs_per_source, weights=None, seed=0, shuffle=True, restart=True):
  weights = weights or [1.0] * len(docs_per_source)
  return stream_lib.TrainStream(docs_per_source, weights, seed=seed, pad_id=0, restart_positions=restart,
                                shuffle=shuffle)


def reference_rows(docs, seq_len, restart, pad_id=0):
  """Concat-then-split in NumPy, independently of the packer: [rows, seq_len] arrays of FEATURES, the
  last row padded."""
  toks = np.concatenate(docs)
  doc = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
  n_rows = -(-len(toks) // seq_len)
  pad = n_rows * seq_len - len(toks)
  same_next = np.r_[doc[1:] == doc[:-1], False]  # the stream's next token belongs to the same document
  shape = lambda x, fill: np.r_[x, np.full(pad, fill)].reshape(n_rows, seq_len).astype(np.int32)
  inputs, doc_rt = shape(toks, pad_id), shape(doc, -1)
  targets = shape(np.where(same_next, np.r_[toks[1:], 0], pad_id), pad_id)
  col = np.broadcast_to(np.arange(seq_len), (n_rows, seq_len))
  starts = (col == 0) | (doc_rt != np.roll(doc_rt, 1, axis=1))
  real = doc_rt >= 0
  seg_start = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
  return {"inputs": inputs, "targets": targets, "loss_mask": shape(same_next, 0),
          "segment_ids": np.where(real, np.cumsum(starts, axis=1), 0),
          "positions": np.where(real, col - seg_start if restart else col, 0)}


def heldout(docs, seq_len, batch_size, restart=True):
  return list(stream_lib.HeldOut([docs], batch_size=batch_size, seq_len=seq_len, pad_id=0,
                                 restart_positions=restart))


# ----------------------------------------------------------------------------- the packer
@pytest.mark.parametrize("restart", [True, False])
def test_rows_equal_the_numpy_reference(restart):
  docs = doc_set(30)
  want = reference_rows(docs, 16, restart)
  # Training rows in file order (no shuffle): the full rows of the first epoch.
  s = make([docs], shuffle=False, restart=restart)
  full = len(np.concatenate(docs)) // 16
  got = [s.next_batch(4, 16) for _ in range(full // 4)]
  for k in FEATURES:
    np.testing.assert_array_equal(np.concatenate([b[k] for b in got]), want[k][:len(got) * 4], err_msg=k)
  # The held-out pass: every row, the last one padded, then empty rows up to the batch.
  got = heldout(docs, 16, 4, restart)
  assert len(got) == -(-len(want["inputs"]) // 4)
  for k in FEATURES:
    rows = np.concatenate([b[k] for b in got])
    np.testing.assert_array_equal(rows[:len(want[k])], want[k], err_msg=k)
    assert (rows[len(want[k]):] == 0).all(), k  # empty rows (pad_id 0 here)
  src = np.concatenate([b["source_id"] for b in got])
  assert (src[:len(want["inputs"])] == 0).all() and (src[len(want["inputs"]):] == -1).all()


def test_packing_hand_built():
  (b,) = heldout([np.array(d, np.int32) for d in ([10, 11, 12], [20, 21, 22, 23, 24], [30, 31])], 4, 3)
  got = {k: b[k].tolist() for k in FEATURES}
  # B is split across rows 1-2: its continuation is a new segment whose positions restart, and the target
  # of row 1's last token (20) is B's next token (21), which opens row 2.
  assert got["inputs"] == [[10, 11, 12, 20], [21, 22, 23, 24], [30, 31, 0, 0]]
  assert got["segment_ids"] == [[1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 0, 0]]
  assert got["positions"] == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 0]]
  assert got["targets"] == [[11, 12, 0, 21], [22, 23, 24, 0], [31, 0, 0, 0]]
  assert got["loss_mask"] == [[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 0, 0]]
  assert all(b[k].dtype == np.int32 for k in FEATURES)


def test_packing_positions_without_restart():
  (b,) = heldout([np.array(d, np.int32) for d in ([10, 11, 12], [20, 21, 22, 23, 24])], 4, 2, restart=False)
  assert b["positions"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
  assert b["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 1, 1, 1]]


def test_targets_and_mask_at_boundaries(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", ["abc", "defgh", "ij"])
  (b,) = list(stream_lib.HeldOut.from_sources([data.Source(path)], TOK, seq_len=8, batch_size=4))
  x, y, m, s = b["inputs"], b["targets"], b["loss_mask"], b["segment_ids"]
  for r in range(4):
    for t in range(8):
      if t + 1 < 8 and s[r, t] > 0 and s[r, t + 1] == s[r, t]:
        assert m[r, t] == 1 and y[r, t] == x[r, t + 1]
      if s[r, t] == 0 or x[r, t] == TOK.eos_id:
        assert m[r, t] == 0  # padding, and a document's last token (no next token in the document)
  # 3 docs -> 5 + 7 + 4 = 16 tokens = two full rows; the batch is padded with two empty rows.
  assert (s[2:] == 0).all() and (m[2:] == 0).all() and (b["source_id"][2:] == -1).all()
  assert s[0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]


def test_packing_keeps_every_token_once_real_tokenizer(tmp_path):
  src = os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
  tok = train_sentencepiece([src], str(tmp_path / "spm"), 400)
  texts = ["Hello  world\n\tx = 1", "日本語 🤖 déjà", open(src, encoding="utf-8").read(), "a", "b\n\n"]
  path = write_jsonl(tmp_path / "d.jsonl", texts)
  batches = list(stream_lib.HeldOut.from_sources([data.Source(path)], tok, seq_len=37, batch_size=3))
  ids = [tok.encode(t, bos=True, eos=True) for t in texts]
  got = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  np.testing.assert_array_equal(got, np.concatenate(ids))
  # Each document token except BOS is a target exactly once, with loss.
  tgt = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
  np.testing.assert_array_equal(tgt, np.concatenate([x[1:] for x in ids]))
  assert tok.decode(got[:len(ids[0])].tolist()) == texts[0]
  # Training rows in file order hold the same tokens, then wrap to the first document.
  s = stream_lib.TrainStream([data.documents(data.Source(path), tok)], [1.0], seed=0, pad_id=tok.pad_id,
                             shuffle=False)
  b = s.next_batch(len(got) // 37 + 1, 37)
  np.testing.assert_array_equal(b["inputs"].ravel()[:len(got)], got)


def test_heldout_is_deterministic_finite_and_complete(tmp_path):
  texts = [f"held-out {j} " * (j + 1) for j in range(9)]
  srcs = [data.Source(write_jsonl(tmp_path / "a.jsonl", texts[:5])),
          data.Source(write_jsonl(tmp_path / "b.jsonl", texts[5:]))]
  ds = stream_lib.HeldOut.from_sources(srcs, TOK, seq_len=20, batch_size=3)
  first, second = list(ds), list(ds)  # each iter() is a fresh pass
  n_rows = -(-sum(len(t.encode()) + 2 for t in texts) // 20)
  assert len(first) == -(-n_rows // 3)
  for x, y in zip(first, second):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert all(b["inputs"].shape == (3, 20) for b in first)
  assert docs_of_stream(first) == [tuple(TOK.encode(t, bos=True, eos=True)) for t in texts]


# ----------------------------------------------------------------------------- the training stream
def test_rows_by_index_equal_the_full_batch():
  """Each process fills only its rows; the rows it fills equal the full batch's, and the states agree."""
  docs = [doc_set(25, 1), doc_set(25, 2)]
  full, a, b = make(docs), make(docs), make(docs)
  for _ in range(5):
    f, x, y = full.next_batch(8, 12), a.next_batch(8, 12, rows=[0, 1, 2, 3]), b.next_batch(8, 12, rows=[2, 3, 6, 7])
    for k in (*FEATURES, "source_id"):
      np.testing.assert_array_equal(x[k][:4], f[k][:4])
      np.testing.assert_array_equal(y[k][[2, 3, 6, 7]], f[k][[2, 3, 6, 7]])
    assert a.get_state() == b.get_state() == full.get_state()


def test_state_is_json_and_resumes_exactly():
  docs = [doc_set(20, 3), doc_set(7, 4)]
  s = make(docs, weights=[0.7, 0.3], seed=5)
  for _ in range(9):  # past an epoch of the small source
    s.next_batch(4, 24)
  state = json.loads(json.dumps(s.get_state()))  # what the checkpoint writes
  assert state["sources"][1]["epoch"] >= 1
  want = [s.next_batch(4, 24) for _ in range(20)]  # crosses more epoch ends
  fresh = make(docs, weights=[0.7, 0.3], seed=5)
  fresh.set_state(state)
  for w in want:
    g = fresh.next_batch(4, 24)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])


def test_mixing_weights_are_token_shares_counted_by_source_id(tmp_path):
  # Source i's documents are made of letter i only, so a row's text tells which source filled it.
  texts = lambda i: ["abc"[i] * (7 * (j % 5 + 1)) for j in range(300)]
  srcs = [data.Source(write_jsonl(tmp_path / f"s{i}.jsonl", texts(i)), weight=w)
          for i, w in enumerate([0.5, 0.3, 0.2])]
  s = stream_lib.TrainStream.from_sources(srcs, TOK, seed=3)
  batches = [s.next_batch(100, 16) for _ in range(100)]
  ids = np.concatenate([b["source_id"] for b in batches])
  # Rows are one length here, so row counts are token counts; the mix is deterministic: within a row.
  np.testing.assert_allclose(np.bincount(ids, minlength=3), [5000, 3000, 2000], atol=1)
  inputs = np.concatenate([b["inputs"] for b in batches])
  letters = np.where(inputs >= 4, inputs - 4 - ord("a"), -1)  # -1 on BOS/EOS
  for r in range(len(ids)):
    assert set(letters[r][letters[r] >= 0].tolist()) == {ids[r]}
  # Weights only need a positive sum; a zero weight switches a source off.
  srcs[2] = data.Source(srcs[2].paths, weight=0.0)
  ids = stream_lib.TrainStream.from_sources(srcs, TOK).next_batch(500, 16)["source_id"]
  assert set(ids.tolist()) == {0, 1}


def test_seed_decides_the_order():
  docs = [doc_set(200, 5), doc_set(200, 6)]
  a, b, c = (make(docs, [0.8, 0.2], seed=seed) for seed in (1, 1, 2))
  for _ in range(3):
    x, y, z = a.next_batch(4, 8), b.next_batch(4, 8), c.next_batch(4, 8)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(x["inputs"], z["inputs"])
  # The order is the permutation drawn from (seed, source, epoch): a NumPy reference of source 0's rows.
  s = make([docs[0]], seed=1)
  seen = np.concatenate([s.next_batch(4, 8)["inputs"].ravel() for _ in range(5)])
  order = np.random.default_rng([1, 0, 0]).permutation(200)
  np.testing.assert_array_equal(seen, np.concatenate([docs[0][d] for d in order])[:len(seen)])


def test_stages_keep_the_token_shares():
  docs = [doc_set(200, 5), doc_set(200, 6)]
  s = make(docs, weights=[0.8, 0.2], seed=1)
  ids = np.concatenate([s.next_batch(10, 8)["source_id"] for _ in range(50)])
  assert abs((ids == 1).sum() - 100) <= 1  # 500 rows at 20%: a deterministic mix, off by at most 1 row
  # A second stage of rows 4x longer: the shares hold in tokens over both stages.
  ids2 = np.concatenate([s.next_batch(10, 32)["source_id"] for _ in range(50)])
  tokens1 = 8 * (ids == 1).sum() + 32 * (ids2 == 1).sum()
  assert abs(tokens1 - 0.2 * (500 * 8 + 500 * 32)) <= 32


def _tokens_seen(batches):
  return np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])


def test_a_new_stage_continues_the_document_stream():
  """Two batches of 4x16, then 2x40 until the epoch ends: every token of the epoch exactly once, in
  order — no document read twice, none skipped, not even the rest of the document cut by the switch."""
  docs = doc_set(40, 7)
  s = make([docs], seed=3)
  first = [s.next_batch(4, 16) for _ in range(2)]
  cut = s.get_state()["sources"][0]
  assert cut["offset"] > 0  # the switch falls inside a document
  second = []
  while s.get_state()["sources"][0]["epoch"] == 0:
    second.append(s.next_batch(2, 40))
  seen = _tokens_seen(first + second)
  order = np.random.default_rng([3, 0, 0]).permutation(40)
  epoch = np.concatenate([docs[d] for d in order])
  # The last row may run into the next epoch; the epoch itself is an exact prefix of what was seen.
  np.testing.assert_array_equal(seen[:len(epoch)], epoch)
  doc_of = seen[:len(epoch)] // 1000
  starts = doc_of[np.r_[True, doc_of[1:] != doc_of[:-1]]]
  assert len(starts) == len(set(starts.tolist())) == 40


# ----------------------------------------------------------------------------- errors
def test_bad_state_sources_and_shapes():
  with pytest.raises(ConfigError, match="resume with the same --train_files"):
    make([doc_set(3)]).set_state(make([doc_set(3), doc_set(3)]).get_state())
  for weights in ([0.0, 0.0], [1.0, -1.0], [float("nan"), 1.0]):
    with pytest.raises(ConfigError, match=r"--train_weights=.*finite, >= 0 and sum to > 0"):
      make([doc_set(3), doc_set(3)], weights=weights)
  with pytest.raises(ConfigError, match="--train_weights: give one weight per --train_files entry"):
    stream_lib.TrainStream([doc_set(3)], [1.0, 1.0], seed=0, pad_id=0)
  with pytest.raises(ConfigError, match="--train_files: give at least one training file"):
    stream_lib.TrainStream([], [], seed=0, pad_id=0)
  with pytest.raises(ConfigError, match="--train_files: source 1 has no documents"):
    make([doc_set(3), []])
  with pytest.raises(ConfigError, match="only empty documents"):
    make([[np.zeros(0, np.int32)] * 3]).next_batch(1, 4)
  with pytest.raises(ConfigError, match=r"--seq_len=1: must be an integer >= 2"):
    make([doc_set(3)]).next_batch(2, 1)
  with pytest.raises(ConfigError, match=r"--batch_size=0: must be a positive integer"):
    make([doc_set(3)]).next_batch(0, 8)
  with pytest.raises(ConfigError, match=r"--seq_len=1: must be an integer >= 2"):
    stream_lib.HeldOut([doc_set(3)], batch_size=2, seq_len=1, pad_id=0)
  with pytest.raises(ConfigError, match="--eval_files: give at least one held-out file"):
    stream_lib.HeldOut([], batch_size=2, seq_len=8, pad_id=0)
