"""Staged long-context extension ([P] §3.4.2): from a pretrained model through a list of stages of growing
sequence length, each a pretraining run, each closed by a gate.

  <root_dir>/start/                   the starting params (params-only: --init_from, or --from_run's latest)
  <root_dir>/baseline.json            short-context held-out loss of the start (the gate's reference)
  <root_dir>/stage_<i>_<T>/start/     the previous stage's params, with this stage's RoPE in its config
  <root_dir>/stage_<i>_<T>/run/       the stage's pretraining run (checkpoints, metrics, loss.png); with
                                      short_docs_steps, its first part is in run_short_docs/
  <root_dir>/stage_<i>_<T>/final/     the params at the stage's last step (params-only)
  <root_dir>/stage_<i>_<T>/gate.json  needle-in-a-haystack at T and the short-context held-out loss vs the
                                      baseline: passed or failed, never silently; needle.{json,png} beside it
  <root_dir>/gates.json               every stage's gate, in order

Long rows come from long documents: the packer concatenates documents and cuts rows out of them, so a
row of a document longer than the row (a Shakespeare work: ~30K tokens) is one segment with positions
0..T-1; the stage's `long_row_fraction` in gate.json says how many rows were filled by one segment. A
stated share of synthetic retrieval documents (data/retrieval.py, about 2T tokens each) is one more
source with its token share. A rerun of the same command continues: finished stages are skipped, a stage
in flight resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal

import numpy as np

from llama_jax.data import retrieval, stream as stream_lib, tokenizers as tokenizer_lib
from llama_jax.data import pipeline
from llama_jax.errors import ConfigError
from llama_jax.evals import needle
from llama_jax.interop import orbax as orbax_params
from llama_jax.training import checkpoint, continued
from llama_jax.training.pretrain import RunConfig


@dataclasses.dataclass(frozen=True)
class ExtensionStage:
  seq_len: int
  steps: int
  batch_size: int
  rope_theta: float | None = None  # None: keep the previous stage's
  rope_factor: float | None = None  # RopeScaling.factor; None: keep
  peak_lr: float | None = None  # None: the template run's
  # A curriculum within the stage: its first `short_docs_steps` steps draw retrieval documents an eighth
  # to half a row long (most lie whole in a row, questions near their facts: a small model learns to copy
  # there), the rest a quarter to a whole row (the needle's distances). One LR schedule spans the stage;
  # the switch continues the train state (RunConfig.init_state_from).
  short_docs_steps: int = 0


@dataclasses.dataclass(frozen=True)
class Gate:
  needle_min: float = 0.9  # log-prob retrieval accuracy at the stage's length
  heldout_max_rise: float = 0.02  # short-context held-out loss at most (1 + this) x the baseline's
  needle_trials: int = 4
  needle_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  needle_batch: int = 8
  eval_batches: int = 8


@dataclasses.dataclass(frozen=True)
class ExtensionConfig:
  # The template of every stage's run: model execution choices, optimizer, data, mesh, logging. Its
  # batch_size x seq_len is the short context of the held-out gate (the pretraining shape).
  run: RunConfig
  root_dir: str
  stages: tuple[ExtensionStage, ...]
  init_from: str | None = None  # hf:|meta:|orbax:PATH
  from_run: str | None = None  # or a pretraining run_dir: its latest checkpoint
  retrieval_weight: float = 0.0  # token share of synthetic retrieval documents in each stage's mix
  retrieval_docs: int = 2000
  # "facts": facts planted in training text and asked back (the needle's form, other subjects);
  # "kv": key-value lists (data/retrieval.py).
  retrieval_format: Literal["facts", "kv"] = "kv"
  gate: Gate = Gate()
  stop_on_gate_failure: bool = False

  def __post_init__(self):
    if not self.stages:
      raise ConfigError("ExtensionConfig.stages: give at least one stage.")
    for s in self.stages:
      if s.seq_len > self.run.model.max_seq_len:
        raise ConfigError(f"stage seq_len={s.seq_len} exceeds ModelConfig.max_seq_len="
                          f"{self.run.model.max_seq_len}; raise max_seq_len in the config.")
      if s.steps < 1 or s.batch_size < 1:
        raise ConfigError(f"stage {s}: steps and batch_size must be >= 1.")
      if not 0 <= s.short_docs_steps < s.steps:
        raise ConfigError(f"stage seq_len={s.seq_len}: short_docs_steps={s.short_docs_steps} must be in "
                          f"[0, steps={s.steps}).")
    if self.retrieval_format not in ("facts", "kv"):
      raise ConfigError(f"--retrieval_format={self.retrieval_format}: use facts or kv.")
    if not 0 <= self.retrieval_weight < 1:
      raise ConfigError(f"--retrieval_weight={self.retrieval_weight}: a token share in [0, 1).")


class GateFailure(Exception):
  """A stage failed its gate and --stop_on_gate_failure was given."""


def _stage_run(cfg: ExtensionConfig, i: int, st: ExtensionStage, data: continued.Data, start: str,
               run_dir: str, short_docs: bool = False) -> RunConfig:
  """Stage i's pretraining run from `start` (orbax:); `short_docs`: its first part (short_docs_steps)."""
  files, weights = data.train_files, data.weights
  if cfg.retrieval_weight > 0:
    tok = tokenizer_lib.load_tokenizer(data.tokenizer)
    facts = cfg.retrieval_format == "facts"
    # Fact documents of a quarter to a whole row (facts and questions included): questions at every
    # distance up to the row length, as the needle asks; packing cuts rows out of concatenated documents,
    # so a document of length L lies whole in one row about 1 - L/T of the time. Short: half that.
    size = (st.seq_len if facts else 2 * st.seq_len) // (2 if short_docs else 1)
    path = os.path.join(cfg.root_dir, f"retrieval_{cfg.retrieval_format}_{size}tok_{cfg.retrieval_docs}docs_"
                        f"seed{cfg.run.seed}.jsonl")
    filler = [d for f in files for d in pipeline.read_documents(f)] if facts else None
    retrieval.write_source(path, tok, tokens_per_doc=size, num_docs=cfg.retrieval_docs, seed=cfg.run.seed,
                           filler=filler)
    # The corpus keeps its own proportions; the retrieval source takes retrieval_weight of the tokens.
    share = cfg.retrieval_weight / (1 - cfg.retrieval_weight) * sum(weights)
    files, weights = files + (path,), weights + (share,)
  o = cfg.run.optim
  optim = dataclasses.replace(o, total_steps=st.steps, warmup_steps=min(o.warmup_steps, st.steps // 10),
                              peak_lr=st.peak_lr or o.peak_lr, final_lr=min(o.final_lr, st.peak_lr or o.peak_lr))
  return dataclasses.replace(
      cfg.run, run_dir=run_dir, steps=st.short_docs_steps if short_docs else st.steps,
      batch_size=st.batch_size, seq_len=st.seq_len, stages=(),
      init_from=start, train_files=files, train_weights=weights, eval_files=data.eval_files,
      tokenizer=data.tokenizer, optim=optim, eval_every=max(st.steps, 1),
      checkpoint_every=min(cfg.run.checkpoint_every, st.steps), sample_prompts=())


def _long_row_fraction(data: continued.Data, st: ExtensionStage, seed: int, cache: str,
                       rows: int = 64) -> float:
  """Fraction of the corpus rows (no retrieval source) at this length that are one document segment."""
  tok = tokenizer_lib.load_tokenizer(data.tokenizer)
  s = stream_lib.TrainStream([pipeline.documents(pipeline.Source(p), tok, cache) for p in data.train_files],
                             data.weights, seed=seed, pad_id=tok.pad_id)
  b = s.next_batch(rows, st.seq_len)
  return float(np.mean(b["segment_ids"].max(axis=1) == 1))


def extend(cfg: ExtensionConfig) -> list[dict]:
  """Runs the stages (continuing a previous invocation); returns each stage's gate result."""
  root = os.path.abspath(cfg.root_dir)
  cfg = dataclasses.replace(cfg, root_dir=root)
  os.makedirs(root, exist_ok=True)
  data = continued.resolve_data(cfg.run)
  mesh = continued.make_mesh(cfg.run)
  cache = os.path.join(cfg.run.data_dir, "tokens")
  prev = continued.materialize_start(os.path.join(root, "start"), mesh, init_from=cfg.init_from,
                                     from_run=cfg.from_run).removeprefix("orbax:")
  short = dict(batch_size=cfg.run.batch_size, seq_len=cfg.run.seq_len, batches=cfg.gate.eval_batches,
               restart_positions=cfg.run.restart_positions, cache_dir=cache)
  base_file = os.path.join(root, "baseline.json")
  if os.path.exists(base_file):
    baseline = json.load(open(base_file))
  else:
    config, params = orbax_params.load_params(prev, mesh)
    baseline = {"heldout_loss": continued.heldout_loss(config, params, mesh, data, **short), **short}
    continued.write_json(base_file, baseline)
  print(f"baseline: short-context ({cfg.run.batch_size}x{cfg.run.seq_len}) held-out loss "
        f"{baseline['heldout_loss']:.4f}", flush=True)
  texts = needle.load_texts(data.eval_files)
  tok = tokenizer_lib.load_tokenizer(data.tokenizer)
  results = []
  for i, st in enumerate(cfg.stages):
    sdir = os.path.join(root, f"stage_{i}_{st.seq_len}")
    start, final = os.path.join(sdir, "start"), os.path.join(sdir, "final")
    if not os.path.exists(os.path.join(final, orbax_params.CONFIG_FILE)):
      if not os.path.exists(os.path.join(start, orbax_params.CONFIG_FILE)):
        config, params = orbax_params.load_params(prev, mesh)
        rope = config.rope_scaling
        if st.rope_factor is not None:
          if rope is None:
            raise ConfigError(f"stage {i}: rope_factor={st.rope_factor} but the model has no RoPE scaling.")
          rope = dataclasses.replace(rope, factor=st.rope_factor)
        config = dataclasses.replace(config, rope_scaling=rope, rope_theta=st.rope_theta or config.rope_theta)
        orbax_params.save_params(start, params, config)  # params do not depend on RoPE; the config does
      print(f"=== stage {i}: seq {st.seq_len}, batch {st.batch_size}, {st.steps} steps ===", flush=True)
      run = _stage_run(cfg, i, st, data, f"orbax:{start}", os.path.join(sdir, "run"))
      if st.short_docs_steps:
        first = _stage_run(cfg, i, st, data, f"orbax:{start}", os.path.join(sdir, "run_short_docs"), True)
        if not checkpoint.saved_steps(os.path.join(run.run_dir, "checkpoints")):  # else done before
          print(f"--- steps 1-{first.steps}: retrieval documents of at most half a row", flush=True)
          continued.run_to_end(first)
          print(f"--- steps {first.steps + 1}-{run.steps}: retrieval documents up to a whole row", flush=True)
        # The second part's stream starts afresh: another seed, so its corpus rows are not the first
        # part's again (the seed orders the data; the train state, and its RNG, come from the first part).
        run = dataclasses.replace(run, init_from=None, init_state_from=first.run_dir, seed=run.seed + 1)
      continued.run_to_end(run)
      config, params = continued.latest_params(os.path.join(sdir, "run"), mesh)
      orbax_params.save_params(final, params, config)
    gate_file = os.path.join(sdir, "gate.json")
    if os.path.exists(gate_file):
      gate = json.load(open(gate_file))
    else:
      config, params = orbax_params.load_params(final, mesh)
      ncfg = needle.NeedleConfig(lengths=(st.seq_len,), depths=cfg.gate.needle_depths,
                                 trials=cfg.gate.needle_trials, batch_size=cfg.gate.needle_batch,
                                 seed=cfg.run.seed)
      res = needle.evaluate_model(config, params, mesh, tok, texts, ncfg)
      needle.write_results(res, sdir)
      loss = continued.heldout_loss(config, params, mesh, data, **short)
      rise = loss / baseline["heldout_loss"] - 1
      acc = res["overall"]["logprob"]
      gate = {"stage": i, "seq_len": st.seq_len, "steps": st.steps, "batch_size": st.batch_size,
              "rope_theta": config.rope_theta,
              "rope_factor": config.rope_scaling.factor if config.rope_scaling else None,
              "needle_logprob": acc, "needle_greedy": res["overall"].get("greedy"),
              "needle_min": cfg.gate.needle_min, "heldout_loss": loss,
              "baseline_heldout_loss": baseline["heldout_loss"], "heldout_rise": rise,
              "heldout_max_rise": cfg.gate.heldout_max_rise,
              "long_row_fraction": _long_row_fraction(data, st, cfg.run.seed, cache),
              "passed": bool(acc >= cfg.gate.needle_min and rise <= cfg.gate.heldout_max_rise)}
      continued.write_json(gate_file, gate)
    results.append(gate)
    continued.write_json(os.path.join(root, "gates.json"), results)
    verdict = "PASSED" if gate["passed"] else "FAILED"
    print(f"gate stage {i} (seq {st.seq_len}): {verdict} | needle log-prob {100 * gate['needle_logprob']:.0f}% "
          f"(need {100 * cfg.gate.needle_min:.0f}%), greedy {100 * (gate['needle_greedy'] or 0):.0f}% | "
          f"short held-out {gate['heldout_loss']:.4f} vs {gate['baseline_heldout_loss']:.4f} "
          f"({100 * gate['heldout_rise']:+.2f}%, allowed {100 * cfg.gate.heldout_max_rise:+.2f}%) | "
          f"{gate_file}", flush=True)
    if not gate["passed"] and cfg.stop_on_gate_failure:
      raise GateFailure(f"stage {i} (seq {st.seq_len}) failed its gate ({gate_file}); stopped by "
                        "--stop_on_gate_failure. Lengthen the stage or raise --retrieval_weight, then rerun.")
    prev = final
  return results
