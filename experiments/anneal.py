"""Anneal a pretrained model: LR linearly to 0, high-quality sources upsampled, checkpoints averaged.

  python experiments/anneal.py --config=tiny --from_run=runs/longctx_base
  python experiments/anneal.py --config=tiny --init_from=orbax:/ckpt --upsample=python=3 --steps=200
Writes <root_dir>/{start/,run/,average/,anneal.json}; the average is read by --init_from=orbax:.
See llama_jax/training/annealing.py.
"""

import dataclasses
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.configs.long_context import ANNEAL  # noqa: E402
from llama_jax.errors import ConfigError  # noqa: E402
from llama_jax.training import annealing  # noqa: E402

_CONFIG = flags.DEFINE_enum("config", "tiny", sorted(ANNEAL), "Named annealing config.")
_ROOT = flags.DEFINE_string("root_dir", None, "Output directory (default: the config's).")
_INIT = flags.DEFINE_string("init_from", None, "Start from hf:/path, meta:/path or orbax:/path.")
_FROM_RUN = flags.DEFINE_string("from_run", None, "Start from this pretraining run_dir's latest checkpoint.")
_STEPS = flags.DEFINE_integer("steps", None, "Annealing steps (the LR reaches 0 at the last).")
_EVERY = flags.DEFINE_integer("checkpoint_every", None, "Keep (and average) a checkpoint every N steps.")
_LR = flags.DEFINE_float("lr", None, "Learning rate at the start of the annealing.")
_UPSAMPLE = flags.DEFINE_list("upsample", None, "SOURCE=MULTIPLIER, e.g. python=2 (a corpus source or a "
                              "--train_files path).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Embedded corpus directory.")
_FSDP = flags.DEFINE_integer("mesh_fsdp", None, "FSDP degree (-1: every device).")


def anneal_config() -> annealing.AnnealConfig:
  cfg = ANNEAL[_CONFIG.value]
  run = {k: v for k, v in (("steps", _STEPS.value), ("checkpoint_every", _EVERY.value),
                           ("data_dir", _DATA_DIR.value), ("mesh_fsdp", _FSDP.value)) if v is not None}
  if _LR.value is not None:
    run["optim"] = dataclasses.replace(cfg.run.optim, peak_lr=_LR.value)
  top = {k: v for k, v in (("root_dir", _ROOT.value), ("init_from", _INIT.value),
                           ("from_run", _FROM_RUN.value)) if v is not None}
  if _UPSAMPLE.value is not None:
    try:
      top["upsample"] = tuple((k, float(v)) for k, v in (s.split("=") for s in _UPSAMPLE.value))
    except ValueError:
      raise ConfigError(f"--upsample={','.join(_UPSAMPLE.value)}: give SOURCE=NUMBER pairs.") from None
  return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **run), **top)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; give every setting as a flag.")
  logging.set_verbosity(logging.WARNING)
  try:
    annealing.anneal(anneal_config())
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
