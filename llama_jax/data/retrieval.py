"""Synthetic retrieval documents: key–value lists whose pairs are asked back later in the same document.

"key 4821 -> 93017" lines; after the first, each line is (with probability `repeat`) an earlier key asked
back with its value, at a distance drawn uniformly over what came before. Predicting a repeated value
needs the model to find its key anywhere in the context — the skill needle-in-a-haystack tests — so a
share of these in the long-context mix is how small models learn to retrieve quickly ([P] §3.4.2 states
the stage gate, not the data; the key–value task is the associative-recall task of the long-context
literature). Every document is a function of (seed, index) alone.
"""

from __future__ import annotations

import json
import os

import numpy as np

from llama_jax.errors import ConfigError

HEADER = "Key-value list. Each key keeps its value."


def document(seed: int, index: int, lines: int, repeat: float = 0.5, key_digits: int = 4,
             value_digits: int = 5) -> str:
  """Document `index` of the stream `seed`: `lines` lines after the header."""
  if lines < 2 or not 0 <= repeat < 1:
    raise ConfigError(f"retrieval documents: need lines >= 2 and 0 <= repeat < 1, got {lines}, {repeat}.")
  rng = np.random.default_rng([seed % 2**32, index])
  values: dict[int, int] = {}
  out = [HEADER]
  for i in range(lines):
    if values and rng.random() < repeat:
      key = list(values)[int(rng.integers(len(values)))]  # uniform over earlier keys: any distance
    else:
      key = int(rng.integers(10 ** (key_digits - 1), 10**key_digits))
      values.setdefault(key, int(rng.integers(10 ** (value_digits - 1), 10**value_digits)))
    out.append(f"key {key} -> {values[key]}")
  return "\n".join(out) + "\n"


def parse(text: str) -> list[tuple[int, int]]:
  """The (key, value) lines of a document, in order (for tests and inspection)."""
  lines = text.strip("\n").split("\n")
  if lines[0] != HEADER:
    raise ValueError(f"not a retrieval document: {lines[0]!r}")
  out = []
  for line in lines[1:]:
    k, v = line.removeprefix("key ").split(" -> ")
    out.append((int(k), int(v)))
  return out


def write_source(path: str, tokenizer, *, tokens_per_doc: int, num_docs: int, seed: int = 0,
                 repeat: float = 0.5) -> str:
  """A JSONL file of `num_docs` documents of about `tokens_per_doc` tokens each (written once: the file is
  a function of its arguments, named by them by the caller)."""
  if os.path.exists(path):
    return path
  per_line = len(tokenizer.encode(document(seed, 0, 64, repeat))) / 65  # tokens per line, measured
  lines = max(2, int(tokens_per_doc / per_line))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for i in range(num_docs):
      f.write(json.dumps({"text": document(seed, i, lines, repeat)}) + "\n")
  os.replace(tmp, path)
  return path
