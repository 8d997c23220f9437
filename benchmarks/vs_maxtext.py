"""Train-step time of llama_jax against MaxText 0.2.5's own trainer, same model, same host.

  bash benchmarks/vs_maxtext_setup.sh                 # once: MaxText in its own venv (Python >= 3.12)
  python benchmarks/vs_maxtext.py                     # 3 pairs, alternating llama_jax, MaxText, ...
  python benchmarks/vs_maxtext.py --pairs=1 --steps=6 --maxtext_venv=/path/to/venv

The model is a ~45M-parameter Llama 3 (4 layers, D=512, 8 query / 4 KV heads of 64, F=1536, V=32000,
untied embeddings, RoPE theta 500000, no RoPE scaling): params and compute in float32, default matmul
precision, AdamW with global-norm clipping 1.0, one device, batch 8 × 512 tokens of random ids. Each side
runs the model its fastest way: llama_jax with its layers unrolled (what it picks at 4 layers:
benchmarks/bench_configs.py) and no rematerialization; MaxText with its layers scanned (its default) and
its lightest remat policy, minimal_with_context — it cannot turn remat off (see _remat). The MaxText flags are derived from the same ModelConfig (maxtext_args).

Each side runs in its own process: llama_jax with this interpreter (this script with --side=llama_jax),
MaxText as `python -m maxtext.trainers.pre_train.train` from --maxtext_venv. A side's step time is the
median over its steps after the first --warmup. llama_jax blocks on every step and times it; MaxText's
times are the `seconds:` of its own `completed step:` log lines (host time between step dispatches; its
metrics are read one step late, so once the pipeline is full each one is a device step time).
"""

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from llama_jax import config as C
from llama_jax.training import optim

_PAIRS = flags.DEFINE_integer("pairs", 3, "Runs of each side, alternating llama_jax, MaxText, llama_jax, ...")
_STEPS = flags.DEFINE_integer("steps", 10, "Train steps per run, warmup included.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 3, "Leading steps of each run left out of its median (MaxText's first two log lines are "
    "dispatch times, its third the first real step; llama_jax's first step compiles).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch (sequences), on one device.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
_VENV = flags.DEFINE_string("maxtext_venv", os.path.expanduser("~/.cache/llama_jax/maxtext-venv"),
                            "Virtualenv holding maxtext==0.2.5 (make it with benchmarks/vs_maxtext_setup.sh).")
_MODEL = flags.DEFINE_enum("model", "compare", ["compare", "tiny"],
                           "compare: the ~45M model above; tiny: a 2-layer D=64 one for smoke tests.")
_SCAN = flags.DEFINE_bool("scan_layers", False, "llama_jax side: scan the layers, else unroll them.")
_MT_SCAN = flags.DEFINE_bool("maxtext_scan_layers", True, "MaxText side: scan the layers, else unroll them.")
_OUR_PYTHON = flags.DEFINE_string(
    "llama_jax_python", None, "Interpreter for the llama_jax side (default: this one). The MaxText venv's "
    "runs it on MaxText's jax, to tell the code from the jax version.")
_SIDE = flags.DEFINE_enum("side", "both", ["both", "llama_jax", "maxtext"],
                          "Run both sides alternately, or one side once (llama_jax prints one JSON line).")

# The comparison model: Llama 3 (no RoPE scaling) at ~45M parameters.
CONFIG = dataclasses.replace(C.LLAMA3_8B, vocab_size=32_000, dim=512, num_layers=4, num_heads=8,
                             num_kv_heads=4, head_dim=64, mlp_dim=1536, max_seq_len=2048, dtype="float32",
                             param_dtype="float32", scan_layers=True, remat_policy="none")
TINY = dataclasses.replace(CONFIG, vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, mlp_dim=128)
_LLAMA_JAX_TAG = "VS_MAXTEXT_LLAMA_JAX "
_MAXTEXT_STEP = re.compile(
    r"completed step: (?P<step>\d+), seconds: (?P<seconds>[\d.]+), TFLOP/s/device: (?P<tflops>[\d.]+), "
    r"Tokens/s/device: (?P<tokens_per_s>[\d.]+), .*?\bloss: (?P<loss>[\d.]+)")
_MAXTEXT_JAX = re.compile(r"System Information: Jax Version: (\S+)")


def maxtext_args(cfg, batch_size, seq_len, steps, run_name, out_dir):
  """MaxText 0.2.5 base.yml overrides for `cfg` (keys from maxtext/configs/base.yml and types.py)."""
  if cfg.rope_scaling is not None:
    raise ValueError("maxtext_args: only rope_scaling=None (rope_type 'default') is mapped.")
  opt = optim.OptimizerConfig()
  return [
      f"run_name={run_name}", f"base_output_directory={out_dir}",
      # hardware=cpu makes MaxText call jax.distributed.initialize with XPK's env variables (JOB_INDEX, ...);
      # one process needs none of that.
      "hardware=cpu", "skip_jax_distributed_system=true",
      "dataset_type=synthetic", f"steps={steps}", f"per_device_batch_size={batch_size}",
      f"max_target_length={seq_len}", "enable_checkpointing=false", "enable_tensorboard=false",
      # With XLA_FLAGS unset MaxText sets it to dump the train step's HLO, dump_hlo=false or not
      # (types.py, validate_and_set_hlo_dump_defaults); keep the dump with the logs, not in /tmp/xla_dump.
      f"dump_hlo_local_dir={os.path.join(out_dir, 'xla_dump')}",
      # The model.
      "decoder_block=llama2", f"base_num_decoder_layers={cfg.num_layers}", f"base_emb_dim={cfg.dim}",
      f"base_num_query_heads={cfg.num_heads}", f"base_num_kv_heads={cfg.num_kv_heads}",
      f"head_dim={cfg.head_dim}", f"base_mlp_dim={cfg.mlp_dim}", f"vocab_size={cfg.vocab_size}",
      f"logits_via_embedding={str(cfg.tie_embeddings).lower()}", f"normalization_layer_epsilon={cfg.norm_eps}",
      f"rope_max_timescale={int(cfg.rope_theta)}", "rope_type=default", "enable_dropout=false",
      # Numerics and execution: fp32 weights and compute, plain attention.
      f"dtype={cfg.dtype}", f"weight_dtype={cfg.param_dtype}", "matmul_precision=default",
      "attention=dot_product", f"scan_layers={str(cfg.scan_layers).lower()}", f"remat_policy={_remat(cfg)}",
      # The optimizer: ours (AdamW after clipping the global norm).
      "opt_type=adamw", f"adam_b1={opt.b1}", f"adam_b2={opt.b2}", f"adam_eps={opt.eps}",
      f"adam_weight_decay={opt.weight_decay}", f"gradient_clipping_threshold={opt.clip_norm}",
  ]


def _remat(cfg):
  """MaxText's remat_policy closest to our 'none' (base.yml's default is 'full').

  MaxText cannot turn remat off from its command line: pyconfig.py turns any value "none" into None, and
  then its decoder (layers/nnx_decoders.py) still wraps every layer, scanned or unrolled, in
  jax.checkpoint with policy None, which saves nothing: full remat (its `!= "none"` checks never see the
  string). So it gets 'minimal_with_context': save every projection (q, k, v, out, both MLP inputs and
  its output) and the attention context; the backward recomputes only the norms, RoPE, SiLU, and the
  attention scores and softmax (~1% of the step's FLOPs here).
  """
  if cfg.remat_policy != "none":
    raise ValueError(f"maxtext_args: only remat_policy='none' is mapped, got {cfg.remat_policy!r}.")
  return "minimal_with_context"


def parse_maxtext_log(text):
  """[{step, seconds, tflops, tokens_per_s, loss}] from MaxText's `completed step:` lines, and its jax version."""
  steps = [{k: (int(v) if k == "step" else float(v)) for k, v in m.groupdict().items()}
           for m in _MAXTEXT_STEP.finditer(text)]
  jax_version = _MAXTEXT_JAX.search(text)
  return steps, jax_version.group(1) if jax_version else None


def llama_jax_steps(cfg, batch_size, seq_len, steps):
  """Per-step seconds of llama_jax's real train step on one device, each step blocked on, and the last loss."""
  import jax  # pylint: disable=import-outside-toplevel
  from llama_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  from train_setup import make_train_setup  # pylint: disable=import-outside-toplevel

  mesh = sharding.make_mesh(fsdp=1, devices=jax.local_devices()[:1])
  state, step_fn, batches = make_train_setup(cfg, batch_size, seq_len, mesh, steps)
  times = []
  for b in batches:
    start = time.perf_counter()
    state, metrics = step_fn(state, b)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return times, float(metrics["loss"])


def _run_llama_jax():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  here = os.path.dirname(os.path.abspath(__file__))
  # The child imports the llama_jax this script imported, and train_setup next to it.
  root = os.path.dirname(os.path.dirname(os.path.abspath(C.__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root, here] + [p for p in [env.get("PYTHONPATH")] if p])
  cmd = [_OUR_PYTHON.value or sys.executable, os.path.abspath(__file__), "--side=llama_jax",
         f"--model={_MODEL.value}",
         f"--scan_layers={str(_SCAN.value).lower()}",
         f"--steps={_STEPS.value}", f"--warmup={_WARMUP.value}",
         f"--batch_size={_BATCH.value}", f"--seq_len={_SEQ.value}"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith(_LLAMA_JAX_TAG)]
  if out.returncode != 0 or not lines:
    raise RuntimeError(f"llama_jax side failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(lines[-1][len(_LLAMA_JAX_TAG):])


def _run_maxtext(run_name, out_dir):
  python = os.path.join(_VENV.value, "bin", "python")
  if not os.path.exists(python):
    raise app.UsageError(f"--maxtext_venv={_VENV.value}: no bin/python there; make it with "
                         f"`bash benchmarks/vs_maxtext_setup.sh {_VENV.value}` (needs python3.12).")
  base_yml = subprocess.run(
      [python, "-c", "import maxtext, os; print(os.path.join(os.path.dirname(maxtext.__file__), 'configs', "
       "'base.yml'))"], capture_output=True, text=True, check=True).stdout.strip()
  # DECOUPLE_GCLOUD stubs MaxText's Google Cloud integrations (GCS, goodput, Vertex TensorBoard).
  env = dict(os.environ, DECOUPLE_GCLOUD="TRUE", JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)
  cmd = [python, "-m", "maxtext.trainers.pre_train.train", base_yml,
         *maxtext_args(dataclasses.replace(_config(), scan_layers=_MT_SCAN.value), _BATCH.value, _SEQ.value,
                       _STEPS.value, run_name, out_dir)]
  log_path = os.path.join(out_dir, f"{run_name}.log")
  with open(log_path, "w") as log:
    rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out_dir, check=False).returncode
  text = open(log_path).read()
  steps, jax_version = parse_maxtext_log(text)
  if rc != 0 or len(steps) != _STEPS.value:
    raise RuntimeError(f"MaxText failed (rc {rc}, {len(steps)} of {_STEPS.value} steps logged; log {log_path}):"
                       f"\n{text[-3000:]}")
  return dict(step_s=[s["seconds"] for s in steps], loss=steps[-1]["loss"], jax=jax_version)


def _config():
  return dataclasses.replace(CONFIG if _MODEL.value == "compare" else TINY, scan_layers=_SCAN.value)


def _median_after_warmup(times):
  return statistics.median(times[_WARMUP.value:])


def main(argv):
  del argv
  if _STEPS.value <= _WARMUP.value:
    raise app.UsageError(f"--steps={_STEPS.value} must exceed --warmup={_WARMUP.value}.")
  if _SIDE.value == "llama_jax":
    import jax  # pylint: disable=import-outside-toplevel
    times, loss = llama_jax_steps(_config(), _BATCH.value, _SEQ.value, _STEPS.value)
    print(_LLAMA_JAX_TAG + json.dumps(dict(step_s=times, loss=loss, jax=jax.__version__)), flush=True)
    return

  tokens = _BATCH.value * _SEQ.value
  out_dir = tempfile.mkdtemp(prefix="vs_maxtext_")
  if _SIDE.value == "maxtext":
    r = _run_maxtext("maxtext_0", out_dir)
    print(f"MaxText step {_median_after_warmup(r['step_s']):.3f} s (steps {r['step_s']}), log in {out_dir}")
    return

  c = _config()
  print(f"model: {c.param_count() / 1e6:.1f}M params, L={c.num_layers} D={c.dim} N={c.num_heads} K={c.num_kv_heads} "
        f"H={c.head_dim} F={c.mlp_dim} V={c.vocab_size}, untied, rope_theta={c.rope_theta:g}; "
        f"batch {_BATCH.value} x {_SEQ.value}, fp32 params and compute, AdamW, 1 CPU device")
  print(f"layers: llama_jax {'scanned' if c.scan_layers else 'unrolled'}, MaxText "
        f"{'scanned' if _MT_SCAN.value else 'unrolled'}; remat: llama_jax none, MaxText minimal_with_context "
        "(it cannot turn remat off)")
  print(f"each run: {_STEPS.value} steps, median of the last {_STEPS.value - _WARMUP.value}; "
        f"MaxText logs in {out_dir}", flush=True)
  rows = []
  for i in range(_PAIRS.value):
    ours = _run_llama_jax()
    theirs = _run_maxtext(f"maxtext_{i}", out_dir)
    a, b = _median_after_warmup(ours["step_s"]), _median_after_warmup(theirs["step_s"])
    rows.append((a, b, ours, theirs))
    print(f"pair {i + 1}: llama_jax {a:.3f} s, MaxText {b:.3f} s, ratio {b / a:.3f}", flush=True)

  ours, theirs = rows[0][2], rows[0][3]
  print(f"\nllama_jax (jax {ours['jax']}, {_OUR_PYTHON.value or sys.executable}) vs MaxText 0.2.5 "
        f"(jax {theirs['jax']}, {_VENV.value})")
  head = (f"{'pair':>4} {'llama_jax s':>11} {'MaxText s':>9} {'ratio':>6} {'llama_jax tok/s':>15} "
          f"{'MaxText tok/s':>13} {'loss ours':>9} {'loss MT':>7}")
  print(head)
  print("-" * len(head))
  for i, (a, b, o, t) in enumerate(rows):
    print(f"{i + 1:>4} {a:>11.3f} {b:>9.3f} {b / a:>6.3f} {tokens / a:>15,.0f} {tokens / b:>13,.0f} "
          f"{o['loss']:>9.3f} {t['loss']:>7.3f}")
  ratio = statistics.median(b / a for a, b, _, _ in rows)
  print(f"median ratio (MaxText time / llama_jax time; > 1: llama_jax faster): {ratio:.3f}")


if __name__ == "__main__":
  app.run(main)
