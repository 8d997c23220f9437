"""Needle in a haystack: a copy model that can read the context finds the needle every time, models that
cannot score at chance (or 0), and the real Transformer runs through the same plumbing."""

import json
import os
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config as config_lib
from llama_jax.errors import ConfigError
from llama_jax.evals import needle
from llama_jax.model import params as params_lib
from llama_jax.parallel import sharding


class ByteTokenizer:
  """One token per byte (ids 0..255); BOS = 1 never occurs in the text used here."""
  vocab_size, bos_id, eos_id, pad_id, fingerprint = 256, 1, 2, 0, "bytes"

  def encode(self, text, bos=False, eos=False):
    return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

  def encode_batch(self, texts, bos=False, eos=False):
    return [self.encode(t, bos, eos) for t in texts]

  def decode(self, ids):
    return bytes(i for i in ids).decode("utf-8", errors="replace")


TOK = ByteTokenizer()
V = TOK.vocab_size


def _texts():
  stdlib = sysconfig.get_paths()["stdlib"]
  return [open(os.path.join(stdlib, f), encoding="utf-8").read() for f in ("this.py", "abc.py", "bisect.py")]


def copy_logits(params, tokens_BT, n=8, window=None):
  """An induction oracle: at each position, find the latest earlier position (within `window` positions,
  if given) whose last `n` tokens equal the current last `n`, and put all the probability on the token
  that followed it (uniform if none)."""
  b, t = tokens_BT.shape
  match_BTS = jnp.ones((b, t, t), bool)
  for k in range(n):  # tokens k back from t and from s agree (positions before 0 never match)
    x_BT = jnp.pad(tokens_BT, ((0, 0), (k, 0)), constant_values=-1 - k)[:, :t]
    match_BTS &= x_BT[:, :, None] == x_BT[:, None, :]
  s = jnp.arange(t)
  match_BTS &= s[None, :] < s[:, None]  # strictly earlier, so s + 1 <= t is already seen
  if window is not None:
    match_BTS &= s[None, :] > s[:, None] - window
  last_BT = jnp.max(jnp.where(match_BTS, s, -1), axis=-1)
  next_BT = jnp.take_along_axis(tokens_BT, jnp.clip(last_BT + 1, 0, t - 1), axis=1)
  logits_BTV = 30.0 * jax.nn.one_hot(next_BT, V)
  return jnp.where((last_BT >= 0)[..., None], logits_BTV, 0.0)


def blind_logits(params, tokens_BT):
  """A model that never reads the context for the answer: next-token logits from a fixed random bigram
  table, so the right number and the distractors are ranked by chance."""
  return params[tokens_BT]


def uniform_logits(params, tokens_BT):
  return jnp.zeros(tokens_BT.shape + (V,))


CFG = needle.NeedleConfig(lengths=(96, 192), depths=(0.0, 0.5, 1.0), trials=3, num_distractors=4,
                          batch_size=10, seed=0)


def test_trials_are_deterministic_and_well_formed():
  a = needle.build_trials(TOK, _texts(), CFG)
  b = needle.build_trials(TOK, _texts(), CFG)
  assert a == b
  assert len(a) == len(CFG.lengths) * len(CFG.depths) * CFG.trials
  for t in a:
    assert len(t.prompt) + len(t.candidates[0]) == t.length
    assert len(t.candidates) == CFG.num_distractors + 1 and len({tuple(c) for c in t.candidates}) == 5
    assert all(len(c) == len(t.candidates[0]) for c in t.candidates)
    text = TOK.decode(t.prompt)
    assert f"The secret number is {t.number}." in text
    assert text.endswith("What is the secret number? The secret number is")
    assert TOK.decode(t.candidates[0]) == f" {t.number}"
  # Depth 0 puts the needle right after BOS, depth 1 right before the question.
  first = next(t for t in a if t.depth == 0.0)
  assert TOK.decode(first.prompt[1:]).startswith("\nThe secret number is")
  last = next(t for t in a if t.depth == 1.0)
  tail = f"{last.number}.\n\nWhat is the secret number? The secret number is"
  assert TOK.decode(last.prompt).endswith(tail)
  # Another seed draws other numbers.
  other = needle.build_trials(TOK, _texts(), needle.NeedleConfig(**{**CFG.__dict__, "seed": 1}))
  assert [t.number for t in other] != [t.number for t in a]


def test_a_copy_model_finds_every_needle():
  res = needle.evaluate(copy_logits, None, TOK, _texts(), CFG)
  assert np.array(res["logprob"]).shape == (2, 3)
  assert res["overall"] == {"logprob": 1.0, "greedy": 1.0}
  assert np.all(np.array(res["logprob"]) == 1.0) and np.all(np.array(res["greedy"]) == 1.0)


def test_a_copy_model_without_the_needle_in_view_fails():
  # The same oracle with a 24-token window: the needle ends 48 bytes before the answer even at depth 100%.
  res = needle.evaluate(lambda p, x: copy_logits(p, x, window=24), None, TOK, _texts(), CFG)
  assert res["overall"] == {"logprob": 0.0, "greedy": 0.0}


def test_models_that_cannot_read_the_needle_score_at_chance():
  table_VV = jax.random.normal(jax.random.key(0), (V, V))
  cfg = needle.NeedleConfig(lengths=(96,), depths=(0.0, 0.5, 1.0), trials=100, num_distractors=4,
                            batch_size=100, seed=3, greedy=False)
  res = needle.evaluate(blind_logits, table_VV, TOK, _texts(), cfg)
  n, p = 300, 1 / 5
  # Binomial(300, 0.2): mean 0.2, standard deviation 0.023; 3 sigma either side.
  assert abs(res["overall"]["logprob"] - p) < 3 * np.sqrt(p * (1 - p) / n), res["overall"]
  # A uniform model ties every candidate: ties are misses, so it scores 0 (a gate can only fail).
  res = needle.evaluate(uniform_logits, None, TOK, _texts(), CFG)
  assert res["overall"] == {"logprob": 0.0, "greedy": 0.0}


def test_the_transformer_runs_through_the_same_plumbing_and_files_are_written(tmp_path):
  cfg = config_lib.TINY
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  params = params_lib.init_params(cfg, mesh, jax.random.key(0))
  ncfg = needle.NeedleConfig(lengths=(96, 128), depths=(0.0, 0.5, 1.0), trials=2, num_distractors=3, digits=3,
                             batch_size=8)
  res = needle.evaluate_model(cfg, params, mesh, TOK, _texts(), ncfg)
  for score in ("logprob", "greedy"):
    grid = np.array(res[score])
    assert grid.shape == (2, 3) and np.all((grid >= 0) & (grid <= 1))
    assert 0 <= res["overall"][score] <= 1
  json_path, png_path = needle.write_results(res, str(tmp_path))
  assert json.load(open(json_path)) == res
  with open(png_path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_configs_say_which_field():
  with pytest.raises(ConfigError, match=r"NeedleConfig.depths=.*\[0, 1\]"):
    needle.NeedleConfig(lengths=(64,), depths=(1.5,))
  with pytest.raises(ConfigError, match="NeedleConfig.lengths: 20 tokens cannot hold"):
    needle.build_trials(TOK, _texts(), needle.NeedleConfig(lengths=(20,)))
  with pytest.raises(ConfigError, match="no such file"):
    needle.load_texts(["/nonexistent.jsonl"])
