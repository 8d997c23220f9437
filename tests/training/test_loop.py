"""The host loop through `pretrain(RunConfig)`: the last step is saved, non-finite steps are skipped and
stop the run before a good checkpoint can be rotated out, retention keeps a period, and a resume refuses
flags that change the trajectory."""

import dataclasses
import glob
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_jax.errors import ConfigError
from llama_jax.training import checkpoint, flops, losses, pretrain as runner, step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_config(text_data, run_dir, **over):
  sys.path.insert(0, ROOT)
  from experiments.configs.pretrain import CONFIGS
  run = dataclasses.replace(CONFIGS["smoke"], run_dir=str(run_dir), train_files=(text_data["train"],),
                            tokenizer=text_data["tokenizer"], eval_files=(), sample_prompts=(),
                            mesh_fsdp=-1, log_every=1)
  return dataclasses.replace(run, **over)


def _saved_steps(run_dir):
  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"))
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_last_step_is_saved(text_data, tmp_path):
  """Defect 2: with checkpoint_every=4, a 6-step run saved only step 4."""
  run = _run_config(text_data, tmp_path / "run", steps=6, checkpoint_every=4, keep_checkpoints=5)
  assert runner.pretrain(run)["step"] == 6
  assert _saved_steps(run.run_dir) == [4, 6]


def test_keep_period_keeps_every_nth_checkpoint(text_data, tmp_path):
  run = _run_config(text_data, tmp_path / "run", steps=7, checkpoint_every=1, keep_checkpoints=2,
                    keep_period=3)
  runner.pretrain(run)
  assert _saved_steps(run.run_dir) == [3, 6, 7]  # the last 2 (6, 7) and every 3rd (3, 6)


def _scaled_loss(model, params, batch):
  loss_sum, aux = losses.pretrain_loss(model, params, batch)
  return loss_sum * np.float32(1.0) * batch["scale"].mean(), aux


def _poison_from(monkeypatch, bad_from: int):
  """Every train step from call `bad_from` on gets a NaN in its loss (through a batch feature)."""
  real = step_lib.make_train_step

  def make(model_cfg, opt_cfg, mesh):
    inner = real(model_cfg, opt_cfg, mesh, loss_fn=_scaled_loss)
    calls = itertools.count(1)

    def step(state, batch):
      scale = np.full(batch["inputs"].shape[0], np.nan if next(calls) >= bad_from else 1.0, np.float32)
      return inner(state, {**batch, "scale": scale})

    return step

  monkeypatch.setattr(step_lib, "make_train_step", make)


def test_non_finite_steps_stop_the_run_and_keep_the_good_checkpoint(text_data, tmp_path, monkeypatch):
  """Defect 3: steps 1-3 are fine, 4 on are NaN. Steps 4-6 are skipped (params untouched), the run
  stops at the 3rd bad step in a row, and checkpoint 2 (keep 1) is never rotated out by a bad one."""
  _poison_from(monkeypatch, 4)
  run = _run_config(text_data, tmp_path / "run", steps=20, checkpoint_every=2, keep_checkpoints=1,
                    max_bad_steps=3)
  with pytest.raises(ConfigError, match=r"^step 6: 3 non-finite steps in a row .*--max_bad_steps"):
    runner.pretrain(run)
  assert _saved_steps(run.run_dir) == [2]
  m = _metrics(run.run_dir)
  assert [m[s]["skipped"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
  assert all(np.isfinite(m[s]["loss"]) for s in (1, 2, 3))


def test_isolated_bad_step_is_skipped_and_training_goes_on(text_data, tmp_path, monkeypatch):
  real = step_lib.make_train_step
  poisoned = {3}

  def make(model_cfg, opt_cfg, mesh):
    inner = real(model_cfg, opt_cfg, mesh, loss_fn=_scaled_loss)
    calls = itertools.count(1)

    def step(state, batch):
      scale = np.full(batch["inputs"].shape[0], np.nan if next(calls) in poisoned else 1.0, np.float32)
      return inner(state, {**batch, "scale": scale})

    return step

  monkeypatch.setattr(step_lib, "make_train_step", make)
  run = _run_config(text_data, tmp_path / "run", steps=5, checkpoint_every=10, max_bad_steps=2)
  assert runner.pretrain(run)["step"] == 5
  m = _metrics(run.run_dir)
  assert [m[s]["skipped"] for s in range(1, 6)] == [0, 0, 1, 0, 0]
  assert _saved_steps(run.run_dir) == [5]


def test_resume_refuses_flags_that_change_the_trajectory(text_data, tmp_path):
  """Defect 4: a resume with another LR and schedule length trained on silently."""
  run_dir = tmp_path / "run"
  run = _run_config(text_data, run_dir, steps=2)
  runner.pretrain(run)
  changed = dataclasses.replace(run, steps=3, optim=dataclasses.replace(run.optim, peak_lr=1e-3,
                                                                        total_steps=60), seed=5)
  with pytest.raises(ConfigError) as e:
    runner.pretrain(changed)
  msg = str(e.value)
  assert "\n" not in msg and "--allow_config_change" in msg
  for part in ("--lr: saved 0.003, now 0.001", "--steps: saved 40, now 60", "--seed: saved 0, now 5"):
    assert part in msg, msg
  # Harmless fields may change: logging, checkpointing, retention, the mesh.
  harmless = dataclasses.replace(run, steps=3, log_every=2, eval_every=7, checkpoint_every=3,
                                 keep_checkpoints=4, max_bad_steps=5, mesh_data=2)
  assert runner.pretrain(harmless)["step"] == 3
  # And --allow_config_change accepts the change (and records the new config).
  assert runner.pretrain(dataclasses.replace(changed, steps=4, allow_config_change=True))["step"] == 4
  with open(run_dir / "run_config.json") as f:
    assert json.load(f)["optim"]["peak_lr"] == 1e-3


def test_profile_and_compiled_step_report(text_data, tmp_path, capsys, caplog):
  """--profile_steps=2,3 leaves a TensorBoard trace in <run_dir>/profile. The compiled step's report
  (step 0, metrics.jsonl): its FLOPs on all devices within [1, 1.3]x the PaLM count of
  training/flops.py (6N + attention per token; XLA also counts norms, softmax and the optimizer: 1.06x
  measured here), with unrolled layers (XLA counts a scanned loop's body once); temporaries > 0. The
  step compiles once (`lower().compile()` then the jitted calls: JAX keeps the executable). A resume in
  this process makes a new step function, whose program it finds in the run's compilation cache."""
  run = _run_config(text_data, tmp_path / "run", steps=3, profile_steps=(2, 3))
  run = dataclasses.replace(run, model=dataclasses.replace(run.model, scan_layers=False))
  import jax  # noqa: PLC0415
  with jax.log_compiles(True):
    runner.pretrain(run)
  out = capsys.readouterr().out
  assert "profiling steps 2-3" in out and "profile written" in out
  assert len(glob.glob(os.path.join(run.run_dir, "profile", "plugins", "profile", "*", "*.xplane.pb"))) == 1
  compiles = caplog.text.count("Finished XLA compilation of jit(train_step)")  # jax.log_compiles's line
  assert compiles == 1, compiles

  with open(os.path.join(run.run_dir, "metrics.jsonl")) as f:
    (report,) = [r for r in map(json.loads, f) if "compiled_flops" in r]
  assert report["step"] == 0 and report["compile_cache_hit"] == 0.0
  cfg = dataclasses.replace(run.model, vocab_size=512)  # the tokenizer's
  model_flops = flops.flops_per_token(cfg, run.seq_len) * run.batch_size * run.seq_len
  assert report["model_flops"] == model_flops
  assert 1.0 <= report["compiled_flops"] / model_flops <= 1.3, report
  assert report["temp_bytes"] > 0 and report["peak_bytes"] >= report["argument_bytes"] > 0
  assert "train step compiled in" in out and "(not in the compilation cache)" in out

  runner.pretrain(dataclasses.replace(run, steps=4, profile_steps=None))
  with open(os.path.join(run.run_dir, "metrics.jsonl")) as f:
    reports = [r for r in map(json.loads, f) if "compiled_flops" in r]
  assert [(r["step"], r["compile_cache_hit"]) for r in reports] == [(0, 0.0), (3, 1.0)]
  assert "(from the compilation cache)" in capsys.readouterr().out


def test_bad_profile_steps_name_the_flag(text_data, tmp_path):
  with pytest.raises(ConfigError, match=r"--profile_steps=3,2: give FIRST,LAST with 1 <= FIRST <= LAST"):
    _run_config(text_data, tmp_path / "run", steps=3, profile_steps=(3, 2))
  with pytest.raises(ConfigError, match=r"--profile_steps=2,5: .* <= --steps=3"):
    _run_config(text_data, tmp_path / "run", steps=3, profile_steps=(2, 5))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments/pretrain.py"), "--config=smoke",
                         f"--run_dir={tmp_path / 'run'}", "--profile_steps=5"], capture_output=True,
                        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --profile_steps=5: give two step numbers FIRST,LAST, e.g. --profile_steps=5,8.")
