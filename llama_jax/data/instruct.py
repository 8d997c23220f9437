"""A small instruction set and preference set made from the embedded corpus (data/corpus.py), reproducibly.

Each example cuts a snippet from a corpus document at a line boundary: the first `prompt_chars` characters
(whole lines, the last one cut) are the prompt, the next `response_chars` the true continuation.

  SFT         {"messages": [{"role": "user", "content": "Continue this passage:\\n<prompt>"},
                            {"role": "assistant", "content": "<true continuation>"}]}
  preference  {"prompt": "Continue this passage:\\n<prompt>", "chosen": "<true continuation>",
               "rejected": "<the continuation of a snippet of the other source>"}
              (a Shakespeare prompt gets a Python continuation as the rejected answer and vice versa:
              something a tiny reward model can learn to tell apart)
  prompts     {"prompt": "Continue this passage:\\n<prompt>"} (the held-out prompts, for rejection sampling)

Train examples come only from the corpus's train documents, held-out ones only from its held-out documents,
so the two never share a document. Every choice is drawn from `random.Random(f"{seed}:{split}")`: the same
corpus and arguments give the same bytes. The lengths are in characters (no tokenizer needed); with the
defaults a dialog is ~60-200 tokens of the corpus's SentencePiece model.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping

from llama_jax.errors import ConfigError

INSTRUCTION = "Continue this passage:\n"
FILES = ("sft_train", "sft_heldout", "pref_train", "pref_heldout", "prompts_heldout")


def _read_docs(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f if line.strip()]


def _snippet(rng: random.Random, docs: list[str], prompt_chars: int, response_chars: int
             ) -> tuple[str, str] | None:
  """(prompt, continuation) from a random line of a random document, or None if that spot is too short."""
  text = docs[rng.randrange(len(docs))]
  starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
  start = starts[rng.randrange(len(starts))]
  piece = text[start:start + prompt_chars + response_chars]
  prompt, response = piece[:prompt_chars], piece[prompt_chars:]
  cut = prompt.rfind("\n")  # the prompt ends at a line end when it can
  if cut > prompt_chars // 2:
    prompt, response = prompt[:cut + 1], (prompt[cut + 1:] + response)[:response_chars]
  if len(prompt.strip()) < prompt_chars // 3 or len(response.strip()) < response_chars // 3:
    return None
  return prompt, response


def _examples(docs: Mapping[str, list[str]], rng: random.Random, n: int, prompt_chars: int,
              response_chars: int) -> list[tuple[str, str, str]]:
  """n (prompt, chosen, rejected): sources alternate; rejected is a continuation of the other source."""
  sources = sorted(docs)
  if len(sources) != 2:
    raise ConfigError(f"build_sets: needs exactly two sources (e.g. shakespeare and python), got {sources}.")
  out = []
  while len(out) < n:
    src = sources[len(out) % 2]
    other = sources[1 - len(out) % 2]
    a = _snippet(rng, docs[src], prompt_chars, response_chars)
    b = _snippet(rng, docs[other], prompt_chars, response_chars)
    if a is None or b is None or a[1] == b[1]:
      continue
    out.append((a[0], a[1], b[1]))
  return out


def _write(path: str, records: list[dict]) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
  os.replace(tmp, path)


def build_sets(train: Mapping[str, str], heldout: Mapping[str, str], out_dir: str, *, seed: int = 0,
               n_train: int = 512, n_heldout: int = 64, prompt_chars: int = 200, response_chars: int = 100
               ) -> dict[str, str]:
  """Writes out_dir/{sft_train,sft_heldout,pref_train,pref_heldout,prompts_heldout}.jsonl from the corpus's
  train and held-out JSONL files (`Corpus.train` / `Corpus.heldout`: source -> path); returns name -> path."""
  if n_train < 1 or n_heldout < 1:
    raise ConfigError(f"build_sets: n_train={n_train} and n_heldout={n_heldout} must be >= 1.")
  if set(train) != set(heldout):
    raise ConfigError(f"build_sets: train sources {sorted(train)} differ from held-out {sorted(heldout)}.")
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in FILES}
  for split, files, n in (("train", train, n_train), ("heldout", heldout, n_heldout)):
    docs = {s: _read_docs(p) for s, p in sorted(files.items())}
    for s, d in docs.items():
      if not d:
        raise ConfigError(f"build_sets: {files[s]} has no documents.")
    examples = _examples(docs, random.Random(f"{seed}:{split}"), n, prompt_chars, response_chars)
    _write(paths[f"sft_{split}"], [
        {"messages": [{"role": "user", "content": INSTRUCTION + p}, {"role": "assistant", "content": c}]}
        for p, c, _ in examples])
    _write(paths[f"pref_{split}"], [{"prompt": INSTRUCTION + p, "chosen": c, "rejected": r}
                                    for p, c, r in examples])
    if split == "heldout":
      _write(paths["prompts_heldout"], [{"prompt": INSTRUCTION + p} for p, _, _ in examples])
  return paths
