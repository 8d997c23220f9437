"""Rejection sampling (Llama 3 §4.2.2): K samples per prompt from the policy, the reward model keeps the best.

For each prompt (a list of messages ending with a user turn; ipython too, a tool's answer) the policy
samples K responses (temperature / top-p; the paper takes K in 10..30), each up to the format's end of turn
(<|eot_id|> / <|im_end|>; also <|eom_id|> and the tokenizer's end id). Each response's text, as an
assistant message after the prompt, is rendered with the chat format and scored by the reward model at the
dialog's last token (what data/posttrain.py's `last_index` points at, where the reward model was trained
to read). The best (the first of equal best) is kept as an SFT dialog:
  {"messages": prompt + [{"role": "assistant", "content": best}], "score": s, "scores": [K floats]}
  (+ "samples": [K texts] with `keep_samples`), one JSON line each, read back by data/posttrain.read_sft.

Seeds: sample j of prompt i draws from fold_in(fold_in(key(seed), i), j), one key per generated row
(inference/generate.py), so the output does not depend on `batch_size` or on which rows share a batch.
The prompts × K rows go through `generate` `batch_size` rows at a time, prompt-major.

An empty (or whitespace-only) response is scored like any other; if it is the best, the prompt's record
has empty content, which read_sft refuses, so `write_jsonl` leaves it out and counts it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax.config import ModelConfig
from llama_jax.data import posttrain
from llama_jax.data.chat import ChatFormat, check_dialog, render
from llama_jax.data.tokenizers import Tokenizer, check_model_vocab
from llama_jax.errors import ConfigError
from llama_jax.inference import generate
from llama_jax.model import factory
from llama_jax.parallel import sharding

PROMPT_ENDS = ("user", "ipython")


def check_prompt(messages: Any, fmt: ChatFormat, what: str = "'messages'") -> None:
  check_dialog(messages, fmt, what)
  if messages[-1]["role"] not in PROMPT_ENDS:
    raise ConfigError(f"{what} ends with a message of role {messages[-1]['role']!r}; a prompt ends with the "
                      "user's turn (drop the answer: the policy writes it).")


def read_prompts(paths: str | Sequence[str], fmt: ChatFormat, on_bad_line: posttrain.OnBadLine = "fail",
                 flag: str = "--prompts") -> list[list[dict]]:
  """Prompts from JSONL: {"messages": [...]} ending with a user turn, or {"prompt": "text" | [...]}."""

  def parse(obj: dict) -> list[dict]:
    if "messages" in obj:
      check_prompt(obj["messages"], fmt)
      return obj["messages"]
    if "prompt" in obj:
      messages = posttrain._prompt_messages(obj["prompt"], fmt)  # a string is one user message
      check_prompt(messages, fmt, "'prompt'")
      return messages
    raise ConfigError("no 'messages' or 'prompt' field; write {\"messages\": [...]} or {\"prompt\": \"...\"}.")

  return posttrain._read_files(paths, parse, on_bad_line, flag)[0]


def rejection_sample(policy_cfg: ModelConfig, policy_params: Any, reward_cfg: ModelConfig, reward_params: Any,
                     tokenizer: Tokenizer, prompts: Sequence[Sequence[dict]], *, k: int, temperature: float,
                     top_p: float, max_new_tokens: int, seed: int, mesh: Mesh | None = None,
                     batch_size: int = 64, keep_samples: bool = False, fmt: ChatFormat | None = None
                     ) -> list[dict]:
  """One record per prompt, in order (see the module docstring)."""
  if policy_cfg.head != "lm":
    raise ConfigError(f"the policy's ModelConfig.head is {policy_cfg.head!r}; the policy is a language model "
                      "(head='lm').")
  if reward_cfg.head != "reward":
    raise ConfigError(f"the reward model's ModelConfig.head is {reward_cfg.head!r}; give a reward model "
                      "(head='reward', trained with experiments/post_train.py's reward recipe).")
  if k < 1:
    raise ConfigError(f"--k={k}: sample at least 1 response per prompt.")
  if batch_size < 1:
    raise ConfigError(f"--batch_size={batch_size}: must be >= 1.")
  check_model_vocab(policy_cfg.vocab_size, tokenizer, "the policy's vocab_size")
  check_model_vocab(reward_cfg.vocab_size, tokenizer, "the reward model's vocab_size")
  fmt = fmt or ChatFormat.for_tokenizer(tokenizer)
  for i, p in enumerate(prompts):
    check_prompt(list(p), fmt, f"prompt {i}")
  stop_ids = tuple(sorted({fmt.end_id, tokenizer.eos_id} | ({fmt.eom_id} if fmt.eom_id is not None else set())))
  prompt_ids = [render(tokenizer, fmt, p, add_generation_prompt=True).ids.tolist() for p in prompts]

  # Rows prompt-major: row r is sample r % k of prompt r // k, with its own key.
  rows = [(i, j) for i in range(len(prompts)) for j in range(k)]
  base = jax.random.key(seed)
  keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))(
      jnp.asarray([i for i, _ in rows], jnp.uint32), jnp.asarray([j for _, j in rows], jnp.uint32))
  texts = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    new = generate.generate(policy_cfg, policy_params, [prompt_ids[i] for i, _ in chunk], max_new_tokens,
                            temperature=temperature, top_p=top_p, rng=keys[start:start + len(chunk)],
                            stop_ids=stop_ids, pad_id=tokenizer.pad_id, mesh=mesh)
    texts += [tokenizer.decode(ids) for ids in new]

  dialogs = [list(prompts[i]) + [{"role": "assistant", "content": texts[r]}] for r, (i, _) in enumerate(rows)]
  scores = score_dialogs(reward_cfg, reward_params, tokenizer, fmt, dialogs, mesh=mesh, batch_size=batch_size)
  out = []
  for i, p in enumerate(prompts):
    s = scores[i * k:(i + 1) * k]
    best = int(np.argmax(s))  # the first of equal best
    record = {"messages": dialogs[i * k + best], "score": float(s[best]), "scores": [float(x) for x in s]}
    if keep_samples:
      record["samples"] = texts[i * k:(i + 1) * k]
    out.append(record)
  return out


def score_dialogs(reward_cfg: ModelConfig, reward_params: Any, tokenizer: Tokenizer, fmt: ChatFormat,
                  dialogs: Sequence[Sequence[dict]], *, mesh: Mesh | None = None, batch_size: int = 64
                  ) -> np.ndarray:
  """The reward of each complete dialog (rendered with `fmt`), read at its last token: float32 [len]."""
  ids = [render(tokenizer, fmt, d).ids for d in dialogs]
  longest = max(len(x) for x in ids)
  if longest > reward_cfg.max_seq_len:
    raise ConfigError(f"a prompt + response is {longest} tokens, longer than the reward model's max_seq_len="
                      f"{reward_cfg.max_seq_len}; lower --max_new_tokens or shorten the prompts.")
  # Rows padded to batch_size (and the data-parallel degree), length to a power of two: few compiles.
  t = min(1 << (longest - 1).bit_length(), reward_cfg.max_seq_len)
  n = batch_size if mesh is None else -(-batch_size // _dp(mesh)) * _dp(mesh)
  run = _scorer(reward_cfg, mesh)
  rules = sharding.logical_rules(reward_cfg, mesh) if mesh is not None else None
  out = []
  for start in range(0, len(ids), batch_size):
    chunk = ids[start:start + batch_size]
    tokens_BT = np.full((n, t), tokenizer.pad_id, np.int32)
    segments_BT = np.zeros((n, t), np.int32)
    last_B = np.zeros((n,), np.int32)
    for b, x in enumerate(chunk):
      tokens_BT[b, :len(x)], segments_BT[b, :len(x)], last_B[b] = x, 1, len(x) - 1
    with sharding.use(mesh, rules) if mesh is not None else contextlib.nullcontext():  # one use each
      reward_B = run(reward_params, tokens_BT, segments_BT, last_B)
    out.append(np.asarray(reward_B, np.float32)[:len(chunk)])
  return np.concatenate(out)


def _dp(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


@functools.lru_cache(maxsize=8)
def _scorer(config: ModelConfig, mesh: Mesh | None):
  del mesh  # in the key: the logical constraints resolve against it when traced
  model = factory.make_model(config)

  @jax.jit
  def run(params, tokens_BT, segment_ids_BT, last_index_B):
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    return model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT, last_index_B=last_index_B)

  return run


def write_jsonl(records: Sequence[dict], path: str) -> int:
  """Writes the records read_sft can read (the best response not empty); returns how many it left out."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  skipped = 0
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      if not r["messages"][-1]["content"].strip():
        skipped += 1
        continue
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return skipped
