"""Average the params of several checkpoints into one params directory, streamed one parameter at a time.

  # Polyak averaging while annealing: every checkpoint of a run, some steps, or the last K:
  python experiments/average.py --run_dir=/tmp/run --output=/tmp/run_avg
  python experiments/average.py --run_dir=/tmp/run --steps=800,900,1000 --output=/tmp/run_avg
  python experiments/average.py --run_dir=/tmp/run --last=5 --output=/tmp/run_avg
  # per-stage model averaging: the latest checkpoint of each of several runs, weighted:
  python experiments/average.py --run_dirs=/tmp/a,/tmp/b,/tmp/c --weights=2,1,1 --output=/tmp/abc_avg
  # params-only directories (experiments/convert.py --to_format=orbax, or earlier averages):
  python experiments/average.py --inputs=/ckpt/a,/ckpt/b --output=/tmp/ab_avg
The output is read by --init_from=orbax:/tmp/run_avg and experiments/convert.py --from_format=orbax.
"""

import math
import sys

from absl import app, flags

from llama_jax.errors import ConfigError
from llama_jax.parallel import sharding
from llama_jax.training import averaging

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A pretraining run directory whose checkpoints to average.")
_STEPS = flags.DEFINE_list("steps", [], "With --run_dir: the steps to average (default: every checkpoint).")
_LAST = flags.DEFINE_integer("last", None, "With --run_dir: average its last K checkpoints.")
_RUN_DIRS = flags.DEFINE_list("run_dirs", [], "Pretraining run directories: average the latest checkpoint "
                              "of each (instead of --run_dir).")
_INPUTS = flags.DEFINE_list("inputs", [], "Params-only directories to average (instead of --run_dir).")
_WEIGHTS = flags.DEFINE_list("weights", [], "One weight per checkpoint, in order (normalized to sum 1; "
                             "default: uniform).")
_OUTPUT = flags.DEFINE_string("output", None, "New directory for the averaged params.", required=True)
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", -1, "FSDP degree (-1: all devices not used by tensor).")
_MESH_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "Tensor-parallel degree.")


def _numbers(flag, values, kind):
  try:
    out = [kind(v) for v in values]
  except ValueError:
    out = None
  if out is None or not all(math.isfinite(v) for v in out):
    raise ConfigError(f"--{flag}={','.join(values)}: give {'integers' if kind is int else 'numbers'}, "
                      "comma-separated.")
  return out


def run() -> None:
  steps = _numbers("steps", _STEPS.value, int)
  weights = _numbers("weights", _WEIGHTS.value, float) or None
  mesh = sharding.make_mesh(fsdp=_MESH_FSDP.value, tensor=_MESH_TENSOR.value)
  _, sources = averaging.average(
      _OUTPUT.value, mesh, run_dir=_RUN_DIR.value, steps=steps, last=_LAST.value, run_dirs=_RUN_DIRS.value,
      inputs=_INPUTS.value, weights=weights,
      on_each=lambda src, w: print(f"{src.label}: weight {w:.6g} ({src.path})", flush=True))
  print(f"wrote the average of {len(sources)} checkpoints to {_OUTPUT.value}", flush=True)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; give every setting as a flag, e.g. --output=DIR.")
  try:
    run()
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
