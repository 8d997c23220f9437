"""The post-training recipe end to end on a tiny model: SFT learns its dialogs, DPO's implicit rewards
separate a memorizable preference set (TRL's metric names in metrics.jsonl), the reward model ranks pairs,
DPO resumes exactly, and the CLI's bad-line handling. A SentencePiece model with the chat tokens appended
(hermetic: trained on a stdlib file, as tests/data/test_posttrain.py does); the starting weights are a
random tiny Llama saved params-only (`--init_from=orbax:`)."""

import dataclasses
import json
import os
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama_jax import config as config_lib
from llama_jax.data import tokenizers as tk
from llama_jax.errors import ConfigError
from llama_jax.interop import orbax as orbax_lib
from llama_jax.model import params as params_lib
from llama_jax.parallel import sharding
from llama_jax.training import posttrain as pt
from llama_jax.training.optim import OptimizerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPT = OptimizerConfig(peak_lr=1e-3, final_lr=1e-3, warmup_steps=0, total_steps=100, weight_decay=0.0)
SEQ, BATCH, STEPS = 48, 8, 10  # 8 fake devices: one pair (or row) per device


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("pt")
  src = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
  tk.train_sentencepiece([src], str(d / "tok"), 512)
  tok = tk.load_tokenizer(str(d / "tok.model")).with_chat_tokens()  # what post_train does
  model = dataclasses.replace(config_lib.TINY, vocab_size=tok.vocab_size, max_seq_len=256)
  init = str(d / "init")
  orbax_lib.save_params(init, params_lib.init_params(model, sharding.make_mesh(), jax.random.key(0)), model)
  # One compilation cache for the module: the DPO runs compile the same programs once.
  return {"dir": d, "tokenizer": str(d / "tok.model"), "init": f"orbax:{init}", "cache": str(d / "jax_cache")}


def _write(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def _pairs(path, n=8):
  return _write(path, [{"prompt": f"is {i} odd?", "chosen": f"answer {i % 2} yes", "rejected": f"parser {i} no"}
                       for i in range(n)])


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _cfg(setup, objective, run_dir, **kw):
  data = ({"sft_files": (_write(setup["dir"] / "sft.jsonl", [
      {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}"}]}
      for w in ("alpha", "parser", "value", "group")]),)} if objective == "sft"
          else {"preference_files": (_pairs(setup["dir"] / "pairs.jsonl"),)})
  if objective == "dpo":  # held-out pairs (here the training ones), scored by the reference once
    data.update(eval_files=data["preference_files"], eval_every=STEPS)
  base = dict(objective=objective, init_from=setup["init"], tokenizer=setup["tokenizer"], run_dir=str(run_dir),
              seq_len=SEQ, batch_size=BATCH, steps=STEPS, optim=OPT, checkpoint_every=100, log_every=100,
              compilation_cache_dir=setup["cache"], **data)
  return pt.PostTrainConfig(**{**base, **kw})


def test_sft_loss_falls(setup, tmp_path):
  cfg = _cfg(setup, "sft", tmp_path / "sft", eval_every=STEPS - 1)
  out = pt.post_train(dataclasses.replace(cfg, eval_files=cfg.sft_files))
  m = _metrics(tmp_path / "sft")
  assert sorted(m) == list(range(1, STEPS + 1))
  losses = [m[s]["loss"] for s in range(1, STEPS + 1)]
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.5 * losses[0], losses
  # Held out = the training dialogs: the loss after step 9 on them is step 10's training loss (each
  # batch holds every dialog equally often).
  evals = {r["step"]: r["eval_loss"] for r in map(json.loads, open(tmp_path / "sft" / "metrics.jsonl"))
           if "eval_loss" in r}
  assert sorted(evals) == [STEPS - 1, STEPS]
  np.testing.assert_allclose(evals[STEPS - 1], m[STEPS]["loss"], rtol=1e-5)
  # The result chains: model_config.json + params-only final, loadable as --init_from=orbax:.
  _, params = orbax_lib.load_params(out["final"], sharding.make_mesh())
  assert jax.tree.structure(params) is not None


@pytest.fixture(scope="module")
def dpo_run(setup, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("dpo")
  out = pt.post_train(_cfg(setup, "dpo", run_dir))
  return run_dir, out


def test_dpo_rewards_separate(dpo_run):
  run_dir, out = dpo_run
  m = _metrics(run_dir)
  for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "nll_loss", "dpo_loss", "loss", "grad_norm", "lr"):
    assert name in m[1], name
  # Step 1: the policy is the reference, every reward 0.
  assert m[1]["rewards/margins"] == 0 and m[1]["rewards/chosen"] == 0
  margins = [m[s]["rewards/margins"] for s in range(1, STEPS + 1)]
  assert all(b > a for a, b in zip(margins, margins[1:])), margins
  assert m[STEPS]["rewards/margins"] > 1.0 and m[STEPS]["rewards/accuracies"] == 1.0
  assert m[STEPS]["rewards/chosen"] > 0 > m[STEPS]["rewards/rejected"]
  assert m[STEPS]["dpo_loss"] < 0.5 * np.log(2)
  # Step 1's loss is log 2 + 0.2 NLL (policy = reference); the held-out loss (the same pairs) falls below.
  np.testing.assert_allclose(m[1]["loss"], np.log(2) + 0.2 * m[1]["nll_loss"], rtol=1e-5)
  evals = [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "eval_loss" in r]
  assert [r["step"] for r in evals] == [STEPS] and evals[0]["eval_loss"] < 0.5 * m[1]["loss"], evals
  assert out["final"] and os.path.isdir(out["final"])


def test_dpo_resumes_exactly(setup, dpo_run, tmp_path, capsys):
  """Stopped after 4 steps (steps=4), continued to 10: the same losses and params as uninterrupted; the
  reference is reloaded from --init_from (it is not in the checkpoint)."""
  ref_dir, _ = dpo_run
  pt.post_train(_cfg(setup, "dpo", tmp_path, steps=4))
  out = pt.post_train(_cfg(setup, "dpo", tmp_path))
  assert "resumed from" in capsys.readouterr().out
  want, got = _metrics(ref_dir), _metrics(tmp_path)
  for s in range(1, STEPS + 1):
    assert got[s]["loss"] == want[s]["loss"] and got[s]["rewards/margins"] == want[s]["rewards/margins"], s
  mesh = sharding.make_mesh()
  a, b = orbax_lib.load_params(out["final"], mesh)[1], orbax_lib.load_params(str(ref_dir / "final"), mesh)[1]
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  with ocp.StandardCheckpointer() as c:  # the checkpoint holds the policy's state only
    tree = c.metadata(str(tmp_path / "checkpoints" / str(STEPS) / "state")).item_metadata.tree
  assert set(tree) == {"step", "params", "opt_state", "rng"}
  # Continuing with another beta would change the trajectory: refused, naming the flag.
  with pytest.raises(ConfigError, match=r"holds a run with other settings: --beta: saved 0.1, now 0.2"):
    pt.post_train(_cfg(setup, "dpo", tmp_path, steps=STEPS + 2, beta=0.2))


def test_reward_model_ranks_pairs_and_skips_bad_lines(setup, tmp_path, capsys):
  good = open(_pairs(tmp_path / "good.jsonl")).read().splitlines()
  bad = _write(tmp_path / "bad.jsonl", good[:3] + ['{"prompt": "x", "chosen": "y"}'] + good[3:])
  pt.post_train(_cfg(setup, "reward", tmp_path, preference_files=(bad,), on_bad_line="skip"))
  assert f"skipped {bad}:4: no 'rejected' field" in capsys.readouterr().err
  m = _metrics(tmp_path)
  assert m[1]["accuracy"] < 1.0, m[1]  # a fresh head ranks at random
  assert m[STEPS]["accuracy"] == 1.0 and m[STEPS]["loss"] < 0.5 * m[1]["loss"], (m[1], m[STEPS])
  assert json.load(open(tmp_path / "model_config.json"))["head"] == "reward"


def test_config_errors_name_the_flag(setup, tmp_path):
  with pytest.raises(ConfigError, match=r"--objective=dpo needs --preference_files"):
    pt.PostTrainConfig(objective="dpo", init_from=setup["init"], tokenizer=setup["tokenizer"],
                       run_dir=str(tmp_path), sft_files=("x.jsonl",))
  with pytest.raises(ConfigError, match=r"--beta=0: must be > 0"):
    _cfg(setup, "dpo", tmp_path, beta=0)
  with pytest.raises(ConfigError, match=r"--dpo_variant='kto'"):
    _cfg(setup, "dpo", tmp_path, dpo_variant="kto")


def test_cli_bad_line_is_one_error_line(setup, tmp_path):
  good = open(_pairs(tmp_path / "good.jsonl", 3)).read().splitlines()
  bad = _write(tmp_path / "bad.jsonl", [good[0], '{"prompt": "x", "chosen": "y"}', good[1], good[2]])
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments/post_train.py"), "--objective=dpo",
       f"--init_from={setup['init']}", f"--tokenizer={setup['tokenizer']}", f"--preference_files={bad}",
       f"--run_dir={tmp_path / 'run'}", "--steps=1", "--batch_size=1", f"--seq_len={SEQ}"],
      capture_output=True, text=True, env=env, timeout=180)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0] == (f"error: {bad}:2: no 'rejected' field; every line needs 'rejected'. "
                      "(--on_bad_line=skip drops such lines)"), lines
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # stopped before anything trained
