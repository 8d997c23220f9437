"""Needle in a haystack: can the model read back one fact planted at a given depth of a long context?

([P] §3.4.2: each long-context stage ends when "needle in a haystack" is solved at that length.)
A row is, in tokens:   BOS | haystack[:i] | needle | haystack[i:] | question | answer
with the needle "The secret number is 48213." planted at depth d (i = d × haystack length) and the question
"What is the secret number? The secret number is"; the row is exactly `length` tokens, answer included.
The haystack is a window of held-out text (documents joined end to end, tiled if too short).

Two scores per (length, depth) cell, each the fraction of trials right:
  logprob  the answer's total log-probability beats each of K distractor numbers with as many tokens
           (strictly: a tie is a miss, so a model that cannot tell them apart scores 0, not 1/(K+1));
  greedy   the greedy continuation of the prompt, decoded, starts with the number (and no more digits).
The number, the distractors and the haystack windows come from `seed` alone.

The model is any `logits_fn(params, tokens_BT) -> logits_BTV` (`evaluate`); `evaluate_model` runs the
Transformer on a mesh. Rows of one length share one shape (padded with repeated rows up to `batch_size`),
so each length compiles one scoring and one greedy program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from llama_jax.config import ModelConfig
from llama_jax.data.tokenizers import Tokenizer
from llama_jax.errors import ConfigError
from llama_jax.model import factory
from llama_jax.parallel import sharding

LogitsFn = Callable[[Any, Int[Array, "B T"]], Float[Array, "B T V"]]


@dataclasses.dataclass(frozen=True)
class NeedleConfig:
  lengths: tuple[int, ...]  # row lengths in tokens, answer included
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  trials: int = 4  # per (length, depth) cell, each with its own number and haystack window
  num_distractors: int = 9  # K
  digits: int = 5
  batch_size: int = 8  # rows per forward pass
  seed: int = 0
  greedy: bool = True
  needle: str = "The secret number is {number}."
  question: str = "What is the secret number? The secret number is"

  def __post_init__(self):
    def need(ok: bool, field: str, msg: str):
      if not ok:
        raise ConfigError(f"NeedleConfig.{field}={getattr(self, field)!r}: {msg}")

    need(len(self.lengths) > 0 and all(n > 0 for n in self.lengths), "lengths", "give positive lengths.")
    need(len(self.depths) > 0 and all(0 <= d <= 1 for d in self.depths), "depths",
         "give depths in [0, 1] (0 = start of the haystack, 1 = just before the question).")
    need(self.trials >= 1, "trials", "use at least 1.")
    need(self.num_distractors >= 1, "num_distractors", "use at least 1.")
    need(2 <= self.digits <= 12, "digits", "use 2..12 digits.")
    need(self.batch_size >= 1, "batch_size", "use at least 1.")
    need(self.needle.count("{number}") == 1, "needle", "must contain '{number}' once.")


@dataclasses.dataclass(frozen=True)
class _Trial:
  length: int
  depth: float
  number: str
  prompt: list[int]  # length - len(answer) tokens
  candidates: list[list[int]]  # the answer first, then K distractors, each len(answer) tokens


def load_texts(paths: Sequence[str], max_docs: int | None = None) -> list[str]:
  """The "text" fields of JSONL files (e.g. a prepared corpus's held-out splits), in order."""
  texts = []
  for path in paths:
    if not os.path.isfile(path):
      raise ConfigError(f"needle-in-a-haystack texts: {path!r}: no such file; give JSONL files with a "
                        "'text' field.")
    with open(path, encoding="utf-8") as f:
      texts += [json.loads(line)["text"] for line in f if line.strip()]
  return texts[:max_docs]


def _numbers(rng: np.random.Generator, tokenizer: Tokenizer,
             cfg: NeedleConfig) -> tuple[str, list[list[int]]]:
  """A number and its candidate token lists: the answer first, then K distinct same-length distractors."""
  lo, hi = 10 ** (cfg.digits - 1), 10**cfg.digits
  number = str(rng.integers(lo, hi))
  answer = tokenizer.encode(" " + number)
  seen, candidates = {number}, [answer]
  for _ in range(200 * cfg.num_distractors):
    other = str(rng.integers(lo, hi))
    ids = tokenizer.encode(" " + other)
    if other not in seen and len(ids) == len(answer):
      seen.add(other)
      candidates.append(ids)
      if len(candidates) == cfg.num_distractors + 1:
        return number, candidates
  raise ConfigError(f"NeedleConfig.num_distractors={cfg.num_distractors}: found only {len(candidates) - 1} "
                    f"{cfg.digits}-digit numbers with as many tokens as {number}; use fewer distractors or "
                    "another NeedleConfig.digits.")


def build_trials(tokenizer: Tokenizer, texts: Sequence[str], cfg: NeedleConfig) -> list[_Trial]:
  """Every (length, depth, trial) case, in that order; a function of the inputs and `cfg.seed` alone."""
  stream = [t for ids in tokenizer.encode_batch(list(texts)) for t in ids]
  if not stream:
    raise ConfigError("needle-in-a-haystack: the haystack texts are empty; give held-out documents.")
  pre, post = cfg.needle.split("{number}")
  pre_ids, post_ids = tokenizer.encode("\n" + pre.rstrip()), tokenizer.encode(post + "\n")
  question = tokenizer.encode("\n" + cfg.question)
  rng = np.random.default_rng(cfg.seed)
  trials = []
  for length in cfg.lengths:
    for depth in cfg.depths:
      for _ in range(cfg.trials):
        number, candidates = _numbers(rng, tokenizer, cfg)
        needle = pre_ids + candidates[0] + post_ids
        n_hay = length - 1 - len(needle) - len(question) - len(candidates[0])
        if n_hay < 0:
          raise ConfigError(f"NeedleConfig.lengths: {length} tokens cannot hold the needle, question and "
                            f"answer (with BOS, {length - n_hay} tokens); use longer lengths.")
        start = int(rng.integers(len(stream)))
        reps = -(-(start + n_hay) // len(stream))
        hay = (stream * max(reps, 1))[start: start + n_hay]
        at = int(round(depth * n_hay))
        prompt = [tokenizer.bos_id] + hay[:at] + needle + hay[at:] + question
        trials.append(_Trial(length, depth, number, prompt, candidates))
  return trials


def model_logits_fn(config: ModelConfig) -> LogitsFn:
  """`logits_fn(params, tokens_BT)` of the Transformer (run it inside `sharding.use` on a mesh)."""
  model = factory.make_model(config)
  return lambda params, tokens_BT: model.apply({"params": params}, tokens_BT)


def evaluate_model(config: ModelConfig, params: Any, mesh: Mesh, tokenizer: Tokenizer, texts: Sequence[str],
                   cfg: NeedleConfig) -> dict:
  """`evaluate` of the Transformer with params laid out on `mesh`."""
  sharding.check_batch(cfg.batch_size, mesh, "NeedleConfig.batch_size")
  rules = sharding.logical_rules(config, mesh)
  return evaluate(model_logits_fn(config), params, tokenizer, texts, cfg,
                  context=lambda: sharding.use(mesh, rules))


@functools.lru_cache(maxsize=16)
def _scorer(logits_fn: LogitsFn, answer_len: int):
  @jax.jit
  def score(params, tokens_BT):
    """Total log-prob of each row's last `answer_len` tokens given the rest."""
    # fp32 for the softmax: log-probs of a few tokens are summed and compared between rows.
    logits_BAV = logits_fn(params, tokens_BT)[:, -answer_len - 1:-1].astype(jnp.float32)
    logp_BAV = jax.nn.log_softmax(logits_BAV, axis=-1)
    logp_BA = jnp.take_along_axis(logp_BAV, tokens_BT[:, -answer_len:, None], axis=-1)[..., 0]
    return logp_BA.sum(axis=-1)

  return score


@functools.lru_cache(maxsize=16)
def _greedy(logits_fn: LogitsFn, prompt_len: int, new_tokens: int):
  @jax.jit
  def run(params, buf_BT):
    """Writes the greedy continuation of buf_BT[:, :prompt_len] into the next `new_tokens` slots."""
    def step(i, buf_BT):
      # Causality hides the not-yet-written tail of the buffer from the position that predicts slot p + i.
      logits_BTV = logits_fn(params, buf_BT)
      logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, prompt_len - 1 + i, axis=1, keepdims=False)
      next_B = jnp.argmax(logits_BV, axis=-1).astype(buf_BT.dtype)
      return jax.lax.dynamic_update_index_in_dim(buf_BT, next_B, prompt_len + i, axis=1)

    return jax.lax.fori_loop(0, new_tokens, step, buf_BT)

  return run


def _batches(rows: np.ndarray, batch_size: int):
  """Fixed-shape batches of `rows` (the last one padded by repeating row 0), with the real row count."""
  for i in range(0, len(rows), batch_size):
    part = rows[i: i + batch_size]
    yield np.concatenate([part, np.repeat(rows[:1], batch_size - len(part), axis=0)]), len(part)


def _starts_with_number(text: str, number: str) -> bool:
  text = text.lstrip()
  return text.startswith(number) and not text[len(number): len(number) + 1].isdigit()


def evaluate(logits_fn: LogitsFn, params: Any, tokenizer: Tokenizer, texts: Sequence[str],
             cfg: NeedleConfig, context: Callable[[], Any] = contextlib.nullcontext) -> dict:
  """The length × depth grids of accuracy (log-prob ranking and, if `cfg.greedy`, greedy decoding).

  `context()` is entered around the device calls (e.g. the mesh and rules the model's constraints need)."""
  with context():
    return _evaluate(logits_fn, params, tokenizer, texts, cfg)


def _evaluate(logits_fn, params, tokenizer, texts, cfg) -> dict:
  trials = build_trials(tokenizer, texts, cfg)
  right_lp, right_greedy = [], []
  for length in cfg.lengths:
    group = [t for t in trials if t.length == length]
    for a in sorted({len(t.candidates[0]) for t in group}):  # one answer length per tokenizer, as a rule
      sub = [t for t in group if len(t.candidates[0]) == a]
      rows = np.array([t.prompt + c for t in sub for c in t.candidates], np.int32)
      logp = np.concatenate([np.asarray(_scorer(logits_fn, a)(params, b))[:n]
                             for b, n in _batches(rows, cfg.batch_size)])
      logp_NC = logp.reshape(len(sub), cfg.num_distractors + 1)
      ok = logp_NC[:, 0] > logp_NC[:, 1:].max(axis=1)
      right_lp += [(t, bool(o)) for t, o in zip(sub, ok)]
      if cfg.greedy:
        new = a  # the row stays `length` tokens; a number tokenized otherwise may need more and misses
        p = length - a
        bufs = np.zeros((len(sub), p + new), np.int32)
        bufs[:, :p] = [t.prompt for t in sub]
        out = np.concatenate([np.asarray(_greedy(logits_fn, p, new)(params, b))[:n]
                              for b, n in _batches(bufs, cfg.batch_size)])
        right_greedy += [(t, _starts_with_number(tokenizer.decode(o[p:].tolist()), t.number))
                         for t, o in zip(sub, out)]

  def grid(right):
    acc = np.zeros((len(cfg.lengths), len(cfg.depths)))
    for i, length in enumerate(cfg.lengths):
      for j, depth in enumerate(cfg.depths):
        acc[i, j] = np.mean([ok for t, ok in right if t.length == length and t.depth == depth])
    return acc

  results = {"lengths": list(cfg.lengths), "depths": list(cfg.depths), "trials": cfg.trials,
             "num_distractors": cfg.num_distractors, "chance": 1 / (cfg.num_distractors + 1),
             "seed": cfg.seed, "logprob": grid(right_lp).tolist(),
             "overall": {"logprob": float(np.mean([ok for _, ok in right_lp]))}}
  if cfg.greedy:
    results["greedy"] = grid(right_greedy).tolist()
    results["overall"]["greedy"] = float(np.mean([ok for _, ok in right_greedy]))
  return results


def write_results(results: dict, out_dir: str, name: str = "needle") -> tuple[str, str]:
  """`<out_dir>/<name>.json` and a heatmap `<out_dir>/<name>.png` (length × depth, one panel per score)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  json_path, png_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.png")
  with open(json_path + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(json_path + ".tmp", json_path)

  scores = [s for s in ("logprob", "greedy") if s in results]
  fig, axes = plt.subplots(1, len(scores), figsize=(4.5 * len(scores), 0.5 * len(results["lengths"]) + 2.5),
                           squeeze=False)
  for ax, score in zip(axes[0], scores):
    acc = np.array(results[score])
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(results["depths"])), [f"{100 * d:.0f}%" for d in results["depths"]])
    ax.set_yticks(range(len(results["lengths"])), [str(n) for n in results["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(f"{score}: {100 * results['overall'][score]:.0f}% (chance "
                 f"{100 * results['chance']:.0f}%)" if score == "logprob" else
                 f"{score}: {100 * results['overall'][score]:.0f}%")
    for (i, j), v in np.ndenumerate(acc):
      ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
  fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
  return json_path, png_path
