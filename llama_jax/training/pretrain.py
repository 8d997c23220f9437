"""The pretraining run: data → sharded train step → Orbax, with progress, evaluation and resume.

`pretrain(RunConfig)` is the host loop the entry points call. It dispatches step t before it reads step
t−1's metrics (no host sync in the hot path), evaluates on held-out data every `eval_every` steps,
checkpoints every `checkpoint_every` steps and on SIGTERM, and resumes from the latest checkpoint in
`run_dir` — params, optimizer, step, RNG and the data iterator — so a resumed run sees exactly the batches
it would have seen.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath

from llama_jax.training import checkpoint, step as train
from llama_jax.data import corpus, pipeline as data, stream as stream_lib
from llama_jax.inference import sample
from llama_jax.parallel import batching, sharding
from llama_jax.data import tokenizers as tokenizer_lib
from llama_jax.errors import ConfigError
from llama_jax.config import ModelConfig
from llama_jax.training.optim import OptimizerConfig, Stage, stage_start_steps


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a pretraining run needs besides the model and optimizer shapes."""

  model: ModelConfig
  optim: OptimizerConfig
  run_dir: str
  steps: int
  batch_size: int  # global rows per optimizer step
  seq_len: int
  # The paper's batch-size/sequence-length schedule; () = one stage of batch_size x seq_len.
  stages: tuple[Stage, ...] = ()
  seed: int = 0
  mesh_data: int = 1
  mesh_fsdp: int = -1
  mesh_tensor: int = 1
  log_every: int = 25
  eval_every: int = 250
  eval_batches: int = 8
  checkpoint_every: int = 250
  keep_checkpoints: int = 2
  # Data: the embedded corpus under data_dir, unless train_files are given (then tokenizer too).
  data_dir: str = "data_cache"
  corpus_vocab_size: int = 4096
  train_files: tuple[str, ...] = ()
  train_weights: tuple[float, ...] = ()
  eval_files: tuple[str, ...] = ()
  tokenizer: str | None = None
  restart_positions: bool = True
  sample_prompts: tuple[str, ...] = ("ROMEO.", "def ")
  sample_tokens: int = 64

  def __post_init__(self):
    for f in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, f) < 1:
        raise ConfigError(f"--{f}={getattr(self, f)}: must be >= 1.")
    if self.seq_len < 2:
      raise ConfigError(f"--seq_len={self.seq_len}: must be >= 2 (inputs and next-token targets).")
    if self.train_files and not self.tokenizer:
      raise ConfigError("--train_files needs --tokenizer (a sentencepiece .model or Meta's tokenizer.model).")
    if self.train_weights and len(self.train_weights) != len(self.train_files):
      raise ConfigError(f"--train_weights has {len(self.train_weights)} values for "
                        f"{len(self.train_files)} --train_files; give one weight per file.")


def _sources(run: RunConfig) -> tuple[list[data.Source], list[data.Source], Any]:
  """(train sources, held-out sources, tokenizer)."""
  if run.train_files:
    for path in run.train_files + run.eval_files + (run.tokenizer,):
      if not os.path.exists(path):
        flag = "--tokenizer" if path == run.tokenizer else (
            "--train_files" if path in run.train_files else "--eval_files")
        raise ConfigError(f"{flag}: {path} does not exist; check the path.")
    tok = tokenizer_lib.load_tokenizer(run.tokenizer)
    weights = run.train_weights or (1.0,) * len(run.train_files)
    train_src = [data.Source(p, weight=w) for p, w in zip(run.train_files, weights)]
    eval_src = [data.Source(p) for p in run.eval_files]
    return train_src, eval_src, tok
  c = corpus.prepare(run.data_dir, vocab_size=run.corpus_vocab_size)
  train_src = [data.Source(c.train[name], weight=c.weights[name]) for name in c.train]
  eval_src = [data.Source(c.heldout[name]) for name in c.heldout]
  return train_src, eval_src, c.tokenizer()


def _global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """A global [B, T] host batch → one global array per model input, split over (data, fsdp); each
  process reads only the rows its devices hold (`batching.local_rows`).

  `source_id` (which source filled a row) stays on the host: the step does not read it."""
  return batching.global_batch({k: batch[k] for k in data.FEATURES}, mesh)


def unigram_entropy(token_counts: np.ndarray) -> float:
  """Entropy (nats) of the empirical unigram distribution: the loss of the best context-free model."""
  p = token_counts[token_counts > 0] / token_counts.sum()
  return float(-(p * np.log(p)).sum())


class _Log:
  """metrics.jsonl (every step), TensorBoard events and the progress line; process 0 writes."""

  def __init__(self, run_dir: epath.Path, total_steps: int, first_step: int):
    self.enabled = jax.process_index() == 0
    self.total, self.first = total_steps, first_step
    self.start = time.perf_counter()
    self.history: list[dict] = []
    self._tb = None
    if self.enabled:
      run_dir.mkdir(parents=True, exist_ok=True)
      path = run_dir / "metrics.jsonl"
      if path.exists():  # keep what a previous run logged up to the step we resume from
        with path.open() as f:
          self.history = [r for r in map(json.loads, f) if r["step"] <= first_step]
      self._file = path.open("w")
      for r in self.history:
        self._file.write(json.dumps(r) + "\n")
      try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional at import time)
        self._tb = SummaryWriter(str(run_dir / "tb"))
      except ImportError:
        logging.warning("tensorboardX not installed: no TensorBoard events")

  def write(self, step: int, metrics: dict, log_every: int):
    if not self.enabled:
      return
    record = {"step": step, **metrics}
    self.history.append(record)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)
    if "eval_loss" in metrics:
      print(f"step {step:6d} | held-out loss {metrics['eval_loss']:.4f}", flush=True)
    elif step % log_every == 0 or step == self.total:
      elapsed = time.perf_counter() - self.start
      eta = elapsed / max(step - self.first, 1) * (self.total - step)
      tps = metrics.get("tokens_per_s", float("nan"))
      mfu = metrics.get("mfu", float("nan"))
      print(f"step {step:6d}/{self.total} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"{tps:9.0f} tok/s | MFU {100 * mfu:5.2f}% | ETA {_duration(eta)}", flush=True)

  def close(self):
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _duration(s: float) -> str:
  s = int(s)
  return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _evaluate(eval_step, params, eval_ds, mesh, max_batches: int) -> tuple[float, np.ndarray]:
  """Held-out loss over the first `max_batches` batches, and the counts of the tokens it scored."""
  batches = list(itertools.islice(eval_ds, max_batches))  # global batches, the same on every process
  loss = train.evaluate(eval_step, params, [_global_batch(b, mesh) for b in batches])
  return loss, np.bincount(np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches]))


def plot_losses(history: Sequence[dict], path: epath.Path) -> None:
  import matplotlib  # noqa: PLC0415 (only the end of a run needs it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  train_pts = [(r["step"], r["loss"]) for r in history if "loss" in r]
  eval_pts = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train_pts:
    ax.plot(*zip(*train_pts), label="train loss", lw=1)
  if eval_pts:
    ax.plot(*zip(*eval_pts), "o-", label="held-out loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def pretrain(run: RunConfig) -> dict:
  """Runs (or resumes) pretraining; returns the final metrics."""
  train_src, eval_src, tok = _sources(run)
  model_cfg = run.model
  if model_cfg.vocab_size != tok.vocab_size:
    # Pretraining starts from scratch: the embedding table takes the tokenizer's size.
    print(f"vocab_size {model_cfg.vocab_size} -> {tok.vocab_size} (the tokenizer's)", flush=True)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)
  mesh = sharding.make_mesh(data=run.mesh_data, fsdp=run.mesh_fsdp, tensor=run.mesh_tensor)
  sharding.validate(model_cfg, mesh)
  stages = run.stages or (Stage(0, run.batch_size, run.seq_len),)
  starts = stage_start_steps(stages)
  for st in stages:  # every stage's shapes are checked before anything is trained
    train.check_batch_shape(st.batch_size, st.seq_len, model_cfg, run.optim, mesh)
  train.check_batch_shape(run.batch_size, run.seq_len, model_cfg, run.optim, mesh)
  stage_of = lambda steps_done: max(i for i, s in enumerate(starts) if s <= steps_done)
  nproc, pid = jax.process_count(), jax.process_index()

  # Local (made absolute: Orbax needs it) or a remote URL such as gs://; Orbax and the logs write there.
  run_dir = epath.Path(run.run_dir if "://" in run.run_dir else os.path.abspath(run.run_dir))
  cache = os.path.join(run.data_dir, "tokens")  # local: tokenized documents, keyed by file content

  # One global stream for the whole run (llama_jax/data/stream.py): every stage continues it where the
  # previous one stopped, and each process fills only the rows of the batch shards its devices hold.
  train_stream = stream_lib.TrainStream(
      [data.documents(s, tok, cache, "--train_files") for s in train_src], [s.weight for s in train_src],
      seed=run.seed, pad_id=tok.pad_id, restart_positions=run.restart_positions)

  def train_iterator(i: int):
    return train_stream.batches(stages[i].batch_size, stages[i].seq_len,
                                batching.local_rows(mesh, stages[i].batch_size))

  # Every process packs the whole (small) held-out set into global batches and feeds its own rows, so
  # the held-out loss is the same whatever the number of processes (and a 1-document source works).
  eval_ds = (data.eval_dataset(eval_src, tok, seq_len=run.seq_len, batch_size=run.batch_size,
                               restart_positions=run.restart_positions, cache_dir=cache)
             if eval_src else None)
  ckpt = checkpoint.Checkpointer(str(run_dir / "checkpoints"),
                                 save_interval_steps=run.checkpoint_every, max_to_keep=run.keep_checkpoints)
  if (latest := ckpt.latest_step()) is not None:
    # The saved iterator is the one of the stage that ran the checkpoint's last step.
    stage = stage_of(max(latest - 1, 0))
    state, data_it = ckpt.restore(train.abstract_state(model_cfg, run.optim, mesh), train_iterator(stage))
    print(f"resumed from {run.run_dir} at step {latest}", flush=True)
  else:
    stage = 0
    data_it = train_iterator(stage)
    state = train.create_train_state(model_cfg, run.optim, mesh, jax.random.key(run.seed))
  first = int(jax.device_get(state.step))  # the one sync before the loop
  train_step = train.make_train_step(model_cfg, run.optim, mesh)
  eval_step = train.make_eval_step(model_cfg, mesh) if eval_ds is not None else None
  reader = train.MetricsReader.for_model(model_cfg, stages[stage].seq_len, mesh)
  preemption = checkpoint.install_preemption_handler()
  log = _Log(run_dir, run.steps, first)
  n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
  print(f"model: {n_params:,} params, vocab {model_cfg.vocab_size} | mesh {dict(mesh.shape)} | "
        f"batch {stages[stage].batch_size}x{stages[stage].seq_len} | steps {first}→{run.steps}", flush=True)

  step, eval_loss, counts = first, None, None
  while step < run.steps:
    if stage_of(step) != stage:  # a new batch/sequence stage: new rows, one more compiled shape
      if (out := reader.flush()) is not None:
        log.write(*out, run.log_every)
      stage = stage_of(step)
      data_it = train_iterator(stage)
      reader = train.MetricsReader.for_model(model_cfg, stages[stage].seq_len, mesh)
      print(f"stage {stage}: batch {stages[stage].batch_size} x seq {stages[stage].seq_len} from step "
            f"{step + 1}", flush=True)
    batch = next(data_it)
    state, metrics = train_step(state, _global_batch(batch, mesh))
    step += 1
    # `batch` is the global [B, T] batch: tokens/s counts each row once, whatever the process count.
    if (out := reader.read(step, metrics, train.batch_tokens(batch))) is not None:
      log.write(*out, run.log_every)
    stop = preemption.reached(step)
    if stop or ckpt.should_save(step):
      ckpt.save(step, state, data_it, force=stop)
    if stop:
      print(f"preempted: saved step {step} to {run.run_dir}; rerun the same command to resume", flush=True)
      break
    if eval_step is not None and (step % run.eval_every == 0 or step == run.steps):
      if (out := reader.flush()) is not None:
        log.write(*out, run.log_every)
      eval_loss, counts = _evaluate(eval_step, state.params, eval_ds, mesh, run.eval_batches)
      log.write(step, {"eval_loss": eval_loss}, run.log_every)
  if (out := reader.flush()) is not None:
    log.write(*out, run.log_every)
  ckpt.wait_until_finished()
  ckpt.close()

  result = {"step": step, "eval_loss": eval_loss}
  if step == run.steps and pid == 0:
    if counts is not None:
      result["unigram_entropy"] = unigram_entropy(counts)
      print(f"held-out loss {eval_loss:.4f} nats/token vs unigram entropy of the same tokens "
            f"{result['unigram_entropy']:.4f} nats/token", flush=True)
    plot_losses(log.history, run_dir / "loss.png")
    print(f"loss curves: {run_dir / 'loss.png'}", flush=True)
    if run.sample_prompts and nproc == 1:
      prompts = [tok.encode(p, bos=True) for p in run.sample_prompts]
      outs = sample.generate(model_cfg, jax.device_get(state.params), prompts, run.sample_tokens,
                             stop_id=tok.eos_id)
      for p, o in zip(run.sample_prompts, outs):
        text = (p + tok.decode(o)).replace("\n", "\n    | ")
        print(f"sample (greedy, {run.sample_tokens} tokens):\n    | {text}", flush=True)
  log.close()
  return result
