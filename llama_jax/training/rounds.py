"""Post-training rounds, as Llama 3 runs them (§4.1, six cycles): each round rejection-samples SFT data from
the current policy with the reward model, fine-tunes on it, then runs DPO; the next round starts from this
round's DPO model.

`run_rounds(RoundsConfig)` is what experiments/post_train_rounds.py calls. Round r (1-based) under
<root_dir>/round_r/:

  sft.jsonl, rejection.json   rejection_sample(policy, reward_model) on the prompts (K samples each, seed
                              sample_seed + r); rejection.json holds the mean best and mean reward
  sft/seed_s/                 post_train(objective=sft) from the policy, one run per seed s
  sft/average/                their finals averaged (averaging.average; one seed: the same params)
  dpo/seed_s/                 post_train(objective=dpo) from sft/average, sft/average as the reference
  dpo/average/                their finals averaged: the next round's policy (round 1's: init_from)

Every step is an ordinary run, so a rerun continues: a sample file with its rejection.json, a run with
<run_dir>/final/model_config.json, or an average with its model_config.json is finished and skipped (an
unfinished run resumes from its checkpoint; an unfinished average is redone). The per-round metrics go to
<root_dir>/rounds.json, a table (one column per round) and <root_dir>/rounds.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.data import chat, tokenizers
from llama_jax.errors import ConfigError
from llama_jax.interop import init_from as init_from_lib, orbax as orbax_lib
from llama_jax.parallel import sharding
from llama_jax.training import averaging, continued, posttrain as pt, rejection
from llama_jax.training.optim import OptimizerConfig

# (key in rounds.json, label in the table and plot)
METRICS = (("mean_best_reward", "rejection: mean best reward"), ("mean_reward", "rejection: mean reward"),
           ("sft_loss", "sft: final loss"), ("sft_eval_loss", "sft: held-out loss"),
           ("dpo_loss", "dpo: final loss"), ("dpo_margins", "dpo: rewards/margins"),
           ("dpo_accuracies", "dpo: rewards/accuracies"), ("dpo_eval_loss", "dpo: held-out loss"))


@dataclasses.dataclass(frozen=True)
class RoundsConfig:
  """N rounds of rejection sampling -> SFT -> DPO. `model` gives the execution choices only (the shape
  comes from `init_from`)."""

  rounds: int
  init_from: str  # the starting policy: hf:/path, meta:/path, gguf:/file.gguf or orbax:/path
  reward_model: str  # a reward model: params-only dir (head "reward") or its run dir
  tokenizer: str
  prompts: tuple[str, ...]  # rejection sampling's prompts (JSONL)
  preference_files: tuple[str, ...]  # DPO's pairs (JSONL)
  root_dir: str
  sft_eval_files: tuple[str, ...] = ()  # held-out SFT dialogs: each SFT run's loss on them at its end
  dpo_eval_files: tuple[str, ...] = ()  # held-out pairs: each DPO run's loss on them at its end
  k: int = 10
  temperature: float = 1.0
  top_p: float = 0.9
  max_new_tokens: int = 512
  sample_batch_size: int = 64
  sample_seed: int = 0
  seeds_per_round: int = 1  # SFT/DPO runs per round (seeds 0..n-1), their finals averaged
  sft_steps: int = 100
  sft_lr: float = 1e-5
  dpo_steps: int = 100
  dpo_lr: float = 1e-6
  batch_size: int = 32
  seq_len: int = 2048
  warmup_steps: int = 0
  on_bad_line: str = "fail"  # "skip": a dialog longer than seq_len (or a bad line) is dropped, not fatal
  beta: float = 0.1
  nll_coef: float = 0.2
  model: ModelConfig = ModelConfig()
  mesh_fsdp: int = -1
  mesh_tensor: int = 1
  log_every: int = 10
  checkpoint_every: int = 100
  compilation_cache_dir: str = ""  # "" = <root_dir>/compilation_cache, shared by every run

  def __post_init__(self):
    for f in ("rounds", "k", "seeds_per_round", "sft_steps", "dpo_steps", "batch_size", "max_new_tokens",
              "sample_batch_size"):
      if getattr(self, f) < 1:
        raise ConfigError(f"--{f}={getattr(self, f)}: must be >= 1.")
    for f in ("init_from", "reward_model", "tokenizer", "root_dir"):
      if not getattr(self, f):
        raise ConfigError(f"--{f} is required.")
    for f in ("prompts", "preference_files"):
      if not getattr(self, f):
        raise ConfigError(f"--{f} is required (JSONL).")
    if not (self.sft_lr > 0 and self.dpo_lr > 0):
      raise ConfigError(f"--sft_lr={self.sft_lr}, --dpo_lr={self.dpo_lr}: both must be > 0.")


def _finished(params_dir: str) -> bool:
  return os.path.exists(os.path.join(params_dir, orbax_lib.CONFIG_FILE))


def _last(run_dir: str, key: str) -> float | None:
  """The last value of `key` in the run's metrics.jsonl (None if never logged)."""
  value = None
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if key in r:
        value = r[key]
  return value


def _mean(xs: Sequence[float | None]) -> float | None:
  return None if any(x is None for x in xs) else float(np.mean(xs))


def load_reward_model(spec: str, mesh) -> tuple[ModelConfig, Any]:
  """A reward model from a params-only directory or a run directory (its latest checkpoint)."""
  path = spec.removeprefix("orbax:")
  if not os.path.isdir(path):
    raise ConfigError(f"--reward_model={spec}: no such directory; give a reward model's params or run dir.")
  if _finished(path):
    config = orbax_lib.read_config(path)
    params = orbax_lib.restore_params(path, config, mesh) if config.head == "reward" else None
  else:
    config, params = continued.latest_params(path, mesh, flag="--reward_model")
  if config.head != "reward":
    raise ConfigError(f"--reward_model={spec}: its model config has head={config.head!r}, a language model; "
                      "give a reward model (head='reward', trained with post_train.py --objective=reward).")
  return config, params


def _sample(cfg: RoundsConfig, r: int, policy: str, round_dir: str, mesh) -> dict:
  """Rejection sampling of round r from `policy` -> round_dir/sft.jsonl; its stats (rejection.json)."""
  stats_path = os.path.join(round_dir, "rejection.json")
  out = os.path.join(round_dir, "sft.jsonl")
  if os.path.exists(stats_path) and os.path.exists(out):
    print(f"round {r}: rejection sampling done ({out})", flush=True)
    return json.loads(open(stats_path, encoding="utf-8").read())
  tok = tokenizers.load_tokenizer(cfg.tokenizer)
  tok = tok.with_chat_tokens() if hasattr(tok, "with_chat_tokens") else tok  # as post_train reads it
  fmt = chat.ChatFormat.for_tokenizer(tok)
  prompts = rejection.read_prompts(cfg.prompts, fmt)
  reward_cfg, reward_params = load_reward_model(cfg.reward_model, mesh)
  policy_cfg, policy_params = init_from_lib.load_pretrained(policy, mesh)
  records = rejection.rejection_sample(
      policy_cfg, policy_params, reward_cfg, reward_params, tok, prompts, k=cfg.k,
      temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
      seed=cfg.sample_seed + r, mesh=mesh, batch_size=cfg.sample_batch_size, fmt=fmt)
  del policy_params, reward_params
  left_out = rejection.write_jsonl(records, out + ".tmp")
  if left_out == len(records):
    raise ConfigError(f"round {r}: every best response was empty; raise --max_new_tokens or check the "
                      "policy's chat format.")
  os.replace(out + ".tmp", out)
  stats = {"prompts": len(records), "kept": len(records) - left_out,
           "mean_best_reward": float(np.mean([x["score"] for x in records])),
           "mean_reward": float(np.mean([x["scores"] for x in records]))}
  with open(stats_path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2)
  os.replace(stats_path + ".tmp", stats_path)  # last: its presence says the round's samples are complete
  print(f"round {r}: {stats['prompts']} prompts x {cfg.k} samples: mean best reward "
        f"{stats['mean_best_reward']:.4f}, mean reward {stats['mean_reward']:.4f}", flush=True)
  return stats


def _runs(cfg: RoundsConfig, objective: str, start: str, stage_dir: str, steps: int, lr: float,
          mesh, **data) -> str:
  """One post_train run per seed from `start`, then their finals averaged; returns orbax:<average>."""
  optim = OptimizerConfig(peak_lr=lr, final_lr=lr, warmup_steps=cfg.warmup_steps, total_steps=steps)
  cache = cfg.compilation_cache_dir or os.path.join(os.path.abspath(cfg.root_dir), "compilation_cache")
  finals = []
  for seed in range(cfg.seeds_per_round):
    run_dir = os.path.join(stage_dir, f"seed_{seed}")
    final = os.path.join(run_dir, pt.FINAL_DIR)
    finals.append(final)
    if _finished(final):
      print(f"{run_dir}: finished", flush=True)
      continue
    pt.post_train(pt.PostTrainConfig(
        objective=objective, init_from=start, tokenizer=cfg.tokenizer, run_dir=run_dir, seq_len=cfg.seq_len,
        batch_size=cfg.batch_size, steps=steps, optim=optim, model=cfg.model, beta=cfg.beta,
        nll_coef=cfg.nll_coef, seed=seed, on_bad_line=cfg.on_bad_line, mesh_fsdp=cfg.mesh_fsdp, mesh_tensor=cfg.mesh_tensor,
        log_every=cfg.log_every, eval_every=steps, checkpoint_every=cfg.checkpoint_every,
        compilation_cache_dir=cache, **data))
  avg = os.path.join(stage_dir, "average")
  if not _finished(avg):
    shutil.rmtree(avg, ignore_errors=True)  # an average cut short: redone whole
    averaging.average(avg, mesh, inputs=finals)
    print(f"{avg}: the average of {len(finals)} run(s)", flush=True)
  return f"orbax:{avg}"


def run_rounds(cfg: RoundsConfig) -> list[dict]:
  """Runs (or continues) the rounds; returns one metrics dict per round (also in <root>/rounds.json)."""
  for p in (cfg.tokenizer, *cfg.prompts, *cfg.preference_files, *cfg.sft_eval_files, *cfg.dpo_eval_files):
    if not os.path.exists(p):
      raise ConfigError(f"{p} does not exist; check the path.")
  root = os.path.abspath(cfg.root_dir)
  os.makedirs(root, exist_ok=True)
  mesh = sharding.make_mesh(fsdp=cfg.mesh_fsdp, tensor=cfg.mesh_tensor)
  policy, rows = cfg.init_from, []
  for r in range(1, cfg.rounds + 1):
    round_dir = os.path.join(root, f"round_{r}")
    os.makedirs(round_dir, exist_ok=True)
    stats = _sample(cfg, r, policy, round_dir, mesh)
    sft_dir, dpo_dir = os.path.join(round_dir, "sft"), os.path.join(round_dir, "dpo")
    sft = _runs(cfg, "sft", policy, sft_dir, cfg.sft_steps, cfg.sft_lr, mesh,
                sft_files=(os.path.join(round_dir, "sft.jsonl"),), eval_files=cfg.sft_eval_files)
    policy = _runs(cfg, "dpo", sft, dpo_dir, cfg.dpo_steps, cfg.dpo_lr, mesh, reference=sft,
                   preference_files=cfg.preference_files, eval_files=cfg.dpo_eval_files)
    seeds = lambda d: [os.path.join(d, f"seed_{s}") for s in range(cfg.seeds_per_round)]  # noqa: E731
    row = {"round": r, "policy": policy, "mean_best_reward": stats["mean_best_reward"],
           "mean_reward": stats["mean_reward"],
           "sft_loss": _mean([_last(d, "loss") for d in seeds(sft_dir)]),
           "sft_eval_loss": _mean([_last(d, "eval_loss") for d in seeds(sft_dir)]) if cfg.sft_eval_files
           else None,
           "dpo_loss": _mean([_last(d, "loss") for d in seeds(dpo_dir)]),
           "dpo_margins": _mean([_last(d, "rewards/margins") for d in seeds(dpo_dir)]),
           "dpo_accuracies": _mean([_last(d, "rewards/accuracies") for d in seeds(dpo_dir)]),
           "dpo_eval_loss": _mean([_last(d, "eval_loss") for d in seeds(dpo_dir)]) if cfg.dpo_eval_files
           else None}
    rows.append(row)
    _write_json(os.path.join(root, "rounds.json"), {"rounds": rows})
  print(table(rows), flush=True)
  plot(rows, os.path.join(root, "rounds.png"))
  return rows


def _write_json(path: str, obj: Any) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


def table(rows: Sequence[dict]) -> str:
  """One line per metric, one column per round ('-' where not measured)."""
  width = max(len(label) for _, label in METRICS)
  head = f"{'':{width}}" + "".join(f"  {'round ' + str(r['round']):>10}" for r in rows)
  lines = [head]
  for key, label in METRICS:
    cells = "".join(f"  {r[key]:>10.4f}" if r.get(key) is not None else f"  {'-':>10}" for r in rows)
    lines.append(f"{label:{width}}{cells}")
  return "\n".join(lines)


def plot(rows: Sequence[dict], path: str) -> None:
  """One panel per measured metric, its value against the round."""
  import matplotlib  # noqa: PLC0415 (only the plot needs it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  shown = [(k, label) for k, label in METRICS if any(r.get(k) is not None for r in rows)]
  cols = 2
  fig, axes = plt.subplots(-(-len(shown) // cols), cols, figsize=(9, 2.6 * -(-len(shown) // cols)),
                           squeeze=False)
  for ax, (key, label) in zip(axes.flat, shown):
    xs = [r["round"] for r in rows if r.get(key) is not None]
    ax.plot(xs, [r[key] for r in rows if r.get(key) is not None], marker="o")
    ax.set_title(label, fontsize=9)
    ax.set_xticks([r["round"] for r in rows])
  for ax in list(axes.flat)[len(shown):]:
    ax.axis("off")
  fig.supxlabel("round")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
