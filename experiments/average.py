"""Average the params of several checkpoints (e.g. those kept while annealing) into one params directory.

  # every checkpoint of a run, or some of its steps:
  python experiments/average.py --run_dir=/tmp/run --output=/tmp/run_avg
  python experiments/average.py --run_dir=/tmp/run --steps=800,900,1000 --output=/tmp/run_avg
  # params-only directories (experiments/convert.py --to_format=orbax, or earlier averages):
  python experiments/average.py --inputs=/ckpt/a,/ckpt/b --output=/tmp/ab_avg
The output is read by --init_from=orbax:/tmp/run_avg and experiments/convert.py --from_format=orbax.
"""

import sys

from absl import app, flags

from llama_jax.errors import ConfigError
from llama_jax.parallel import sharding
from llama_jax.training import averaging

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A pretraining run directory whose checkpoints to average.")
_STEPS = flags.DEFINE_list("steps", [], "With --run_dir: the steps to average (default: every checkpoint).")
_INPUTS = flags.DEFINE_list("inputs", [], "Params-only directories to average (instead of --run_dir).")
_OUTPUT = flags.DEFINE_string("output", None, "New directory for the averaged params.", required=True)
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", -1, "FSDP degree (-1: all devices not used by tensor).")
_MESH_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "Tensor-parallel degree.")


def run() -> None:
  try:
    steps = [int(s) for s in _STEPS.value]
  except ValueError:
    raise ConfigError(f"--steps={','.join(_STEPS.value)}: give integers, comma-separated.") from None
  mesh = sharding.make_mesh(fsdp=_MESH_FSDP.value, tensor=_MESH_TENSOR.value)
  averaging.average(_OUTPUT.value, mesh, run_dir=_RUN_DIR.value, steps=steps, inputs=_INPUTS.value,
                    on_each=lambda src: print(f"added {src.label} ({src.path})", flush=True))
  print(f"wrote the average to {_OUTPUT.value}", flush=True)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; give every setting as a flag, e.g. --output=DIR.")
  try:
    run()
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
