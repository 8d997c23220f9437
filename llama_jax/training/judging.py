"""Judging a dataset by annealing ([P] §3.1.3): from a half-trained model, anneal the LR linearly to 0 on
a mix where the candidate has `candidate_share` (the paper: 30%) of the tokens and the default mix the
rest in its own proportions; compare the held-out loss with a control anneal on the default mix alone
(the same start, steps, LR and seed), so the difference is the candidate's.

A candidate is a JSONL file, a source of the default mix by name (the embedded corpus: "shakespeare",
"python"; then that source gets 30% on top of its own share of the 70%), or "retrieval" (the synthetic
key-value documents of data/retrieval.py). The yardstick is the default mix's held-out files, each
scored on its first `eval_batches` [batch_size, seq_len] batches; "overall" is the loss over all those
tokens. A negative change vs the control means the candidate helps.

  <root_dir>/start/          the start (params-only: --init_from, or --from_run's latest)
  <root_dir>/control/        run/ (the annealing run on the default mix) and result.json
  <root_dir>/<candidate>/    the same for each candidate
  <root_dir>/judge.json      per arm: held-out loss per source and overall, and the change vs the control
An arm with a result.json is not rerun, so rerunning the same command continues.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from llama_jax.data import pipeline, retrieval, stream as stream_lib, tokenizers as tokenizer_lib
from llama_jax.errors import ConfigError
from llama_jax.evals import heldout
from llama_jax.interop import orbax as orbax_params
from llama_jax.training import annealing, continued, pretrain as pretrain_lib, step as train
from llama_jax.training.pretrain import RunConfig, pretrain

RETRIEVAL = "retrieval"
_RESERVED = {"start", "control"}


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  # Each arm's annealing run: steps, batch x seq, peak LR (falls linearly to 0), seed, the default mix
  # (the embedded corpus under data_dir, or train_files/weights) and its held-out files, eval_batches.
  run: RunConfig
  root_dir: str
  candidates: tuple[str, ...] = ()  # JSONL paths, sources of the default mix, or "retrieval"
  candidate_share: float = 0.3  # the candidate's share of the annealing tokens ([P] §3.1.3: 30%)
  init_from: str | None = None
  from_run: str | None = None
  retrieval_docs: int = 2000  # the "retrieval" candidate: documents of 2 x seq_len tokens

  def __post_init__(self):
    if not 0 < self.candidate_share < 1:
      raise ConfigError(f"--candidate_share={self.candidate_share}: must be in (0, 1) (the candidate's "
                        "share of the annealing tokens; the paper's is 0.3).")
    if not self.candidates:
      raise ConfigError("--candidates: give at least one JSONL file or source name to judge.")


@dataclasses.dataclass(frozen=True)
class Candidate:
  name: str  # the report's label and the arm's directory
  path: str  # its JSONL file


def resolve_candidates(cfg: JudgeConfig, data: continued.Data) -> tuple[Candidate, ...]:
  """Each candidate as (label, file); a one-line ConfigError for one that is neither."""
  out = []
  for c in cfg.candidates:
    if c in data.names:
      out.append(Candidate(c, data.train_files[data.names.index(c)]))
    elif c == RETRIEVAL:
      t, n = 2 * cfg.run.seq_len, cfg.retrieval_docs
      path = os.path.join(os.path.abspath(cfg.root_dir), f"retrieval_{t}tok_{n}docs_seed0.jsonl")
      retrieval.write_source(path, tokenizer_lib.load_tokenizer(data.tokenizer), tokens_per_doc=t,
                             num_docs=n)
      out.append(Candidate(RETRIEVAL, path))
    elif os.path.isfile(c):
      out.append(Candidate(re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(c).removesuffix(".jsonl")), c))
    else:
      raise ConfigError(f"--candidates: {c!r} is neither a file nor a source of this run (it has "
                        f"{list(data.names)}, or '{RETRIEVAL}').")
  names = [c.name for c in out]
  clash = sorted({n for n in names if names.count(n) > 1 or n in _RESERVED})
  if clash:
    raise ConfigError(f"--candidates: the labels {clash} are taken (by another candidate, or 'start'/"
                      "'control'); rename the files.")
  return tuple(out)


def candidate_mix(data: continued.Data, cand: Candidate, share: float) -> continued.Data:
  """The default mix at (1 - share) of the tokens in its own proportions, plus the candidate (the last
  source) at `share`; the stream's weights are token shares (data/stream.py)."""
  total = sum(data.weights)
  return dataclasses.replace(data, names=data.names + (f"candidate:{cand.name}",),
                             train_files=data.train_files + (cand.path,),
                             weights=tuple(w / total * (1 - share) for w in data.weights) + (share,))


class _Scorer:
  """Held-out loss per held-out file: its first `batches` batches packed and transferred once, one eval
  step for every arm (they share the model)."""

  def __init__(self, run: RunConfig, data: continued.Data, config, mesh):
    tok = tokenizer_lib.load_tokenizer(data.tokenizer)
    self.names = _eval_names(data)
    self.step = train.make_eval_step(config, mesh, grad_accum_steps=run.optim.grad_accum_steps)
    self.sets = []
    for path in data.eval_files:
      ds = stream_lib.HeldOut.from_sources([pipeline.Source(path, field=run.text_field)], tok,
                                           batch_size=run.batch_size, seq_len=run.seq_len,
                                           restart_positions=run.restart_positions,
                                           cache_dir=os.path.join(run.data_dir, "tokens"))
      batches, counts = heldout.prepare(ds, lambda b: pretrain_lib.global_batch(b, mesh), run.eval_batches)
      self.sets.append((batches, int(counts.sum())))

  def __call__(self, params) -> dict:
    losses = {n: heldout.evaluate(self.step, params, b) for n, (b, _) in zip(self.names, self.sets)}
    tokens = {n: t for n, (_, t) in zip(self.names, self.sets)}
    overall = sum(losses[n] * tokens[n] for n in self.names) / sum(tokens.values())
    return {"heldout_loss": losses, "overall": overall, "tokens": tokens}


def _eval_names(data: continued.Data) -> list[str]:
  # The embedded corpus pairs one held-out file with each named source; other files go by their name.
  if len(data.eval_files) == len(data.names) and data.names != data.train_files:
    return list(data.names)
  names = [os.path.basename(p).removesuffix(".jsonl") for p in data.eval_files]
  return names if len(set(names)) == len(names) else list(data.eval_files)


def judge_sources(cfg: JudgeConfig) -> dict:
  """Runs (or continues) the control and one anneal per candidate; writes and returns judge.json."""
  root = os.path.abspath(cfg.root_dir)
  os.makedirs(root, exist_ok=True)
  data = continued.resolve_data(cfg.run)
  if not data.eval_files:
    raise ConfigError("--eval_files: judging needs held-out files (the embedded corpus has them).")
  cands = resolve_candidates(cfg, data)
  mesh = continued.make_mesh(cfg.run)
  start = continued.materialize_start(os.path.join(root, "start"), mesh, init_from=cfg.init_from,
                                      from_run=cfg.from_run)
  config, start_params = orbax_params.load_params(start.removeprefix("orbax:"), mesh)
  scorer = _Scorer(cfg.run, data, config, mesh)
  r = cfg.run
  settings = {"steps": r.steps, "seed": r.seed, "batch_size": r.batch_size, "seq_len": r.seq_len,
              "peak_lr": r.optim.peak_lr, "candidate_share": cfg.candidate_share,
              "eval_batches": r.eval_batches}

  def arm(name: str, mix: continued.Data) -> dict:
    d = os.path.join(root, name)
    done = os.path.join(d, "result.json")
    if os.path.exists(done):
      with open(done) as f:
        res = json.load(f)
      if res["settings"] != settings:
        raise ConfigError(f"{done} was made with {res['settings']}, not {settings}; give a new --root_dir.")
      print(f"{name}: done before ({done})", flush=True)
      return res
    # No held-out pass inside the run: the arms are scored below, per source, on the same batches.
    run = annealing.annealing_run(cfg.run, dataclasses.replace(mix, eval_files=()), os.path.join(d, "run"),
                                  start, cfg.from_run)
    print(f"=== {name}: {r.steps} steps (to step {run.steps}), LR {r.optim.peak_lr:g} -> 0 linearly, token shares "
          f"{dict(zip(mix.names, (round(w / sum(mix.weights), 4) for w in mix.weights)))}", flush=True)
    continued.run_to_end(run)
    res = {**scorer(continued.latest_params(run.run_dir, mesh)[1]), "settings": settings,
           "train_files": list(mix.train_files), "weights": list(mix.weights)}
    continued.write_json(done, res)
    return res

  control = arm("control", data)
  out = {"start": scorer(start_params), "control": control, "settings": settings, "candidates": []}
  for c in cands:
    res = arm(c.name, candidate_mix(data, c, cfg.candidate_share))
    out["candidates"].append({
        "name": c.name, "path": c.path, **res,
        "delta_overall": res["overall"] - control["overall"],
        "delta": {n: res["heldout_loss"][n] - control["heldout_loss"][n] for n in scorer.names}})
  continued.write_json(os.path.join(root, "judge.json"), out)
  print(table(out), flush=True)
  print(f"-> {os.path.join(root, 'judge.json')}", flush=True)
  return out


def table(out: dict) -> str:
  """candidate | overall held-out | Δ vs control | Δ per held-out source (negative: the candidate helps)."""
  names = list(out["control"]["heldout_loss"])
  head = ["candidate", "overall held-out", "Δ vs control"] + [f"Δ {n}" for n in names]
  rows = [["start (no anneal)", f"{out['start']['overall']:.4f}", "", *[""] * len(names)],
          ["control (default mix)", f"{out['control']['overall']:.4f}", "0", *["0"] * len(names)]]
  for c in out["candidates"]:
    rows.append([c["name"], f"{c['overall']:.4f}", f"{c['delta_overall']:+.4f}",
                 *[f"{c['delta'][n]:+.4f}" for n in names]])
  widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
  fmt = lambda r: " | ".join(x.ljust(w) for x, w in zip(r, widths))
  return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows])
