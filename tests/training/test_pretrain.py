"""The pretraining entry point end to end: exact resume after kill -9 and SIGTERM, and bad input."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llama_jax.training import pretrain as runner
from llama_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 40


def _cmd(text_data, run_dir, *extra):
  return [sys.executable, os.path.join(ROOT, "experiments/pretrain.py"), "--config=smoke",
          f"--run_dir={run_dir}", f"--train_files={text_data['train']}", f"--eval_files={text_data['eval']}",
          f"--tokenizer={text_data['tokenizer']}", f"--steps={STEPS}", "--checkpoint_every=4",
          "--eval_every=1000", "--log_every=10", "--sample_tokens=8", "--mesh_fsdp=2",
          "--keep_checkpoints=20", *extra]


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _run(cmd, timeout=300):
  proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def _interrupt(cmd, sig, run_dir, after_step=8, timeout=300):
  """Start a run, and send `sig` once checkpoint `after_step` is committed."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
  committed = os.path.join(run_dir, "checkpoints", str(after_step), "commit_success.txt")
  deadline = time.time() + timeout
  try:
    while not os.path.exists(committed):
      assert proc.poll() is None, f"run ended before checkpoint {after_step}: {proc.communicate()[1][-3000:]}"
      assert time.time() < deadline, "timed out waiting for a checkpoint"
      time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(text_data, tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp("ref"))
  out = _run(_cmd(text_data, run_dir))
  losses = _losses(run_dir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses, out, run_dir


def test_default_run_prints_progress_and_learns(uninterrupted):
  losses, out, _ = uninterrupted
  assert "step     40/40 | loss" in out and "tok/s" in out and "MFU" in out and "ETA" in out
  assert "vs unigram entropy of the same tokens" in out and "sample (greedy" in out
  assert "sample (top_p 0.9, temperature 0.8, seed 0, 8 tokens)" in out
  assert np.mean([losses[s] for s in range(31, 41)]) < np.mean([losses[s] for s in range(1, 11)]) - 0.5


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_exact_resume(text_data, uninterrupted, tmp_path, sig):
  ref, _, _ = uninterrupted
  run_dir = str(tmp_path)
  rc, out, err = _interrupt(_cmd(text_data, run_dir), sig, run_dir)
  if sig == signal.SIGKILL:
    assert rc == -signal.SIGKILL
  else:  # SIGTERM: the run saves where it is and exits cleanly
    assert rc == 0 and "preempted: saved step" in out, err[-3000:]
  stopped_at = max(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit())
  assert stopped_at < STEPS
  out = _run(_cmd(text_data, run_dir))
  assert f"resumed from {run_dir} at step {stopped_at}" in out
  resumed = _losses(run_dir)
  # Bitwise: same params, optimizer, RNG and data position as the run that was never interrupted.
  assert [resumed[s] for s in range(stopped_at + 1, STEPS + 1)] == [
      ref[s] for s in range(stopped_at + 1, STEPS + 1)]


def test_generate_script_continues_as_the_run_sampled(uninterrupted):
  """experiments/generate.py on the run's latest checkpoint prints the run's own closing samples."""
  _, out, run_dir = uninterrupted
  script = [sys.executable, os.path.join(ROOT, "experiments/generate.py"), f"--run_dir={run_dir}",
            "--max_new_tokens=8"]
  for flags, name in (([], "top_p 0.9, temperature 0.8, seed 0"), (["--temperature=0"], "greedy")):
    printed = _run(script + flags)
    for prompt in ("ROMEO.", "def "):
      sampled = out.split(f"sample ({name}, 8 tokens):\n    | {prompt}")[1].split("\nsample (")[0]
      sampled = sampled.split("\nloss curves")[0].replace("\n    | ", "\n").rstrip("\n")
      assert f"--- {prompt!r}" in printed and f"\n{prompt}{sampled}\n" in printed + "\n", (sampled, printed)


# ----------------------------------------------------------------------------- bad input
def _run_config(text_data, tmp_path, **over):
  from experiments.configs.pretrain import CONFIGS
  run = dataclasses.replace(CONFIGS["smoke"], run_dir=str(tmp_path / "run"), train_files=(text_data["train"],),
                            eval_files=(text_data["eval"],), tokenizer=text_data["tokenizer"], mesh_fsdp=-1,
                            mesh_data=1, steps=2)
  return dataclasses.replace(run, **over)


def test_a_second_start_compiles_nothing(text_data, uninterrupted, tmp_path):
  """The persistent compilation cache, on by default in the run directory: the same run started again in
  a new process (its own run directory, the first one's cache) finds every program there. JAX reports
  each miss (JAX_EXPLAIN_CACHE_MISSES) and writes each compiled program (no minimum size or compile
  time): there are none, and the train step's line says where it came from."""
  cache = os.path.join(uninterrupted[2], "compilation_cache")
  entries = sorted(os.listdir(cache))
  assert any(e.startswith("jit_train_step") for e in entries), entries
  proc = subprocess.run(_cmd(text_data, tmp_path / "again", f"--compilation_cache_dir={cache}"),
                        capture_output=True, text=True, timeout=300,
                        env={**_env(), "JAX_EXPLAIN_CACHE_MISSES": "1"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "train step compiled in" in proc.stdout and "(from the compilation cache)" in proc.stdout
  assert "PERSISTENT COMPILATION CACHE MISS" not in proc.stderr, proc.stderr[-3000:]
  assert sorted(os.listdir(cache)) == entries


def test_bad_inputs_name_the_flag(text_data, tmp_path):
  sys.path.insert(0, ROOT)
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  binary = tmp_path / "latin1.txt"
  binary.write_bytes("Good text, then caf\xe9".encode("latin-1"))
  cases = [
      (dict(train_files=(str(tmp_path / "missing.jsonl"),)), "--train_files"),
      (dict(train_files=(str(empty),)), "--train_files"),
      (dict(train_files=(str(binary),)), "--train_files.*byte"),
      (dict(batch_size=3), "--batch_size=3"),
      (dict(seq_len=10_000), "--seq_len=10000 exceeds"),
      (dict(tokenizer=str(tmp_path / "nope.model")), "--tokenizer"),
      (dict(train_weights=(1.0, 2.0)), "--train_weights"),
  ]
  for over, match in cases:
    with pytest.raises(ConfigError, match=match):
      runner.pretrain(_run_config(text_data, tmp_path, **over))
  with pytest.raises(ConfigError, match="--seq_len=1"):
    _run_config(text_data, tmp_path, seq_len=1)
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "2")


def test_cli_error_is_one_clear_line(text_data, tmp_path):
  proc = subprocess.run(_cmd(text_data, str(tmp_path), "--batch_size=3"), capture_output=True, text=True,
                        env=_env(), timeout=120)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --batch_size=3 does not divide")
  # Checked before the checkpoint manager starts: its threads, stopped by the exit, printed a traceback.
  assert not os.path.exists(tmp_path / "checkpoints")


def test_batch_and_sequence_stages(text_data, tmp_path, capsys):
  """The paper's schedule at toy scale: 8 rows of 32 tokens, then 8 rows of 64 from 768 tokens on."""
  from llama_jax.training.stages import Stage
  run = _run_config(text_data, tmp_path, steps=6, seq_len=64, sample_prompts=(), eval_batches=1,
                    stages=(Stage(0, 8, 32), Stage(768, 8, 64)))
  runner.pretrain(run)
  out = capsys.readouterr().out
  assert "stage 1: batch 8 x seq 64 from step 4" in out
  assert sorted(_losses(run.run_dir)) == list(range(1, 7))


def test_two_processes_train_checkpoint_and_resume(text_data, tmp_path):
  """The entry point on 2 processes x 4 CPU devices (jax.distributed on localhost): both train, the
  checkpoint holds the global data state, and a second launch resumes from it."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  run_dir = str(tmp_path / "run")

  def launch(steps, port, *extra):
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen(
        _cmd(text_data, run_dir, f"--steps={steps}", "--checkpoint_every=6", "--mesh_fsdp=-1",
             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
      outs = [p.communicate(timeout=240) for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]
    return outs[0][0]

  out = launch(12, port)
  assert "mesh {'data': 1, 'fsdp': 8, 'context': 1, 'tensor': 1}" in out and "step     12 | held-out loss" in out
  data_dir = os.path.join(run_dir, "checkpoints", "12", "data")
  # One global data state (Orbax's JSON item), whatever the process count; no per-process files.
  assert not [f for f in os.listdir(data_dir) if f.startswith("process_")]
  with open(os.path.join(data_dir, "metadata")) as f:
    assert json.load(f)["tokens"] == [12 * 8 * 64]  # 12 steps of 8 global rows of 64, one source
  # --steps=18 lengthens the cosine (total steps 12 -> 18): a change the resume must be allowed.
  out = launch(18, port + 1 if port < 65535 else port - 1, "--allow_config_change", "--profile_steps=14,15")
  assert "resumed from" in out and "at step 12" in out
  assert sorted(_losses(run_dir)) == list(range(1, 19))
  # Each process traces its own devices into its own directory (the trace files are named by host).
  for i in range(2):
    trace = os.path.join(run_dir, "profile", f"process_{i}", "plugins", "profile", "*", "*.xplane.pb")
    assert glob.glob(trace), trace


# ----------------------------------------------------------------------------- --init_from
def test_init_from_starts_the_run_from_imported_weights(text_data, tmp_path):
  """A run from HF weights of another shape than its config's: the checkpoint fixes the model, the
  params arrive resharded onto the run's mesh, and step 1 (learning rate 0 at the start of the warmup)
  leaves them bitwise as imported."""
  import jax

  from llama_jax.interop import hf
  from llama_jax.model import params as P
  from llama_jax.parallel import sharding
  from llama_jax.training import checkpoint, step as train

  run = _run_config(text_data, tmp_path, steps=1, eval_files=(), sample_prompts=(), mesh_tensor=2)
  source_cfg = dataclasses.replace(run.model, vocab_size=512, num_layers=3, mlp_dim=96)
  one = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  source = jax.device_get(P.init_params(source_cfg, one, jax.random.key(7)))
  hf.save_hf(source, source_cfg, str(tmp_path / "hf"), dtype="float32")

  with pytest.raises(ConfigError, match=r"--init_from='nope': expected hf:/path"):
    runner.pretrain(dataclasses.replace(run, init_from="nope"))
  runner.pretrain(dataclasses.replace(run, init_from=f"hf:{tmp_path / 'hf'}"))

  mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=2)
  cfg = dataclasses.replace(run.model, vocab_size=512, num_layers=3, mlp_dim=96)
  ckpt = checkpoint.Checkpointer(os.path.join(run.run_dir, "checkpoints"))
  assert ckpt.all_steps() == [1]
  state, _ = ckpt.restore(train.abstract_state(cfg, run.optim, mesh))
  ckpt.close()
  for want, got in zip(jax.tree.leaves(source), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(got, want)

  # The resume continues from the run's own checkpoint, with the shape saved when it started: the flag
  # may be dropped (or its source gone).
  runner.pretrain(dataclasses.replace(run, steps=2))
  assert checkpoint.Checkpointer(os.path.join(run.run_dir, "checkpoints")).all_steps() == [1, 2]
  # The embedded corpus trains its own tokenizer, which imported weights never share.
  with pytest.raises(ConfigError, match="--init_from=hf:x needs --train_files and --tokenizer"):
    dataclasses.replace(run, init_from="hf:x", train_files=(), tokenizer=None)
