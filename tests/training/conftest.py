"""Fixtures shared by the run-level tests (test_pretrain.py, test_loop.py)."""

import json
import os
import sysconfig

import pytest

from llama_jax.data import tokenizers as tokenizer_lib


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
  """Real text (stdlib Python sources) as JSONL train/held-out files and a tokenizer trained on them."""
  d = tmp_path_factory.mktemp("text")
  stdlib = sysconfig.get_paths()["stdlib"]
  files = sorted(f for f in os.listdir(stdlib) if f.endswith(".py"))[:60]
  docs = [open(os.path.join(stdlib, f), encoding="utf-8", errors="replace").read() for f in files]
  for name, part in (("train", docs[:50]), ("eval", docs[50:])):
    with open(d / f"{name}.jsonl", "w") as f:
      for text in part:
        f.write(json.dumps({"text": text}) + "\n")
  with open(d / "spm_input.txt", "w") as f:
    f.write("\n".join(docs[:50]))
  tokenizer_lib.train_sentencepiece([str(d / "spm_input.txt")], str(d / "tok"), 512)
  return {"train": str(d / "train.jsonl"), "eval": str(d / "eval.jsonl"), "tokenizer": str(d / "tok.model")}
