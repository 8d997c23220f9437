"""Rejection sampling (Llama 3 §4.2.2): K responses per prompt from the policy, the reward model keeps the best
as SFT data (JSONL, read by the SFT recipe's --sft_files):

  python experiments/rejection_sample.py --policy=orbax:/ckpt/sft --reward_model=/ckpt/rm \
      --tokenizer=/ckpt/tokenizer.model --prompts=prompts.jsonl --k=10 --output=/data/rs.jsonl

--policy: hf:/path, meta:/path, gguf:/file.gguf or orbax:/path (a language model). --reward_model: a
params-only directory (model_config.json with head="reward") or a run directory (its latest checkpoint).
--prompts: JSONL lines {"messages": [...]} ending with a user turn, or {"prompt": "text"}.
Each output line: {"messages": prompt + [best answer], "score": s, "scores": [K]} (+ "samples" with
--keep_samples).
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from llama_jax.data import chat, tokenizers  # noqa: E402
from llama_jax.errors import ConfigError  # noqa: E402
from llama_jax.interop import init_from, orbax  # noqa: E402
from llama_jax.parallel import sharding  # noqa: E402
from llama_jax.training import continued, rejection  # noqa: E402

_POLICY = flags.DEFINE_string("policy", None, "The policy: hf:|meta:|gguf:|orbax:PATH.", required=True)
_REWARD = flags.DEFINE_string("reward_model", None, "The reward model: a params-only directory or a run "
                              "directory (orbax: prefix optional).", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer file (default: <policy path>/tokenizer.model).")
_PROMPTS = flags.DEFINE_list("prompts", None, "Prompt JSONL file(s).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The JSONL to write.", required=True)
_K = flags.DEFINE_integer("k", 10, "Samples per prompt (the paper: 10-30).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature.")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus: the most likely tokens holding this probability.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 512, "Tokens per response (at most).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (sample j of prompt i: its own key).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Rows (prompt x sample) per generation and scoring call.")
_KEEP = flags.DEFINE_bool("keep_samples", False, "Also write all K responses of each prompt.")
_ON_BAD = flags.DEFINE_enum("on_bad_line", "fail", ["fail", "skip"], "A bad prompt line: fail or skip it.")
_FSDP = flags.DEFINE_integer("mesh_fsdp", -1, "Devices the weights and rows are split over (-1: the rest).")
_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "Devices the heads and MLP are split over.")


def load_reward_model(spec: str, mesh):
  path = spec.removeprefix("orbax:")
  if not os.path.isdir(path):
    raise ConfigError(f"--reward_model={spec}: no such directory; give a reward model's params or run dir.")
  if os.path.exists(os.path.join(path, orbax.CONFIG_FILE)):
    config = orbax.read_config(path)
    load = lambda: orbax.restore_params(path, config, mesh)  # noqa: E731
  else:
    config, params = continued.latest_params(path, mesh, flag="--reward_model")
    load = lambda: params  # noqa: E731
  if config.head != "reward":
    raise ConfigError(f"--reward_model={spec}: its model config has head={config.head!r}, a language model; "
                      "give a reward model (head='reward', trained with the reward recipe).")
  return config, load()


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; give every setting as a flag, e.g. --k=10.")
  logging.set_verbosity(logging.WARNING)
  try:
    mesh = sharding.make_mesh(fsdp=_FSDP.value, tensor=_TENSOR.value)
    reward_cfg, reward_params = load_reward_model(_REWARD.value, mesh)
    tok = tokenizers.load_tokenizer(_TOKENIZER.value
                                    or os.path.join(init_from.parse(_POLICY.value)[1], "tokenizer.model"))
    fmt = chat.ChatFormat.for_tokenizer(tok)
    prompts = rejection.read_prompts(_PROMPTS.value, fmt, _ON_BAD.value)
    policy_cfg, policy_params = init_from.load_pretrained(_POLICY.value, mesh)
    records = rejection.rejection_sample(
        policy_cfg, policy_params, reward_cfg, reward_params, tok, prompts, k=_K.value,
        temperature=_TEMPERATURE.value, top_p=_TOP_P.value, max_new_tokens=_MAX_NEW.value, seed=_SEED.value,
        mesh=mesh, batch_size=_BATCH.value, keep_samples=_KEEP.value, fmt=fmt)
    left_out = rejection.write_jsonl(records, _OUTPUT.value)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  best = np.array([r["score"] for r in records])
  every = np.array([r["scores"] for r in records])
  print(f"{len(prompts)} prompts x {_K.value} samples: mean best reward {best.mean():.4f}, mean reward "
        f"{every.mean():.4f}; wrote {len(records) - left_out} dialogs to {_OUTPUT.value}"
        + (f" ({left_out} left out: the best response was empty)" if left_out else ""), flush=True)


if __name__ == "__main__":
  app.run(main)
