"""Extend a pretrained model's context in stages, each gated by needle-in-a-haystack and held-out loss.

  python experiments/pretrain.py --config=longctx_base                # the start: 64 tokens
  python experiments/long_context.py --config=tiny --from_run=runs/longctx_base
  python experiments/long_context.py --config=tiny --init_from=orbax:/ckpt/avg --stop_on_gate_failure
Each stage writes <root_dir>/stage_<i>_<T>/{run/,final/,gate.json,needle.json,needle.png}; rerunning the
same command continues where it stopped. See llama_jax/training/long_context.py.
"""

import dataclasses
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.configs.long_context import EXTEND  # noqa: E402
from llama_jax.errors import ConfigError  # noqa: E402
from llama_jax.training import long_context  # noqa: E402

_CONFIG = flags.DEFINE_enum("config", "tiny", sorted(EXTEND), "Named extension config.")
_ROOT = flags.DEFINE_string("root_dir", None, "Directory of the stages (default: the config's).")
_INIT = flags.DEFINE_string("init_from", None, "Start from hf:/path, meta:/path or orbax:/path (e.g. an "
                            "average written by experiments/average.py).")
_FROM_RUN = flags.DEFINE_string("from_run", None, "Start from the latest checkpoint of this pretraining "
                                "run_dir (instead of --init_from).")
_STOP = flags.DEFINE_bool("stop_on_gate_failure", None, "Stop after a stage that fails its gate.")
_RETRIEVAL = flags.DEFINE_float("retrieval_weight", None, "Token share of synthetic retrieval documents.")
_FORMAT = flags.DEFINE_enum("retrieval_format", None, ["kv", "facts"], "Synthetic retrieval documents: "
                            "key-value lists, or facts planted in training text and asked back (the "
                            "needle's form with other subjects) mixed with passages to repeat.")
_STEPS = flags.DEFINE_integer("stage_steps", None, "Steps of every stage (default: the config's).")
_NEEDLE_MIN = flags.DEFINE_float("needle_min", None, "Gate: needle log-prob accuracy needed (0..1).")
_MAX_RISE = flags.DEFINE_float("heldout_max_rise", None, "Gate: allowed relative rise of the short-context "
                               "held-out loss (0.02 = 2%).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Embedded corpus directory (default: the config's).")
_TRAIN = flags.DEFINE_list("train_files", None, "Training files (default: the embedded corpus).")
_WEIGHTS = flags.DEFINE_list("train_weights", None, "Mixing weight per --train_files entry.")
_EVAL = flags.DEFINE_list("eval_files", None, "Held-out files (haystacks and the held-out gate).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The tokenizer the weights were trained with.")
_FSDP = flags.DEFINE_integer("mesh_fsdp", None, "FSDP degree (-1: every device).")


def extension_config() -> long_context.ExtensionConfig:
  cfg = EXTEND[_CONFIG.value]
  run = {k: v for k, v in (("data_dir", _DATA_DIR.value), ("tokenizer", _TOKENIZER.value),
                           ("mesh_fsdp", _FSDP.value)) if v is not None}
  if _TRAIN.value is not None:
    run["train_files"] = tuple(_TRAIN.value)
  if _EVAL.value is not None:
    run["eval_files"] = tuple(_EVAL.value)
  if _WEIGHTS.value is not None:
    try:
      run["train_weights"] = tuple(float(w) for w in _WEIGHTS.value)
    except ValueError:
      raise ConfigError(f"--train_weights={','.join(_WEIGHTS.value)}: give numbers.") from None
  gate = {k: v for k, v in (("needle_min", _NEEDLE_MIN.value), ("heldout_max_rise", _MAX_RISE.value))
          if v is not None}
  top = {k: v for k, v in (("root_dir", _ROOT.value), ("init_from", _INIT.value),
                           ("from_run", _FROM_RUN.value), ("stop_on_gate_failure", _STOP.value),
                           ("retrieval_weight", _RETRIEVAL.value),
                           ("retrieval_format", _FORMAT.value)) if v is not None}
  stages = cfg.stages
  if _STEPS.value is not None:
    stages = tuple(dataclasses.replace(s, steps=_STEPS.value,  # the curriculum keeps its proportion
                                       short_docs_steps=s.short_docs_steps * _STEPS.value // s.steps)
                   for s in stages)
  return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **run), stages=stages,
                             gate=dataclasses.replace(cfg.gate, **gate), **top)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; give every setting as a flag.")
  logging.set_verbosity(logging.WARNING)
  try:
    gates = long_context.extend(extension_config())
  except (ConfigError, long_context.GateFailure) as e:
    sys.exit(f"error: {e}")
  failed = [g["stage"] for g in gates if not g["passed"]]
  print(f"{len(gates)} stages; gates failed: {failed or 'none'}", flush=True)


if __name__ == "__main__":
  app.run(main)
