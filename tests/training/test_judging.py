"""Judging data by annealing ([P] §3.1.3) at toy scale: from a 4-step base run, a few annealing steps per
arm. The candidate has its share of the tokens (measured on the stream's rows), the control anneals with
the same steps, seed and LR on the default mix alone, a copy of the held-out set helps the held-out loss
more than random-character text, finished arms are not rerun, and bad input is a one-line ConfigError."""

import dataclasses
import json
import os

import numpy as np
import pytest

from experiments.configs.long_context import JUDGE
from experiments.configs.pretrain import CONFIGS
from llama_jax.data import pipeline, stream as stream_lib, tokenizers as tokenizer_lib
from llama_jax.errors import ConfigError
from llama_jax.training import judging
from llama_jax.training.pretrain import pretrain

STEPS, BATCH, SEQ = 6, 8, 32


@pytest.fixture(scope="module")
def base_run(text_data, tmp_path_factory):
  run = dataclasses.replace(
      CONFIGS["smoke"], run_dir=str(tmp_path_factory.mktemp("base") / "run"),
      train_files=(text_data["train"],), eval_files=(text_data["eval"],), tokenizer=text_data["tokenizer"],
      steps=4, batch_size=BATCH, seq_len=SEQ, checkpoint_every=4, eval_every=4, eval_batches=1,
      sample_prompts=(), data_dir=str(tmp_path_factory.mktemp("data")))
  pretrain(run)
  return run


@pytest.fixture(scope="module")
def candidates(text_data, tmp_path_factory):
  d = tmp_path_factory.mktemp("cands")
  copy = d / "heldout_copy.jsonl"
  copy.write_text(open(text_data["eval"]).read())
  rng = np.random.default_rng(0)
  chars = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?#$%&*"))
  with open(d / "garbage.jsonl", "w") as f:
    for _ in range(20):
      f.write(json.dumps({"text": "".join(rng.choice(chars, 4000))}) + "\n")
  return str(copy), str(d / "garbage.jsonl")


def _judge(base_run, root, cands, **over):
  template = dataclasses.replace(base_run, run_dir="unused", steps=STEPS, checkpoint_every=STEPS,
                                 eval_batches=2,
                                 optim=dataclasses.replace(base_run.optim, warmup_steps=0, peak_lr=3e-3))
  cfg = judging.JudgeConfig(run=template, root_dir=str(root), from_run=base_run.run_dir, candidates=cands)
  return dataclasses.replace(cfg, **over)


def test_judge_share_control_and_ordering(base_run, candidates, tmp_path, capsys):
  root = tmp_path / "judge"
  out = judging.judge_sources(_judge(base_run, root, candidates))
  printed = capsys.readouterr().out
  copy, garbage = out["candidates"]
  assert (copy["name"], garbage["name"]) == ("heldout_copy", "garbage")

  # The candidate's token share, measured on the rows of the stream its run trained on: the stream
  # gives each row to the source furthest below its share, so over N rows a share is off by < 1 row.
  rc = json.load(open(root / "garbage" / "run" / "run_config.json"))
  tok = tokenizer_lib.load_tokenizer(rc["tokenizer"])
  ds = stream_lib.TrainStream.from_sources(
      [pipeline.Source(p, weight=w) for p, w in zip(rc["train_files"], rc["train_weights"])], tok, seed=rc["seed"])
  rows = np.concatenate([ds.next_batch(BATCH, SEQ)["source_id"] for _ in range(STEPS)])
  n = len(rows)
  assert rc["train_files"][-1] == garbage["path"] and set(rows) == {0, 1}
  assert abs(np.mean(rows == 1) - 0.3) < 1 / n  # 48 rows: 14 or 15 of them (0.292 or 0.3125)

  # The control: the same run but for the candidate (same steps, seed, LR schedule, batch, start), the
  # default mix at its own proportions, which the candidate arm keeps at 70%.
  ctl = json.load(open(root / "control" / "run" / "run_config.json"))
  for k in set(ctl) - {"run_dir", "train_files", "train_weights"}:
    assert ctl[k] == rc[k], k
  # Each arm continues the base run's train state: its STEPS steps count on from the base's.
  assert ctl["steps"] == rc["steps"] == base_run.steps + STEPS and ctl["optim"]["decay"] == "linear"
  assert ctl["init_state_from"] == base_run.run_dir and ctl["init_from"] is None
  assert ctl["optim"]["final_lr"] == 0.0 and ctl["train_files"] == rc["train_files"][:-1]
  np.testing.assert_allclose(np.array(rc["train_weights"][:-1]) / sum(rc["train_weights"]),
                             0.7 * np.array(ctl["train_weights"]) / sum(ctl["train_weights"]), rtol=1e-12)

  # The report can fail and pass: the held-out set itself helps more than random characters.
  # Measured: copy -0.068, garbage +0.032 (control 6.391, start 6.631).
  assert copy["delta_overall"] < 0 < garbage["delta_overall"]
  for c in (copy, garbage):
    assert c["delta_overall"] == pytest.approx(c["overall"] - out["control"]["overall"], abs=1e-12)
    assert c["delta"] == {"eval": pytest.approx(c["heldout_loss"]["eval"] - out["control"]["heldout_loss"]["eval"],
                                                abs=1e-12)}
  assert json.load(open(root / "judge.json")) == json.loads(json.dumps(out))
  assert "candidate" in printed and f"{copy['delta_overall']:+.4f}" in printed

  # A rerun trains no arm again and reports the same numbers.
  again = judging.judge_sources(_judge(base_run, root, candidates))
  assert again == out and "=== " not in capsys.readouterr().out


def test_bad_input_is_one_config_error(base_run, candidates, tmp_path):
  for share in (0.0, 1.0, -0.1, 1.5):
    with pytest.raises(ConfigError, match=rf"^--candidate_share={share}: must be in \(0, 1\)"):
      _judge(base_run, tmp_path, candidates, candidate_share=share)
  with pytest.raises(ConfigError, match=r"^--candidates: 'nope.jsonl' is neither a file nor a source of "
                                        r"this run \(it has \["):
    judging.judge_sources(_judge(base_run, tmp_path / "j", ("nope.jsonl",)))
  assert not os.path.exists(tmp_path / "j" / "control")  # nothing was trained
  with pytest.raises(ConfigError, match=r"^--candidates: give at least one"):
    _judge(base_run, tmp_path, ())


def test_shipped_judge_config():
  cfg = JUDGE["tiny"]
  assert cfg.candidate_share == 0.3 and cfg.run.optim.warmup_steps == 0 and cfg.candidates
