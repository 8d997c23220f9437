"""Pretrain a Llama: `python experiments/pretrain.py --config=default [--flag=value ...]`.

The default trains a small Llama on the embedded corpus (Shakespeare + Python stdlib) on this machine.
A run directory holds checkpoints, metrics.jsonl, TensorBoard events and loss.png; running the same
command again resumes from its latest checkpoint (also after SIGTERM or kill -9).
"""

import dataclasses
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.configs.pretrain import CONFIGS  # noqa: E402
from llama_jax.parallel import distributed  # noqa: E402
from llama_jax.training import pretrain as runner, stages  # noqa: E402
from llama_jax.config import AttentionImpl  # noqa: E402
from llama_jax.errors import ConfigError  # noqa: E402

_CONFIG = flags.DEFINE_enum("config", "default", sorted(CONFIGS), "Named run config.")
# Run-level overrides: each is a field of RunConfig; unset flags keep the config's value.
_INT = ["steps", "batch_size", "seq_len", "seed", "mesh_data", "mesh_fsdp", "mesh_context", "mesh_tensor",
        "log_every",
        "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "keep_period", "max_bad_steps",
        "corpus_vocab_size", "sample_tokens"]
_STR = ["run_dir", "data_dir", "tokenizer", "text_field", "init_from", "init_state_from", "compilation_cache_dir"]
_LIST = ["train_files", "eval_files"]
_HELP = {"init_from": "Start a new run from existing weights: hf:/path, meta:/path or orbax:/path (the "
                      "checkpoint fixes the model's shape; resharded onto the run's mesh).",
         "init_state_from": "Start a new run from another run_dir's latest train state (params, AdamW "
                            "moments, step count S) with this run's schedule and data; --steps is the last "
                            "step (> S) and the LR schedule is read from step S on (e.g. --warmup_steps=S "
                            "--final_lr=0 for a tail at --lr).",
         "compilation_cache_dir": "JAX's persistent compilation cache (default: <run_dir>/compilation_cache, "
                                  "so a restart compiles nothing); a directory, or off."}
for name in _INT:
  flags.DEFINE_integer(name, None, _HELP.get(name, f"Override RunConfig.{name}."))
for name in _STR:
  flags.DEFINE_string(name, None, _HELP.get(name, f"Override RunConfig.{name}."))
for name in _LIST:
  flags.DEFINE_list(name, None, f"Override RunConfig.{name} (comma-separated paths).")
flags.DEFINE_list("train_weights", None, "Mixing weight per --train_files entry.")
flags.DEFINE_list("stages", None, "Batch/sequence schedule, START_TOKENS:BATCHxSEQ per stage, e.g. "
                  "0:1024x4096,252e6:1024x8192 (the paper's); default: one stage of --batch_size x --seq_len.")
flags.DEFINE_list("profile_steps", None, "FIRST,LAST: a jax.profiler trace of these steps (as logged, both "
                  "included) in <run_dir>/profile, for TensorBoard's Profile tab.")
flags.DEFINE_bool("restart_positions", None, "Restart RoPE positions at each packed document.")
flags.DEFINE_bool("allow_config_change", None, "Resume even if settings that change the trajectory (model, "
                  "optimizer, batch, sequence, data, seed) differ from the run's saved run_config.json.")
# Optimizer and model overrides.
_LR = flags.DEFINE_float("lr", None, "Peak learning rate.")
_FINAL_LR = flags.DEFINE_float("final_lr", None, "Learning rate at the end of the cosine decay.")
_WARMUP = flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps.")
_ACCUM = flags.DEFINE_integer("grad_accum_steps", None, "Microbatches per optimizer step.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (params stay fp32).")
_REMAT = flags.DEFINE_enum("remat_policy", None, ["none", "full", "dots_saveable",
                                                  "dots_with_no_batch_dims_saveable"], "Rematerialization.")
_ATTENTION = flags.DEFINE_enum("attention_impl", None, list(AttentionImpl.__args__),
                               "Attention kernel; auto: splash on TPU, cuDNN on GPU, einsum on CPU.")
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", None, "Tokens per device whose fp32 logits the loss "
                                   "computes at a time (ModelConfig.loss_chunk; rows on a device x positions).")
distributed.define_flags()
FLAGS = flags.FLAGS


def parse_profile_steps(values: list[str]) -> tuple[int, int]:
  try:
    first, last = (int(v) for v in values)
  except ValueError as e:
    raise ConfigError(f"--profile_steps={','.join(values)}: give two step numbers FIRST,LAST, e.g. "
                      "--profile_steps=5,8.") from e
  return first, last


def run_config() -> runner.RunConfig:
  run = CONFIGS[_CONFIG.value]
  over = {n: FLAGS[n].value for n in _INT + _STR + ["restart_positions", "allow_config_change"]
          if FLAGS[n].value is not None}
  over.update({n: tuple(FLAGS[n].value) for n in _LIST if FLAGS[n].value is not None})
  if FLAGS.train_weights is not None:
    try:
      over["train_weights"] = tuple(float(w) for w in FLAGS.train_weights)
    except ValueError as e:
      raise ConfigError(f"--train_weights={','.join(FLAGS.train_weights)}: give numbers.") from e
  if FLAGS.profile_steps is not None:
    over["profile_steps"] = parse_profile_steps(FLAGS.profile_steps)
  if FLAGS.stages is not None:
    over["stages"] = stages.parse_stages(FLAGS.stages)
  opt = {k: v for k, v in (("peak_lr", _LR.value), ("final_lr", _FINAL_LR.value),
                           ("warmup_steps", _WARMUP.value),
                           ("grad_accum_steps", _ACCUM.value)) if v is not None}
  if over.get("steps", 0) >= 1:  # the cosine decays over the run's length (RunConfig rejects < 1)
    opt["total_steps"] = over["steps"]
    if "warmup_steps" not in opt and run.optim.warmup_steps >= over["steps"]:
      opt["warmup_steps"] = max(1, over["steps"] // 10)  # a short run keeps a proportionate warmup
  model = {k: v for k, v in (("dtype", _DTYPE.value), ("remat_policy", _REMAT.value),
                             ("attention_impl", _ATTENTION.value), ("loss_chunk", _LOSS_CHUNK.value))
           if v is not None}
  return dataclasses.replace(run, optim=dataclasses.replace(run.optim, **opt),
                             model=dataclasses.replace(run.model, **model), **over)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; our progress lines suffice
  try:
    distributed.initialize(distributed.from_flags())
    runner.pretrain(run_config())
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
