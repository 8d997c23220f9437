"""The global training stream: packing as the grain packer, rows by index, JSON state, stage switches."""

import json

import numpy as np
import pytest

from llama_jax.data import pipeline as data
from llama_jax.data import stream as stream_lib
from llama_jax.errors import ConfigError

from tests.data.test_pipeline import pack  # the grain packer on hand-given documents: the reference


def doc_set(n, seed=0, lo=3, hi=40):
  """n documents of distinct lengths-ish; token j of document d is 1000*d + j + 10 (so any token names
  its document and place)."""
  rng = np.random.default_rng(seed)
  return [np.arange(10, 10 + int(rng.integers(lo, hi)), dtype=np.int32) + 1000 * d for d in range(n)]


def make(docs_per_source, weights=None, seed=0, shuffle=True, restart=True):
  weights = weights or [1.0] * len(docs_per_source)
  return stream_lib.TrainStream(docs_per_source, weights, seed=seed, pad_id=0, restart_positions=restart,
                                shuffle=shuffle)


@pytest.mark.parametrize("restart", [True, False])
def test_rows_equal_the_grain_packer(restart):
  docs = doc_set(30)
  want = pack(docs, seq_len=16, restart=restart)  # file order, one source
  s = make([docs], shuffle=False, restart=restart)
  got = [s.next_batch(4, 16) for _ in range(len(want) // 4)]
  for k in data.FEATURES:
    np.testing.assert_array_equal(np.concatenate([b[k] for b in got]),
                                  np.stack([r[k] for r in want[:len(got) * 4]]), err_msg=k)


def test_rows_by_index_equal_the_full_batch():
  """Each process fills only its rows; the rows it fills equal the full batch's, and the states agree."""
  docs = [doc_set(25, 1), doc_set(25, 2)]
  full, a, b = make(docs), make(docs), make(docs)
  for _ in range(5):
    f, x, y = full.next_batch(8, 12), a.next_batch(8, 12, rows=[0, 1, 2, 3]), b.next_batch(8, 12, rows=[2, 3, 6, 7])
    for k in (*data.FEATURES, "source_id"):
      np.testing.assert_array_equal(x[k][:4], f[k][:4])
      np.testing.assert_array_equal(y[k][[2, 3, 6, 7]], f[k][[2, 3, 6, 7]])
    assert a.get_state() == b.get_state() == full.get_state()


def test_state_is_json_and_resumes_exactly():
  docs = [doc_set(20, 3), doc_set(7, 4)]
  s = make(docs, weights=[0.7, 0.3], seed=5)
  for _ in range(9):  # past an epoch of the small source
    s.next_batch(4, 24)
  state = json.loads(json.dumps(s.get_state()))
  assert state["sources"][1]["epoch"] >= 1
  want = [s.next_batch(4, 24) for _ in range(3)]
  fresh = make(docs, weights=[0.7, 0.3], seed=5)
  fresh.set_state(state)
  for w in want:
    g = fresh.next_batch(4, 24)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])


def test_seed_changes_the_order_and_weights_are_token_shares():
  docs = [doc_set(200, 5), doc_set(200, 6)]
  s = make(docs, weights=[0.8, 0.2], seed=1)
  ids = np.concatenate([s.next_batch(10, 8)["source_id"] for _ in range(50)])
  assert abs((ids == 1).sum() - 100) <= 1  # 500 rows at 20%: a deterministic mix, off by at most 1 row
  # A second stage of rows 4x longer: the shares hold in tokens over both stages.
  ids2 = np.concatenate([s.next_batch(10, 32)["source_id"] for _ in range(50)])
  tokens1 = 8 * (ids == 1).sum() + 32 * (ids2 == 1).sum()
  assert abs(tokens1 - 0.2 * (500 * 8 + 500 * 32)) <= 32
  other = make(docs, weights=[0.8, 0.2], seed=2)
  assert not np.array_equal(make(docs, [0.8, 0.2], seed=1).next_batch(4, 8)["inputs"],
                            other.next_batch(4, 8)["inputs"])


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


def test_bad_state_and_sources():
  with pytest.raises(ConfigError, match="resume with the same --train_files"):
    make([doc_set(3)]).set_state(make([doc_set(3), doc_set(3)]).get_state())
  with pytest.raises(ConfigError, match="--train_weights"):
    make([doc_set(3)], weights=[-1.0])
  with pytest.raises(ConfigError, match="only empty documents"):
    make([[np.zeros(0, np.int32)] * 3]).next_batch(1, 4)
