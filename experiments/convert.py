"""Convert Llama weights between Hugging Face, Meta's consolidated checkpoints and llama_jax (Orbax).

  # HF → llama_jax params (Orbax), sharded over the local devices as it loads:
  python experiments/convert.py --from_format=hf --input=/ckpt/Llama-3.1-8B --output=/ckpt/l31_8b_orbax
  # Meta consolidated.*.pth → HF safetensors (the 3.2 1B/3B need --rope_scaling_factor=32 or the default):
  python experiments/convert.py --from_format=meta --input=/ckpt/Llama3.2-1B --to_format=hf --output=/tmp/hf
  # llama_jax params → HF (the model config travels with the params as model_config.json):
  python experiments/convert.py --from_format=orbax --input=/ckpt/l31_8b_orbax --to_format=hf --output=/tmp/hf
"""

from absl import app, flags, logging

from llama_jax.training import checkpoint
from llama_jax.interop import weights as hf_weights
from llama_jax.parallel import sharding

_FROM = flags.DEFINE_enum("from_format", "hf", ["hf", "meta", "orbax"], "Format of --input.")
_TO = flags.DEFINE_enum("to_format", "orbax", ["hf", "orbax"], "Format of --output.")
_INPUT = flags.DEFINE_string("input", None, "Checkpoint directory to read.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write.", required=True)
_DTYPE = flags.DEFINE_enum("hf_dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                           "Tensor dtype of exported safetensors.")
_ROPE_FACTOR = flags.DEFINE_float("rope_scaling_factor", None,
                                  "Meta import only: RoPE scaling factor (params.json does not say it).")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", -1, "FSDP degree (-1: all devices not used by tensor).")
_MESH_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "Tensor-parallel degree.")


def main(argv):
  del argv
  mesh = sharding.make_mesh(data=1, fsdp=_MESH_FSDP.value, tensor=_MESH_TENSOR.value)
  if _FROM.value == "hf":
    config, params = hf_weights.load_hf(_INPUT.value, mesh)
  elif _FROM.value == "meta":
    config, params = hf_weights.load_meta(_INPUT.value, mesh, _ROPE_FACTOR.value)
  else:
    config, params = checkpoint.load_params(_INPUT.value, mesh)
  logging.info("loaded %s checkpoint: %s", _FROM.value, config)
  if _TO.value == "hf":
    hf_weights.save_hf(params, config, _OUTPUT.value, dtype=_DTYPE.value)
  else:
    checkpoint.save_params(_OUTPUT.value, params, config)
  print(f"wrote {_TO.value} checkpoint to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
