"""Judge candidate datasets by annealing ([P] §3.1.3): from a half-trained model, one short anneal (LR
linearly to 0) per candidate at 30% of the tokens on top of the default mix at 70%, and one control anneal
on the default mix alone; the held-out loss per source against the control's says which data helps.

  python experiments/judge_data.py --config=tiny --from_run=runs/longctx_base
  python experiments/judge_data.py --config=tiny --from_run=runs/longctx_base --candidates=python,my.jsonl
A candidate is a JSONL file, a source of the mix by name (python, shakespeare) or `retrieval`.
Writes <root_dir>/{start/,control/,<candidate>/,judge.json}; see llama_jax/training/judging.py.
"""

import dataclasses
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.configs.long_context import JUDGE  # noqa: E402
from llama_jax.errors import ConfigError  # noqa: E402
from llama_jax.training import judging  # noqa: E402

_CONFIG = flags.DEFINE_enum("config", "tiny", sorted(JUDGE), "Named judging config.")
_CANDIDATES = flags.DEFINE_list("candidates", None, "JSONL files, sources of the mix (python, shakespeare) "
                                "or 'retrieval' to judge (default: the config's).")
_SHARE = flags.DEFINE_float("candidate_share", None, "The candidate's share of the annealing tokens (0.3).")
_ROOT = flags.DEFINE_string("root_dir", None, "Output directory (default: the config's).")
_INIT = flags.DEFINE_string("init_from", None, "Start from hf:/path, meta:/path or orbax:/path.")
_FROM_RUN = flags.DEFINE_string("from_run", None, "Start from this pretraining run_dir's latest checkpoint.")
_STEPS = flags.DEFINE_integer("steps", None, "Annealing steps per arm (the LR reaches 0 at the last).")
_LR = flags.DEFINE_float("lr", None, "Learning rate at the start of each anneal.")
_SEED = flags.DEFINE_integer("seed", None, "Data order seed (the same for every arm).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "Held-out batches scored per held-out file.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Embedded corpus directory.")
_FSDP = flags.DEFINE_integer("mesh_fsdp", None, "FSDP degree (-1: every device).")


def judge_config() -> judging.JudgeConfig:
  cfg = JUDGE[_CONFIG.value]
  run = {k: v for k, v in (("steps", _STEPS.value), ("seed", _SEED.value), ("eval_batches", _EVAL_BATCHES.value),
                           ("data_dir", _DATA_DIR.value), ("mesh_fsdp", _FSDP.value)) if v is not None}
  if _LR.value is not None:
    run["optim"] = dataclasses.replace(cfg.run.optim, peak_lr=_LR.value)
  top = {k: v for k, v in (("root_dir", _ROOT.value), ("init_from", _INIT.value), ("from_run", _FROM_RUN.value),
                           ("candidate_share", _SHARE.value)) if v is not None}
  if _CANDIDATES.value is not None:
    top["candidates"] = tuple(_CANDIDATES.value)
  return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **run), **top)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; give every setting as a flag.")
  logging.set_verbosity(logging.WARNING)
  try:
    judging.judge_sources(judge_config())
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
