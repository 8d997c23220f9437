"""Convert Llama weights between Hugging Face, Meta's consolidated checkpoints, GGUF and llama_jax (Orbax).

  # HF → llama_jax params (Orbax), sharded over the local devices as it loads:
  python experiments/convert.py --from_format=hf --input=/ckpt/Llama-3.1-8B --output=/ckpt/l31_8b_orbax
  # Meta consolidated.*.pth → HF safetensors (the 3.2 1B/3B need --rope_scaling_factor=32 or the default):
  python experiments/convert.py --from_format=meta --input=/ckpt/Llama3.2-1B --to_format=hf --output=/tmp/hf
  # llama.cpp GGUF (dequantized to fp32) → HF; bos/eos ids come from the file's tokenizer unless given:
  python experiments/convert.py --from_format=gguf --input=/m/SmolLM2-135M-Instruct.Q4_1.gguf --to_format=hf \
      --hf_dtype=float32 --output=/tmp/smollm2_hf
  # llama_jax params → HF (the model config travels with the params as model_config.json):
  python experiments/convert.py --from_format=orbax --input=/ckpt/l31_8b_orbax --to_format=hf --output=/tmp/hf
"""

import os
import sys

from absl import app, flags, logging

from llama_jax.errors import ConfigError
from llama_jax.interop import gguf, hf, meta, orbax
from llama_jax.parallel import sharding

_FROM = flags.DEFINE_enum("from_format", "hf", ["hf", "meta", "gguf", "orbax"],
                          "Format of --input (gguf: a .gguf file, the rest directories).")
_TO = flags.DEFINE_enum("to_format", "orbax", ["hf", "orbax"], "Format of --output.")
_INPUT = flags.DEFINE_string("input", None, "Checkpoint directory (or .gguf file) to read.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write.", required=True)
_DTYPE = flags.DEFINE_enum("hf_dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                           "Tensor dtype of exported safetensors.")
_ROPE_FACTOR = flags.DEFINE_float("rope_scaling_factor", None,
                                  "Meta import only: RoPE scaling factor (params.json does not say it).")
_BOS = flags.DEFINE_integer("bos_id", hf.LLAMA3_BOS_ID,
                            "HF export: the tokenizer's BOS id (from a GGUF input: the file's, unless given).")
_EOS = flags.DEFINE_list("eos_id", [str(hf.LLAMA3_EOS_ID)],
                         "HF export: the tokenizer's EOS id(s) (from a GGUF input: the file's, unless given).")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", -1, "FSDP degree (-1: all devices not used by tensor).")
_MESH_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "Tensor-parallel degree.")


def convert() -> None:
  if os.path.isfile(_OUTPUT.value):
    raise ConfigError(f"--output={_OUTPUT.value} is a file; give a directory (new or existing).")
  try:
    eos = [int(i) for i in _EOS.value]
  except ValueError:
    raise ConfigError(f"--eos_id={','.join(_EOS.value)}: give integers.") from None
  bos = _BOS.value
  mesh = sharding.make_mesh(fsdp=_MESH_FSDP.value, tensor=_MESH_TENSOR.value)
  try:
    if _FROM.value == "hf":
      config, params = hf.load_hf(_INPUT.value, mesh)
    elif _FROM.value == "gguf":
      config, params = gguf.load_gguf(_INPUT.value, mesh)
      file_bos, file_eos = gguf.special_ids(_INPUT.value)
      bos = bos if _BOS.present or file_bos is None else file_bos
      eos = eos if _EOS.present or file_eos is None else [file_eos]
    elif _FROM.value == "meta":
      config, params = meta.load_meta(_INPUT.value, mesh, _ROPE_FACTOR.value)
    else:
      config, params = orbax.load_params(_INPUT.value, mesh)
  except ConfigError as e:
    raise ConfigError(f"--input (--from_format={_FROM.value}): {e}") from None
  logging.info("loaded %s checkpoint: %s", _FROM.value, config)
  if _TO.value == "hf":
    hf.save_hf(params, config, _OUTPUT.value, dtype=_DTYPE.value, bos_id=bos,
               eos_id=eos[0] if len(eos) == 1 else eos)
  else:
    orbax.save_params(_OUTPUT.value, params, config)
  print(f"wrote {_TO.value} checkpoint to {_OUTPUT.value}")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; give every setting as a flag, e.g. --input=DIR.")
  try:
    convert()
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
