"""Post-train a Llama (Llama 3 §4.1): SFT, a reward model, or DPO, from pretrained weights.

  python experiments/post_train.py --objective=sft --init_from=orbax:/ckpt/base --tokenizer=tok.model \\
      --sft_files=chats.jsonl --run_dir=/tmp/sft
  python experiments/post_train.py --objective=reward --init_from=orbax:/tmp/sft/final \\
      --tokenizer=tok.model --preference_files=prefs.jsonl --run_dir=/tmp/rm
  python experiments/post_train.py --objective=dpo --init_from=orbax:/tmp/sft/final \\
      --tokenizer=tok.model --preference_files=prefs.jsonl --run_dir=/tmp/dpo

A run directory is a pretraining one (checkpoints, metrics.jsonl, TensorBoard events); the same command
again resumes it; the final params land in <run_dir>/final (--init_from=orbax:<run_dir>/final).
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax.config import ModelConfig  # noqa: E402
from llama_jax.errors import ConfigError  # noqa: E402
from llama_jax.parallel import distributed  # noqa: E402
from llama_jax.training import posttrain  # noqa: E402
from llama_jax.training.optim import OptimizerConfig  # noqa: E402

D = posttrain.PostTrainConfig
flags.DEFINE_enum("objective", None, ["sft", "dpo", "reward"], "What to train.", required=True)
flags.DEFINE_string("init_from", None, "The starting weights: hf:/path, meta:/path, gguf:/file.gguf or "
                    "orbax:/path (e.g. a previous round's <run_dir>/final).")
flags.DEFINE_string("tokenizer", None, "The tokenizer the weights were trained with; it fixes the chat format "
                    "(Llama 3 headers, or ChatML for SmolLM2-style tokenizers).")
flags.DEFINE_string("reference", None, "DPO: the frozen reference model (default: --init_from).")
flags.DEFINE_list("sft_files", [], "SFT: JSONL files of {\"messages\": [...]}.")
flags.DEFINE_list("preference_files", [], "DPO / reward: JSONL files of {\"prompt\", \"chosen\", \"rejected\"}.")
flags.DEFINE_list("eval_files", [], "Held-out JSONL files of the same kind (eval_loss in metrics.jsonl).")
flags.DEFINE_enum("on_bad_line", "fail", ["fail", "skip"], "A malformed JSONL line: stop with file:line, or "
                  "print it and drop it.")
flags.DEFINE_string("run_dir", None, "Checkpoints, metrics.jsonl, final params.", required=True)
_INT = {  # flag: (default, help)
    "seq_len": (D.seq_len, "Tokens per row (a dialog, or prompt + response, must fit)."),
    "batch_size": (D.batch_size, "Rows (SFT) or pairs (DPO, reward) per optimizer step."),
    "steps": (D.steps, "Optimizer steps (also the LR schedule's length)."),
    "warmup_steps": (0, "Linear warmup steps."),
    "grad_accum_steps": (1, "Microbatches per optimizer step."),
    "seed": (D.seed, "Data order and the reward head's init."),
    "mesh_data": (D.mesh_data, "Data-parallel degree."),
    "mesh_fsdp": (D.mesh_fsdp, "FSDP degree (-1: the devices left)."),
    "mesh_tensor": (D.mesh_tensor, "Tensor-parallel degree."),
    "log_every": (D.log_every, "Progress line every N steps."),
    "eval_every": (D.eval_every, "Held-out loss every N steps (with --eval_files)."),
    "eval_batches": (D.eval_batches, "Held-out batches scored."),
    "checkpoint_every": (D.checkpoint_every, "Checkpoint every N steps (and at the last)."),
    "keep_checkpoints": (D.keep_checkpoints, "Checkpoints kept."),
    "max_bad_steps": (D.max_bad_steps, "Non-finite steps in a row before the run stops."),
}
for name, (default, help_) in _INT.items():
  flags.DEFINE_integer(name, default, help_)
flags.DEFINE_float("lr", 1e-5, "Peak learning rate (the paper's SFT and DPO use 1e-5).")
flags.DEFINE_float("final_lr", None, "Learning rate at the end of the cosine decay (default: --lr / 10).")
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay.")
flags.DEFINE_float("beta", D.beta, "DPO: β, the KL strength (the paper: 0.1).")
flags.DEFINE_float("label_smoothing", D.label_smoothing, "DPO: conservative-DPO label smoothing ε (sigmoid).")
flags.DEFINE_enum("dpo_variant", D.dpo_variant, ["sigmoid", "ipo", "hinge"], "DPO: the loss (TRL's names).")
flags.DEFINE_float("nll_coef", D.nll_coef, "DPO: NLL on the chosen response (the paper: 0.2).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay fp32).")
flags.DEFINE_string("compilation_cache_dir", "", "JAX's persistent compilation cache (default: "
                    "<run_dir>/compilation_cache); a directory, or off.")
flags.DEFINE_bool("allow_config_change", False, "Resume even if trajectory-changing settings differ.")
distributed.define_flags()
FLAGS = flags.FLAGS


def run_config() -> posttrain.PostTrainConfig:
  f = FLAGS
  if not f.init_from:
    raise ConfigError("--init_from is required: post-training starts from pretrained weights "
                      "(hf:/path, meta:/path, gguf:/file.gguf or orbax:/path).")
  if not f.tokenizer:
    raise ConfigError("--tokenizer is required: the tokenizer the --init_from weights were trained with.")
  if f.steps is not None and f.steps >= 1 and f.warmup_steps >= f.steps:
    raise ConfigError(f"--warmup_steps={f.warmup_steps}: must be < --steps={f.steps}.")
  optim = OptimizerConfig(peak_lr=f.lr, final_lr=f.lr / 10 if f.final_lr is None else f.final_lr,
                          warmup_steps=f.warmup_steps, total_steps=max(f.steps, f.warmup_steps + 1),
                          weight_decay=f.weight_decay, grad_accum_steps=f.grad_accum_steps)
  return posttrain.PostTrainConfig(
      objective=f.objective, init_from=f.init_from, tokenizer=f.tokenizer, run_dir=f.run_dir,
      reference=f.reference, sft_files=tuple(f.sft_files), preference_files=tuple(f.preference_files),
      eval_files=tuple(f.eval_files), on_bad_line=f.on_bad_line, seq_len=f.seq_len, batch_size=f.batch_size,
      steps=f.steps, optim=optim, model=ModelConfig(dtype=f.dtype), beta=f.beta,
      label_smoothing=f.label_smoothing, dpo_variant=f.dpo_variant, nll_coef=f.nll_coef, seed=f.seed,
      mesh_data=f.mesh_data, mesh_fsdp=f.mesh_fsdp, mesh_tensor=f.mesh_tensor, log_every=f.log_every,
      eval_every=f.eval_every, eval_batches=f.eval_batches, checkpoint_every=f.checkpoint_every,
      keep_checkpoints=f.keep_checkpoints, max_bad_steps=f.max_bad_steps,
      allow_config_change=f.allow_config_change, compilation_cache_dir=f.compilation_cache_dir)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; give every setting as a flag, e.g. --run_dir=DIR.")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; our progress lines suffice
  try:
    distributed.initialize(distributed.from_flags())
    posttrain.post_train(run_config())
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
