"""Post-training rounds (Llama 3 §4.1; the paper runs six): rejection sampling -> SFT -> DPO, N times, each
round starting from the previous round's DPO model, the runs of a step (one per seed) averaged.

  python experiments/post_train_rounds.py --rounds=6 --init_from=orbax:/ckpt/sft0/final \\
      --reward_model=/ckpt/rm/final --tokenizer=tok.model --prompts=prompts.jsonl \\
      --preference_files=prefs.jsonl --root_dir=/runs/rounds --k=10 --seeds_per_round=2

Each step is an ordinary post-training run under <root_dir>/round_r/ (sft.jsonl, sft/seed_s, sft/average,
dpo/seed_s, dpo/average); the same command again continues where it stopped. The per-round metrics:
<root_dir>/rounds.json, a table printed at the end, and <root_dir>/rounds.png.
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax.config import ModelConfig  # noqa: E402
from llama_jax.errors import ConfigError  # noqa: E402
from llama_jax.training import rounds  # noqa: E402

D = rounds.RoundsConfig
flags.DEFINE_integer("rounds", 6, "Rounds of rejection sampling -> SFT -> DPO (the paper: 6).")
flags.DEFINE_string("init_from", None, "Round 1's policy: hf:/path, meta:/path, gguf:/file.gguf or orbax:/path.")
flags.DEFINE_string("reward_model", None, "The reward model: a params-only directory (e.g. <run_dir>/final of "
                    "post_train.py --objective=reward) or its run directory.")
flags.DEFINE_string("tokenizer", None, "The tokenizer the weights were trained with (fixes the chat format).")
flags.DEFINE_list("prompts", [], "Rejection sampling's prompts: JSONL of {\"messages\"} or {\"prompt\"}.")
flags.DEFINE_list("preference_files", [], "DPO's pairs: JSONL of {\"prompt\", \"chosen\", \"rejected\"}.")
flags.DEFINE_list("sft_eval_files", [], "Held-out SFT dialogs (each SFT run's loss on them at its end).")
flags.DEFINE_list("dpo_eval_files", [], "Held-out pairs (each DPO run's loss on them at its end).")
flags.DEFINE_string("root_dir", None, "Where the rounds' runs, rounds.json and rounds.png go.")
_INT = {  # flag: help (defaults: RoundsConfig's)
    "k": "Samples per prompt (the paper: 10-30).",
    "max_new_tokens": "Tokens per sampled response (at most).",
    "sample_batch_size": "Rows (prompt x sample) per generation and scoring call.",
    "sample_seed": "Round r samples with seed sample_seed + r.",
    "seeds_per_round": "SFT and DPO runs per round (seeds 0..n-1) whose finals are averaged.",
    "sft_steps": "Optimizer steps of each SFT run.",
    "dpo_steps": "Optimizer steps of each DPO run.",
    "batch_size": "Rows (SFT) or pairs (DPO) per optimizer step.",
    "seq_len": "Tokens per row: a prompt + max_new_tokens sample, and a DPO pair's row, must fit.",
    "warmup_steps": "Linear warmup steps of each run.",
    "mesh_fsdp": "FSDP degree (-1: the devices left).",
    "mesh_tensor": "Tensor-parallel degree.",
    "log_every": "Progress line every N steps.",
    "checkpoint_every": "Checkpoint every N steps (and at the last).",
}
for name, help_ in _INT.items():
  flags.DEFINE_integer(name, getattr(D, name), help_)
flags.DEFINE_float("temperature", D.temperature, "Sampling temperature.")
flags.DEFINE_float("top_p", D.top_p, "Nucleus sampling: the most likely tokens holding this probability.")
flags.DEFINE_float("sft_lr", D.sft_lr, "SFT learning rate (constant).")
flags.DEFINE_float("dpo_lr", D.dpo_lr, "DPO learning rate (constant).")
flags.DEFINE_float("beta", D.beta, "DPO: β (the paper: 0.1).")
flags.DEFINE_float("nll_coef", D.nll_coef, "DPO: NLL on the chosen response (the paper: 0.2).")
flags.DEFINE_enum("on_bad_line", "fail", ["fail", "skip"], "A bad line or a dialog longer than --seq_len: "
                  "stop, or drop it.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay fp32).")
flags.DEFINE_string("compilation_cache_dir", "", "JAX's persistent compilation cache shared by every run "
                    "(default: <root_dir>/compilation_cache), or off.")
FLAGS = flags.FLAGS


def run_config() -> rounds.RoundsConfig:
  f = FLAGS
  for name in ("init_from", "reward_model", "tokenizer", "root_dir"):
    if not getattr(f, name):
      raise ConfigError(f"--{name} is required.")
  return rounds.RoundsConfig(
      rounds=f.rounds, init_from=f.init_from, reward_model=f.reward_model, tokenizer=f.tokenizer,
      prompts=tuple(f.prompts), preference_files=tuple(f.preference_files),
      sft_eval_files=tuple(f.sft_eval_files), dpo_eval_files=tuple(f.dpo_eval_files), root_dir=f.root_dir,
      temperature=f.temperature, top_p=f.top_p, sft_lr=f.sft_lr, dpo_lr=f.dpo_lr, beta=f.beta,
      nll_coef=f.nll_coef, on_bad_line=f.on_bad_line, model=ModelConfig(dtype=f.dtype),
      compilation_cache_dir=f.compilation_cache_dir, **{name: getattr(f, name) for name in _INT})


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; give every setting as a flag, e.g. --rounds=6.")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the progress lines suffice
  try:
    rounds.run_rounds(run_config())
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
