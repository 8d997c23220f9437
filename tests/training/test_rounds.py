"""Post-training rounds on a tiny model: two rounds of rejection sampling -> SFT -> DPO with two seeds per
round. Round 2 samples from round 1's DPO average (its samples reproduced from that average alone), a round's
SFT model is the float64 mean of its runs' finals, rounds.json / the table / the plot hold both rounds, and a
rerun skips every finished step. The tokenizer and starting weights as tests/training/test_posttrain_recipes.py."""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import sysconfig
import time

import jax
import numpy as np
import pytest

from llama_jax import config as config_lib
from llama_jax.data import chat, tokenizers as tk
from llama_jax.errors import ConfigError
from llama_jax.interop import orbax as orbax_lib
from llama_jax.model import params as params_lib
from llama_jax.parallel import sharding
from llama_jax.training import rejection, rounds as R

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# 16 prompts and 16 pairs, 8 per batch: the seeds' data orders differ, so do their models.
PROMPTS = [f"{w} {i}" for w in ("say", "name") for i in range(8)]
K, STEPS, SEEDS = 2, 2, 2


def _write(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("rounds")
  src = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
  # The chat specials inside the SentencePiece model (as test_rejection.py's): with_chat_tokens() would pad
  # the vocab past the model's pieces, and a random policy samples those ids, which decode() refuses.
  tok = tk.train_sentencepiece([src], str(d / "tok"), 384, chat_tokens=True)
  model = dataclasses.replace(config_lib.TINY, vocab_size=tok.vocab_size, max_seq_len=256)
  mesh = sharding.make_mesh()
  lm = params_lib.init_params(model, mesh, jax.random.key(0))
  orbax_lib.save_params(str(d / "init"), lm, model)
  reward_cfg = dataclasses.replace(model, head="reward")
  orbax_lib.save_params(str(d / "rm"), params_lib.reward_params_from_lm(lm, reward_cfg, mesh, jax.random.key(1)),
                        reward_cfg)
  cfg = R.RoundsConfig(
      rounds=2, init_from=f"orbax:{d / 'init'}", reward_model=str(d / "rm"), tokenizer=str(d / "tok.model"),
      prompts=(_write(d / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]),),
      preference_files=(_write(d / "pairs.jsonl", [
          {"prompt": f"is {i} odd?", "chosen": f"answer {i % 2} yes", "rejected": f"parser {i} no"}
          for i in range(16)]),),
      dpo_eval_files=(str(d / "pairs.jsonl"),), root_dir=str(d / "root"), k=K, temperature=1.0, top_p=0.95,
      max_new_tokens=8, sample_batch_size=32, seeds_per_round=SEEDS, sft_steps=STEPS, sft_lr=1e-3,
      dpo_steps=STEPS, dpo_lr=1e-3, batch_size=8, seq_len=128, log_every=1)
  return {"cfg": cfg, "tok": tok, "mesh": mesh}


@pytest.fixture(scope="module")
def ran(setup):
  """The rows run_rounds returns and what it printed (also passed on to the terminal)."""
  buf, out = io.StringIO(), sys.stdout

  class Tee(io.TextIOBase):
    def write(self, s):
      buf.write(s)
      return out.write(s)

    def flush(self):
      out.flush()

  with contextlib.redirect_stdout(Tee()):
    rows = R.run_rounds(setup["cfg"])
  return rows, buf.getvalue()


def _params(spec):
  return orbax_lib.load_params(spec.removeprefix("orbax:"), sharding.make_mesh())[1]


def test_round_2_starts_from_round_1s_dpo_average(setup, ran):
  cfg, tok = setup["cfg"], setup["tok"]
  root = cfg.root_dir
  avg1 = os.path.join(root, "round_1", "dpo", "average")
  # Round 2's SFT runs start from round 1's DPO average...
  for s in range(SEEDS):
    run = json.load(open(os.path.join(root, "round_2", "sft", f"seed_{s}", "run_config.json")))
    assert run["init_from"] == f"orbax:{avg1}"
  assert ran[0][0]["policy"] == f"orbax:{avg1}"
  # ... and its samples are those of round 1's DPO average: redrawn here from the loaded average with
  # round 2's seed, the same records (texts bitwise, scores to float rounding).
  rm_cfg, rm = R.load_reward_model(cfg.reward_model, setup["mesh"])
  policy_cfg, policy = orbax_lib.load_params(avg1, setup["mesh"])
  fmt = chat.ChatFormat.for_tokenizer(tok)
  again = rejection.rejection_sample(policy_cfg, policy, rm_cfg, rm, tok, rejection.read_prompts(cfg.prompts, fmt),
                                     k=K, temperature=cfg.temperature, top_p=cfg.top_p,
                                     max_new_tokens=cfg.max_new_tokens, seed=cfg.sample_seed + 2,
                                     mesh=setup["mesh"], batch_size=cfg.sample_batch_size, fmt=fmt)
  written = [json.loads(x) for x in open(os.path.join(root, "round_2", "sft.jsonl"))]
  kept = [r for r in again if r["messages"][-1]["content"].strip()]
  assert [r["messages"] for r in written] == [r["messages"] for r in kept]
  np.testing.assert_allclose([r["scores"] for r in written], [r["scores"] for r in kept], rtol=0, atol=1e-6)
  # Round 1's DPO average is not its SFT average (DPO trained) nor the starting weights.
  a = jax.tree.leaves(_params(f"orbax:{avg1}"))
  b = jax.tree.leaves(_params(f"orbax:{os.path.join(root, 'round_1', 'sft', 'average')}"))
  assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_a_rounds_models_are_the_mean_of_its_runs(setup, ran):
  root = setup["cfg"].root_dir
  for stage in ("sft", "dpo"):
    d = os.path.join(root, "round_2", stage)
    avg = jax.tree.leaves(_params(os.path.join(d, "average")))
    runs = [jax.tree.leaves(_params(os.path.join(d, f"seed_{s}", "final"))) for s in range(SEEDS)]
    differ = 0
    for i, leaf in enumerate(avg):
      ref = np.mean([np.asarray(r[i], np.float64) for r in runs], axis=0)  # float64 reference
      scale = max(np.abs(ref).max(), 1e-30)
      np.testing.assert_allclose(np.asarray(leaf, np.float64), ref, rtol=0, atol=1e-7 * scale)
      differ += not np.array_equal(runs[0][i], runs[1][i])
    assert differ > 0, "the two seeds trained the same model: the average tests nothing"
    # The DPO runs used the SFT average as their reference.
    run = json.load(open(os.path.join(root, "round_2", "dpo", "seed_0", "run_config.json")))
    assert run["reference"] == run["init_from"] == f"orbax:{os.path.join(root, 'round_2', 'sft', 'average')}"


def test_rounds_json_table_and_plot(setup, ran):
  rows, printed = ran
  root = setup["cfg"].root_dir
  saved = json.load(open(os.path.join(root, "rounds.json")))["rounds"]
  assert saved == rows and [r["round"] for r in rows] == [1, 2]
  for r in rows:
    for key in ("mean_best_reward", "mean_reward", "sft_loss", "dpo_loss", "dpo_margins", "dpo_accuracies",
                "dpo_eval_loss"):
      assert isinstance(r[key], float) and np.isfinite(r[key]), (key, r)
    assert r["sft_eval_loss"] is None  # not configured
    assert r["mean_best_reward"] >= r["mean_reward"]
    # The round's numbers are its runs': rejection.json and the mean of the seeds' last metrics lines.
    stats = json.load(open(os.path.join(root, f"round_{r['round']}", "rejection.json")))
    assert r["mean_best_reward"] == stats["mean_best_reward"]
    last = [[json.loads(x) for x in open(os.path.join(root, f"round_{r['round']}", "dpo", f"seed_{s}",
                                                       "metrics.jsonl")) if "loss" in json.loads(x)][-1]
            for s in range(SEEDS)]
    np.testing.assert_allclose(r["dpo_margins"], np.mean([x["rewards/margins"] for x in last]), rtol=1e-12)
  table = R.table(rows)
  assert table in printed
  assert table.splitlines()[0].split() == ["round", "1", "round", "2"]
  assert "dpo: rewards/margins" in table and "sft: held-out loss" in table
  assert os.path.getsize(os.path.join(root, "rounds.png")) > 1000


def test_rerun_skips_everything(setup, ran, capsys):
  root = setup["cfg"].root_dir
  before = open(os.path.join(root, "rounds.json")).read()
  mtimes = {p: os.path.getmtime(p) for p in (os.path.join(root, f"round_{r}", x)
                                             for r in (1, 2) for x in ("sft.jsonl", "dpo/average/model_config.json"))}
  t0 = time.time()
  rows = R.run_rounds(setup["cfg"])
  elapsed = time.time() - t0
  out = capsys.readouterr().out
  assert rows == ran[0] and open(os.path.join(root, "rounds.json")).read() == before
  assert {p: os.path.getmtime(p) for p in mtimes} == mtimes
  assert out.count("rejection sampling done") == 2 and out.count(": finished") == 2 * 2 * SEEDS, out
  assert "initialized from" not in out and elapsed < 10, elapsed


def test_config_errors(setup, tmp_path):
  with pytest.raises(ConfigError, match=r"--seeds_per_round=0: must be >= 1"):
    dataclasses.replace(setup["cfg"], seeds_per_round=0)
  with pytest.raises(ConfigError, match=r"--reward_model=.*head='lm', a language model"):
    R.run_rounds(dataclasses.replace(setup["cfg"], reward_model=setup["cfg"].init_from.removeprefix("orbax:"),
                                     root_dir=str(tmp_path)))


def test_cli_error_is_one_line(setup, tmp_path):
  cfg = setup["cfg"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "post_train_rounds.py"), "--rounds=1",
                      f"--init_from={cfg.init_from}", f"--reward_model={cfg.reward_model}",
                      f"--tokenizer={cfg.tokenizer}", f"--prompts={tmp_path / 'none.jsonl'}",
                      f"--preference_files={cfg.preference_files[0]}", f"--root_dir={tmp_path / 'r'}"],
                     capture_output=True, text=True, env=env, timeout=120)
  assert p.returncode == 1 and p.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'none.jsonl'} does not exist; check the path."], p.stderr
