"""Rejection sampling: the kept response is the argmax of the reward model run on each sample alone; the
output depends on the seed only (not on batch_size); the JSONL is SFT data read_sft reads back. A tiny random
policy and reward model; a SentencePiece tokenizer with the Llama 3 chat tokens (trained in a fixture)."""

import dataclasses
import json
import os
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config as C
from llama_jax.data import chat, posttrain, tokenizers as tk
from llama_jax.errors import ConfigError
from llama_jax.inference import generate
from llama_jax.interop import orbax
from llama_jax.model import factory, params as P
from llama_jax.parallel import sharding
from llama_jax.training import rejection as R

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [[{"role": "user", "content": "why is the sky blue?"}],
           [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "name a prime"}],
           [{"role": "user", "content": "hi"}]]
K = 4
SETTINGS = dict(k=K, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  src = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
  tok = tk.train_sentencepiece([src], str(tmp_path_factory.mktemp("spm") / "m"), 384, chat_tokens=True)
  policy_cfg = dataclasses.replace(C.TINY, vocab_size=tok.vocab_size)
  reward_cfg = dataclasses.replace(policy_cfg, head="reward")
  mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  policy = P.init_params(policy_cfg, mesh, jax.random.key(0))
  reward = P.reward_params_from_lm(policy, reward_cfg, mesh, jax.random.key(1))  # trunk shared, head drawn
  return tok, policy_cfg, policy, reward_cfg, reward


@pytest.fixture(scope="module")
def records(setup):
  tok, policy_cfg, policy, reward_cfg, reward = setup
  return R.rejection_sample(policy_cfg, policy, reward_cfg, reward, tok, PROMPTS, batch_size=6,
                            keep_samples=True, **SETTINGS)


def test_keeps_the_argmax_of_the_reward_model_on_each_sample_alone(setup, records):
  tok, policy_cfg, policy, reward_cfg, reward = setup
  fmt = chat.ChatFormat.llama3(tok)
  score = jax.jit(factory.make_model(reward_cfg).apply)
  for prompt, rec in zip(PROMPTS, records):
    assert len(rec["samples"]) == len(rec["scores"]) == K
    # The reference: each prompt + sample rendered and scored alone (one row, right-padded to 128 tokens, no
    # segment ids: causality hides the padding) at its last token.
    ref = []
    for text in rec["samples"]:
      ids = chat.render(tok, fmt, prompt + [{"role": "assistant", "content": text}]).ids
      assert ids[-1] == fmt.end_id  # the reward is read at <|eot_id|>
      row = np.zeros((1, 128), np.int32)
      row[0, :len(ids)] = ids
      ref.append(float(score({"params": reward}, row, last_index_B=jnp.asarray([len(ids) - 1]))[0]))
    np.testing.assert_allclose(rec["scores"], ref, atol=1e-5, rtol=0)
    best = int(np.argmax(ref))
    assert rec["messages"] == prompt + [{"role": "assistant", "content": rec["samples"][best]}]
    assert rec["score"] == rec["scores"][best] == max(rec["scores"])
  # One dialog unpadded (the reward read at T - 1): the padding changes nothing.
  ids = chat.render(tok, fmt, records[0]["messages"]).ids
  np.testing.assert_allclose(score({"params": reward}, jnp.asarray(ids)[None])[0], records[0]["score"],
                             atol=1e-5, rtol=0)
  assert len({s for r in records for s in r["samples"]}) > K  # it sampled: the texts differ
  # Sample j of prompt i draws with key fold_in(fold_in(key(seed), i), j): prompt 1's 4 samples again, in a
  # batch of 6 rows (the shape of the call above: no new compile).
  base = jax.random.key(SETTINGS["seed"])
  keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(base, 1), j) for j in range(6)])
  ids = chat.render(tok, fmt, PROMPTS[1], add_generation_prompt=True).ids.tolist()
  new = generate.generate(policy_cfg, policy, [ids] * 6, 8, temperature=1.0, top_p=0.95, rng=keys,
                          stop_ids=(tok.eos_id, fmt.eom_id, fmt.end_id), pad_id=tok.pad_id)
  assert records[1]["samples"] == [tok.decode(x) for x in new[:K]]

def test_same_seed_same_output_whatever_the_batch_size(setup, records):
  tok, policy_cfg, policy, reward_cfg, reward = setup
  again = R.rejection_sample(policy_cfg, policy, reward_cfg, reward, tok, PROMPTS, batch_size=12,
                             keep_samples=True, **SETTINGS)
  for a, b in zip(records, again):
    assert a["samples"] == b["samples"] and a["messages"] == b["messages"]
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5, rtol=0)
  other = R.rejection_sample(policy_cfg, policy, reward_cfg, reward, tok, PROMPTS, batch_size=12,
                             keep_samples=True, **{**SETTINGS, "seed": 4})
  assert [r["samples"] for r in other] != [r["samples"] for r in records]


def test_jsonl_round_trips_through_read_sft(setup, records, tmp_path):
  tok = setup[0]
  fmt = chat.ChatFormat.llama3(tok)
  empty = {**records[0], "messages": PROMPTS[0] + [{"role": "assistant", "content": " "}]}
  path = str(tmp_path / "out" / "rs.jsonl")
  assert R.write_jsonl(list(records) + [empty], path) == 1  # an empty best is left out: read_sft refuses it
  dialogs, _ = posttrain.read_sft(path, tok, fmt, seq_len=256)
  assert len(dialogs) == len(records)
  for d, rec in zip(dialogs, records):
    np.testing.assert_array_equal(d.ids, chat.render(tok, fmt, rec["messages"]).ids)
  with open(path) as f:
    assert [json.loads(line)["scores"] for line in f] == [r["scores"] for r in records]


def test_k1_keeps_the_single_sample(setup, records):
  tok, policy_cfg, policy, reward_cfg, reward = setup
  # 6 prompts x 1 in one batch of 6: the fixture's shape again.
  one = R.rejection_sample(policy_cfg, policy, reward_cfg, reward, tok, PROMPTS * 2, batch_size=6,
                           keep_samples=True, **{**SETTINGS, "k": 1})
  for rec in one:
    assert len(rec["scores"]) == 1 and rec["messages"][-1]["content"] == rec["samples"][0]
    assert rec["score"] == rec["scores"][0]
  assert [r["samples"][0] for r in one[:3]] == [r["samples"][0] for r in records]  # keys (i, 0): the same

def test_errors_name_the_fix(setup, tmp_path):
  tok, policy_cfg, policy, reward_cfg, reward = setup
  with pytest.raises(ConfigError, match="reward model's ModelConfig.head is 'lm'; give a reward model"):
    R.rejection_sample(policy_cfg, policy, policy_cfg, policy, tok, PROMPTS, **SETTINGS)
  answered = [PROMPTS[0] + [{"role": "assistant", "content": "x"}]]
  with pytest.raises(ConfigError, match="prompt 0 ends with a message of role 'assistant'; a prompt ends with"):
    R.rejection_sample(policy_cfg, policy, reward_cfg, reward, tok, answered, **SETTINGS)
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"messages": PROMPTS[1]}) + "\n"
                  + json.dumps({"text": "x"}) + "\n")
  with pytest.raises(ConfigError, match=r"p.jsonl:3: no 'messages' or 'prompt' field"):
    R.read_prompts(str(path), chat.ChatFormat.llama3(tok))
  path.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"messages": PROMPTS[1]}) + "\n")
  assert R.read_prompts(str(path), chat.ChatFormat.llama3(tok)) == [
      [{"role": "user", "content": "hello"}], PROMPTS[1]]


def test_script_end_to_end(setup, tmp_path):
  """experiments/rejection_sample.py on params-only directories: SFT JSONL out; a language model given as
  --reward_model is a one-line error naming the fix."""
  tok, policy_cfg, policy, reward_cfg, reward = setup
  orbax.save_params(str(tmp_path / "policy"), policy, policy_cfg)
  orbax.save_params(str(tmp_path / "rm"), reward, reward_cfg)
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"messages": PROMPTS[1]}) + "\n")
  out = tmp_path / "rs.jsonl"
  cmd = [sys.executable, os.path.join(ROOT, "experiments/rejection_sample.py"), "--policy=orbax:" + str(
      tmp_path / "policy"), f"--tokenizer={tok.model_path}", f"--prompts={prompts}", f"--output={out}",
         "--k=3", "--max_new_tokens=6", "--batch_size=5", "--mesh_fsdp=2"]  # 5 rows: padded to 6 on 2 devices
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  bad = subprocess.run(cmd + [f"--reward_model={tmp_path / 'policy'}"], capture_output=True, text=True, env=env)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
      f"error: --reward_model={tmp_path / 'policy'}: its model config has head='lm', a language model; give a "
      "reward model (head='reward', trained with the reward recipe)."]
  run = subprocess.run(cmd + [f"--reward_model={tmp_path / 'rm'}"], capture_output=True, text=True, env=env)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "2 prompts x 3 samples: mean best reward" in run.stdout
  dialogs, _ = posttrain.read_sft(str(out), tok, chat.ChatFormat.llama3(tok), seq_len=256)
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(dialogs) == len(lines) == 2 and all(len(r["scores"]) == 3 for r in lines)
  assert lines[1]["messages"][:-1] == PROMPTS[1] and lines[1]["score"] == max(lines[1]["scores"])
  # The kept dialogs scored here, on one device, give the scores the script wrote from its 2-device mesh.
  ours = R.score_dialogs(reward_cfg, reward, tok, chat.ChatFormat.llama3(tok), [r["messages"] for r in lines],
                         batch_size=6)
  np.testing.assert_allclose(ours, [r["score"] for r in lines], atol=1e-5, rtol=0)


def test_chatml_format(setup, tmp_path):
  """A ChatML format (ids borrowed from the chat specials): each sample rendered as a ChatML dialog (ending
  <|im_end|> "\\n") and scored there, the best kept, the output read back under that format."""
  tok, policy_cfg, policy, reward_cfg, reward = setup
  st = tok.special_tokens
  fmt = chat.ChatFormat("chatml", start_id=st["<|start_header_id|>"], end_id=st["<|eot_id|>"])
  recs = R.rejection_sample(policy_cfg, policy, reward_cfg, reward, tok, PROMPTS[:2], batch_size=6,
                            keep_samples=True, fmt=fmt, **{**SETTINGS, "k": 3})
  dialogs = [p + [{"role": "assistant", "content": t}] for p, r in zip(PROMPTS, recs) for t in r["samples"]]
  assert chat.render(tok, fmt, dialogs[0]).ids[-2] == fmt.end_id
  ref = R.score_dialogs(reward_cfg, reward, tok, fmt, dialogs, batch_size=6)
  np.testing.assert_allclose([s for r in recs for s in r["scores"]], ref, atol=1e-5, rtol=0)
  assert [r["messages"] for r in recs] == [dialogs[3 * i + int(np.argmax(ref[3 * i:3 * i + 3]))] for i in (0, 1)]
  path = str(tmp_path / "rs.jsonl")
  assert R.write_jsonl(recs, path) == 0
  assert len(posttrain.read_sft(path, tok, fmt, seq_len=256)[0]) == 2
