"""Continue prompts with a trained model (KV-cache generation):

  python experiments/generate.py --run_dir=runs/default --prompt="ROMEO." --prompt="def "
  python experiments/generate.py --init_from=hf:/path/Llama-3.2-1B --tokenizer=/path/tokenizer.model \
      --prompt="The capital of France is" --temperature=0

The weights are a pretraining run's latest checkpoint (--run_dir; its tokenizer is found from its
run_config.json) or --init_from=hf:|meta:|orbax:PATH (then --tokenizer, default PATH/tokenizer.model).
Sampling: --temperature=0 is greedy; otherwise top-k (--top_k, 0: off) then nucleus (--top_p) sampling.
"""

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from llama_jax.data import tokenizers  # noqa: E402
from llama_jax.errors import ConfigError  # noqa: E402
from llama_jax.inference import generate  # noqa: E402
from llama_jax.interop import init_from  # noqa: E402
from llama_jax.parallel import sharding  # noqa: E402
from llama_jax.training import continued  # noqa: E402
from llama_jax.training.pretrain import CONFIG_FILE  # noqa: E402

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A pretraining run directory: its latest checkpoint.")
_INIT = flags.DEFINE_string("init_from", None, "Or weights: hf:/path, meta:/path or orbax:/path.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer file (default: the run's, or "
                                 "<init_from path>/tokenizer.model).")
_PROMPT = flags.DEFINE_multi_string("prompt", ["ROMEO.", "def "], "A prompt; repeat the flag for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (at most).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: no limit.")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus: the most likely tokens holding this probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "End a continuation at the tokenizer's end token.")
_FSDP = flags.DEFINE_integer("mesh_fsdp", -1, "Devices the weights and rows are split over (-1: the rest).")
_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "Devices the heads and MLP are split over.")


def _run_tokenizer(run_dir: str) -> str:
  """The tokenizer a pretraining run trained with: --tokenizer, or the embedded corpus's under data_dir."""
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(f"--run_dir={run_dir}: no {CONFIG_FILE}; give a pretraining run directory or "
                      "--tokenizer.")
  with open(path) as f:
    run = json.load(f)
  return run["tokenizer"] or os.path.join(run["data_dir"], "tokenizer.model")  # corpus.py's layout


def load(mesh):
  """(model config, params on `mesh`, tokenizer path) from the flags."""
  if (_RUN_DIR.value is None) == (_INIT.value is None):
    raise ConfigError("give one of --run_dir=<pretraining run> or --init_from=hf:|meta:|orbax:PATH.")
  if _RUN_DIR.value is not None:
    config, params = continued.latest_params(_RUN_DIR.value, mesh, flag="--run_dir")
    return config, params, _TOKENIZER.value or _run_tokenizer(_RUN_DIR.value)
  config, params = init_from.load_pretrained(_INIT.value, mesh)
  return config, params, _TOKENIZER.value or os.path.join(init_from.parse(_INIT.value)[1], "tokenizer.model")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    mesh = sharding.make_mesh(fsdp=_FSDP.value, tensor=_TENSOR.value)
    config, params, tokenizer_path = load(mesh)
    tok = tokenizers.load_tokenizer(tokenizer_path)
    prompts = [tok.encode(p, bos=True) for p in _PROMPT.value]
    outs = generate.generate(config, params, prompts, _MAX_NEW.value, temperature=_TEMPERATURE.value,
                             top_k=_TOP_K.value, top_p=_TOP_P.value, rng=jax.random.key(_SEED.value),
                             stop_ids=(tok.eos_id,) if _STOP_AT_EOS.value else (), mesh=mesh)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  for p, o in zip(_PROMPT.value, outs):
    print(f"--- {p!r} ({len(o)} new tokens)\n{p}{tok.decode(o)}", flush=True)


if __name__ == "__main__":
  app.run(main)
