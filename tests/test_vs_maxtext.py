"""benchmarks/vs_maxtext.py without MaxText: its log parser on a real MaxText 0.2.5 log, its flags, and its
llama_jax half run as the benchmark runs it (a subprocess), on the tiny model."""

import importlib.util
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "vs_maxtext.py")
# Excerpt of the log of `python -m maxtext.trainers.pre_train.train` (maxtext 0.2.5, jax 0.12.0.1) for
# vs_maxtext.CONFIG, batch 8 x 512, 10 steps, on this repo's 2-core CPU host while other jobs ran (layers
# unrolled, remat_policy=none, which MaxText reads as full remat: see vs_maxtext._remat).
LOG = os.path.join(ROOT, "tests", "golden", "maxtext_0.2.5_cpu_steps.log")

_spec = importlib.util.spec_from_file_location("vs_maxtext", SCRIPT)
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def test_parses_maxtext_step_lines():
  steps, jax_version = vs.parse_maxtext_log(open(LOG).read())
  assert jax_version == "0.12.0.1"
  assert [s["step"] for s in steps] == list(range(10))
  assert [s["seconds"] for s in steps] == [0.061, 0.210, 9.112, 9.409, 8.849, 10.295, 9.354, 12.604, 9.921,
                                           14.175]
  assert [s["loss"] for s in steps] == [10.878, 10.878, 10.787, 10.699, 10.619, 10.553, 10.503, 10.469,
                                        10.448, 10.436]  # `loss:`, not `lm_loss:`
  assert steps[2]["tflops"] == 0.081
  # MaxText's tokens/s is its batch x seq over its seconds: 8 x 512 = 4096 tokens per step (to the
  # printed 3 decimals of seconds, i.e. within 0.6 %).
  for s in steps:
    assert math.isclose(s["tokens_per_s"] * s["seconds"], 8 * 512, rel_tol=6e-3), s


def test_maxtext_flags_describe_the_same_model():
  args = dict(a.split("=", 1) for a in vs.maxtext_args(vs.CONFIG, 8, 512, 10, "r", "/tmp/o"))
  c = vs.CONFIG
  assert {k: args[k] for k in ("base_num_decoder_layers", "base_emb_dim", "base_num_query_heads",
                               "base_num_kv_heads", "head_dim", "base_mlp_dim", "vocab_size")} == {
      "base_num_decoder_layers": "4", "base_emb_dim": "512", "base_num_query_heads": "8",
      "base_num_kv_heads": "4", "head_dim": "64", "base_mlp_dim": "1536", "vocab_size": "32000"}
  assert (c.num_layers, c.dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size) == (
      4, 512, 8, 4, 64, 1536, 32_000)
  assert args["logits_via_embedding"] == "false" and not c.tie_embeddings
  # MaxText reads remat_policy=none as None = full remat; its lightest policy stands in for our none.
  assert (args["dtype"], args["weight_dtype"], args["remat_policy"], args["scan_layers"]) == (
      "float32", "float32", "minimal_with_context", "true")
  assert (args["per_device_batch_size"], args["max_target_length"], args["steps"]) == ("8", "512", "10")
  assert args["rope_max_timescale"] == "500000" and c.rope_scaling is None
  # MaxText counted the parameters of the model these flags built: "number parameters: 0.045 billion".
  assert "number parameters: 0.045 billion" in open(LOG).read()
  assert round(c.param_count() / 1e9, 3) == 0.045


def test_llama_jax_half_runs_the_train_step():
  out = subprocess.run(
      [sys.executable, SCRIPT, "--side=llama_jax", "--model=tiny", "--batch_size=2", "--seq_len=16",
       "--steps=3", "--warmup=1"],
      env={**_env(), "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120, check=True).stdout
  line = [l for l in out.splitlines() if l.startswith("VS_MAXTEXT_LLAMA_JAX ")]
  r = json.loads(line[-1].split(" ", 1)[1])
  assert len(r["step_s"]) == 3 and all(t > 0 for t in r["step_s"])
  # Random targets over V=256: no model does much better than ln 256 = 5.545 on them, and the init's spread
  # of logits puts it above (it printed 5.93; MaxText's first loss on V=32000 is 10.85 against ln V = 10.37).
  assert math.log(256) - 0.05 < r["loss"] < math.log(256) + 1.0, r["loss"]


def test_missing_maxtext_venv_says_how_to_make_it(tmp_path):
  out = subprocess.run([sys.executable, SCRIPT, "--side=maxtext", f"--maxtext_venv={tmp_path}/nope"],
                       env={**_env(), "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)
  assert out.returncode != 0
  assert f"--maxtext_venv={tmp_path}/nope: no bin/python there; make it with" in out.stderr
  assert "vs_maxtext_setup.sh" in out.stderr
