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
from typing import Sequence

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
                 repeat: float = 0.5, filler: Sequence[str] | None = None) -> str:
  """A JSONL file of `num_docs` documents (written once: the file is a function of its arguments, named by
  them by the caller). Key-value lists of about `tokens_per_doc` tokens each, or, given `filler` texts,
  fact documents (`fact_document`) of `tokens_per_doc` / 4 .. `tokens_per_doc` tokens, so that facts and
  questions are at every distance up to the row length."""
  if os.path.exists(path):
    return path
  if filler:
    sample = "".join(filler)[:20000]
    chars_per_token = len(sample) / max(1, len(tokenizer.encode(sample)))  # measured on the filler
    rng = np.random.default_rng([seed % 2**32, 2])
    sizes = rng.integers(tokens_per_doc // 4, tokens_per_doc + 1, size=num_docs) * chars_per_token
    docs = (fact_document(seed, i, filler, int(c), recall=1 / 3, numbers=0.5) for i, c in enumerate(sizes))
  else:
    per_line = len(tokenizer.encode(document(seed, 0, 64, repeat))) / 65  # tokens per line, measured
    lines = max(2, int(tokens_per_doc / per_line))
    docs = (document(seed, i, lines, repeat) for i in range(num_docs))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for doc in docs:
      f.write(json.dumps({"text": doc}) + "\n")
  os.replace(tmp, path)
  return path


# Facts planted in text: the needle's form, with subjects the needle never uses ("secret number" is left
# out), so the gate measures retrieval of a phrase the model was not trained on.
ADJECTIVES = ("hidden", "magic", "lucky", "special", "private", "old", "first", "last", "blue", "quiet")
NOUNS = ("code", "key", "pin", "value", "count", "password", "answer", "label", "price", "year")


def fact_document(seed: int, index: int, filler: Sequence[str], chars: int, max_facts: int = 4,
                  recall: float = 0.5, numbers: float = 0.0) -> str:
  """Document `index` of the stream `seed`: a window of about `chars` characters of `filler` text with
  1..max_facts facts "The <adjective> <noun> is <number>." planted at random depths, then each asked
  back in random order: "What is the <adjective> <noun>? The <adjective> <noun> is <number>."
  With probability `recall`, the document instead asks back a whole passage: "Remember: <first half>"
  ... "Repeat: <first half>" — copying is the skill retrieval builds on, and in a passage nearly every
  token rewards it (facts reward a few digits per question). With probability `numbers` (of the rest), the
  passage is a list of random numbers instead (about as many tokens as the text passage would be): a
  number is read back digit by digit, and copying digits after their predecessors is the mechanism (an
  induction head) that answers the needle's question."""
  if not filler or chars < 1 or max_facts < 1:
    raise ConfigError(f"fact documents: need filler text, chars >= 1 and max_facts >= 1, got "
                      f"{len(filler)} texts, {chars}, {max_facts}.")
  rng = np.random.default_rng([seed % 2**32, index, 1])
  text = filler[int(rng.integers(len(filler)))]
  start = int(rng.integers(max(1, len(text) - chars)))
  window = (text * (1 + chars // max(len(text), 1)))[start: start + chars]
  kind = rng.random()
  if kind < recall + (1 - recall) * numbers:
    # A digit is about one token, filler text about four characters per token.
    half = window[: len(window) // 2] if kind < recall else _number_list(rng, chars // 8)
    return f"Remember:\n{half}\nRepeat:\n{half}\n"
  # The facts and questions count toward `chars` (about 70 characters a fact): at most one fact per 150
  # characters, and the filler window shrinks by what they take, so the document keeps its size.
  n = int(rng.integers(1, max(1, min(max_facts, chars // 150)) + 1))
  subjects = [f"{ADJECTIVES[a]} {NOUNS[b]}" for a, b in
              zip(rng.choice(len(ADJECTIVES), n, replace=False), rng.choice(len(NOUNS), n, replace=False))]
  values = [str(int(rng.integers(10 ** (d - 1), 10**d))) for d in rng.integers(3, 7, size=n)]
  facts = [f"\nThe {s} is {x}.\n" for s, x in zip(subjects, values)]
  questions = [f"\nWhat is the {s}? The {s} is {x}." for s, x in zip(subjects, values)]
  window = window[: max(0, chars - sum(map(len, facts + questions)))]
  cuts = sorted(int(c) for c in rng.integers(0, len(window) + 1, size=n))
  parts, prev = [], 0
  for cut, fact in zip(cuts, facts):
    parts += [window[prev:cut], fact]
    prev = cut
  parts.append(window[prev:])
  parts += [questions[i] for i in rng.permutation(n)]
  return "".join(parts) + "\n"


def _number_list(rng: np.random.Generator, chars: int) -> str:
  """Random 3..6-digit numbers separated by spaces, about `chars` characters."""
  listed, size = [], 0
  while size < chars:
    digits = int(rng.integers(3, 7))
    listed.append(str(int(rng.integers(10 ** (digits - 1), 10**digits))))
    size += len(listed[-1]) + 1
  return " ".join(listed)
