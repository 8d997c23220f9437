"""The pretraining recipe: data sources, mesh, stages, the train state (new or resumed), then the loop.

`pretrain(RunConfig)` is what the entry points call. It resumes from the latest checkpoint in `run_dir`
— params, optimizer, step, RNG and the data iterator — so a resumed run sees exactly the batches it would
have seen; the host loop itself is training/loop.py, what it reports training/reporting.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from llama_jax import config as config_lib
from llama_jax.config import ModelConfig
from llama_jax.data import corpus, pipeline as data, stream as stream_lib
from llama_jax.data import tokenizers as tokenizer_lib
from llama_jax.errors import ConfigError
from llama_jax.evals import heldout
from llama_jax.inference import generate
from llama_jax.interop import init_from
from llama_jax.parallel import batching, context, sharding
from llama_jax.training import checkpoint, flops, loop, metrics as metrics_lib, preemption as preemption_lib
from llama_jax.training import reporting, step as train
from llama_jax.training.optim import OptimizerConfig
from llama_jax.training.stages import Stage, stage_start_steps


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
  mesh_context: int = 1
  mesh_tensor: int = 1
  # Start a new run from existing weights (continued pretraining, later stages): hf:/path, meta:/path or
  # orbax:/path. The checkpoint fixes the model's shape; a resume continues from its own checkpoint.
  init_from: str | None = None
  # Or start a new run from the whole train state of another run's latest checkpoint — params, AdamW
  # moments and step count S — with this run's optimizer schedule, data and steps (`steps` is the last
  # step, > S; the schedule is read at S+1, S+2, ...): a run's annealing tail (annealing.py), a stage's
  # second part (long_context.py). The data stream starts fresh.
  init_state_from: str | None = None
  log_every: int = 25
  eval_every: int = 250
  eval_batches: int = 8
  checkpoint_every: int = 250  # the last step (and a preemption's) is saved too
  keep_checkpoints: int = 2
  keep_period: int | None = None  # also keep every checkpoint whose step is a multiple of this
  max_bad_steps: int = 10  # non-finite steps in a row (each skipped) before the run stops
  allow_config_change: bool = False  # resume even if the trajectory-changing settings differ
  # Data: the embedded corpus under data_dir, unless train_files are given (then tokenizer too).
  data_dir: str = "data_cache"
  corpus_vocab_size: int = 4096
  train_files: tuple[str, ...] = ()
  train_weights: tuple[float, ...] = ()
  eval_files: tuple[str, ...] = ()
  tokenizer: str | None = None
  text_field: str = "text"  # the field of a JSONL line that holds the document
  restart_positions: bool = True
  sample_prompts: tuple[str, ...] = ("ROMEO.", "def ")
  sample_tokens: int = 64
  # A jax.profiler trace of steps FIRST..LAST (as the log numbers them, both included) in
  # <run_dir>/profile, for TensorBoard's profile tab; None = no trace.
  profile_steps: tuple[int, int] | None = None
  # JAX's persistent compilation cache: "" = <run_dir>/compilation_cache (a restart compiles nothing),
  # "off" = none, else this directory (e.g. one shared by several runs of the same model).
  compilation_cache_dir: str = ""

  def __post_init__(self):
    for f in ("steps", "batch_size", "log_every", "eval_every", "eval_batches", "checkpoint_every",
              "keep_checkpoints", "max_bad_steps", "sample_tokens"):
      if getattr(self, f) < 1:
        raise ConfigError(f"--{f}={getattr(self, f)}: must be >= 1.")
    if self.keep_period is not None and self.keep_period < 1:
      raise ConfigError(f"--keep_period={self.keep_period}: must be >= 1 (or unset).")
    if self.profile_steps is not None:
      first, last = self.profile_steps
      if not 1 <= first <= last <= self.steps:
        raise ConfigError(f"--profile_steps={first},{last}: give FIRST,LAST with 1 <= FIRST <= LAST <= "
                          f"--steps={self.steps}.")
    if self.seq_len < 2:
      raise ConfigError(f"--seq_len={self.seq_len}: must be >= 2 (inputs and next-token targets).")
    if self.train_files and not self.tokenizer:
      raise ConfigError("--train_files needs --tokenizer (a sentencepiece .model or Meta's tokenizer.model).")
    if self.tokenizer and not self.train_files:
      raise ConfigError(f"--tokenizer needs --train_files (the embedded corpus under --data_dir brings its "
                        f"own tokenizer); give --train_files too, or drop --tokenizer={self.tokenizer}.")
    if self.init_from and self.init_state_from:
      raise ConfigError(f"--init_from={self.init_from} and --init_state_from={self.init_state_from}: give "
                        "one (weights only, or a run's whole train state).")
    if self.init_state_from and not self.train_files:
      raise ConfigError(f"--init_state_from={self.init_state_from} needs --train_files and --tokenizer (the "
                        "tokenizer the run was trained with; the embedded corpus trains its own).")
    if self.init_from and not self.train_files:
      raise ConfigError(f"--init_from={self.init_from} needs --train_files and --tokenizer (the tokenizer the "
                        "weights were trained with; the embedded corpus trains its own).")
    if self.train_weights and len(self.train_weights) != len(self.train_files):
      raise ConfigError(f"--train_weights has {len(self.train_weights)} values for "
                        f"{len(self.train_files)} --train_files; give one weight per file.")


# Settings that may change between a run and its resume: they do not change what is trained (`steps`
# is the run's length; the schedule's length is optim.total_steps, compared). Everything else does.
_HARMLESS = {"run_dir", "steps", "mesh_data", "mesh_fsdp", "mesh_context", "mesh_tensor", "init_from",
             "init_state_from", "log_every", "eval_every",
             "eval_batches", "eval_files", "checkpoint_every", "keep_checkpoints", "keep_period",
             "max_bad_steps", "allow_config_change", "data_dir", "sample_prompts", "sample_tokens",
             "profile_steps", "compilation_cache_dir",
             # The same math, other memory/compute trade-offs:
             "optim.grad_accum_steps", "model.remat_policy", "model.attention_impl", "model.loss_chunk",
             "model.scan_layers", "model.attention_block_size"}
# The flag that sets a field, where it is not --<field>.
_FLAG = {"optim.peak_lr": "--lr", "optim.final_lr": "--final_lr", "optim.total_steps": "--steps",
         "optim.warmup_steps": "--warmup_steps", "model.dtype": "--dtype"}
_TOP_LEVEL_FLAGS = {"batch_size", "seq_len", "seed", "stages", "train_files", "train_weights", "tokenizer",
                    "restart_positions", "corpus_vocab_size", "text_field"}
CONFIG_FILE = "run_config.json"
MODEL_FILE = "model_config.json"  # the model the run trains, with its shape as it started


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k in ("model", "optim"):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _as_json(cfg: Any) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as read back


def _flag_of(key: str) -> str:
  return _FLAG.get(key) or (f"--{key}" if key in _TOP_LEVEL_FLAGS else f"--config ({key})")


def config_differences(saved: dict, now: dict, harmless: frozenset | set = frozenset(_HARMLESS),
                       flag_of: Callable[[str], str] = _flag_of) -> list[str]:
  """`--flag: saved X, now Y` for each trajectory-changing setting that differs (not in `harmless`)."""
  a, b = _flat(saved), _flat(now)
  return [f"{flag_of(key)}: saved {a.get(key)}, now {b.get(key)}" for key in sorted(set(a) | set(b))
          if key not in harmless and a.get(key) != b.get(key)]


def check_and_save_config(cfg: Any, model_cfg: ModelConfig, run_dir: epath.Path, resuming: bool,
                          harmless: frozenset | set = frozenset(_HARMLESS),
                          flag_of: Callable[[str], str] = _flag_of) -> None:
  """On resume, compare `cfg` (a run config with run_dir and allow_config_change: pretraining's, or
  post-training's with its own `harmless` and `flag_of`) with the one saved beside the checkpoints; then
  (process 0) save it and the model it trains (`model_config.json`: its shape may come from the tokenizer
  or --init_from)."""
  path = run_dir / CONFIG_FILE
  now = _as_json(cfg)
  if resuming and path.exists():
    diffs = config_differences(json.loads(path.read_text()), now, harmless, flag_of)
    if diffs and not cfg.allow_config_change:
      raise ConfigError(f"--run_dir={cfg.run_dir} holds a run with other settings: {'; '.join(diffs)}. "
                        "Rerun with the saved values, or pass --allow_config_change to continue anyway.")
    if diffs:
      print(f"config changed on resume (--allow_config_change): {'; '.join(diffs)}", flush=True)
  if jax.process_count() > 1:  # every process has read the saved config before process 0 replaces it
    multihost_utils.sync_global_devices("run_config.json read")
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, json.dumps(now, indent=2))
    _write_atomically(run_dir / MODEL_FILE, json.dumps(dataclasses.asdict(model_cfg), indent=2))


def _write_atomically(path: epath.Path, text: str) -> None:
  # A kill mid-write must not leave a truncated file that the next resume cannot read.
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


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
    train_src = [data.Source(p, weight=w, field=run.text_field) for p, w in zip(run.train_files, weights)]
    eval_src = [data.Source(p, field=run.text_field) for p in run.eval_files]
    return train_src, eval_src, tok
  c = corpus.prepare(run.data_dir, vocab_size=run.corpus_vocab_size)
  train_src = [data.Source(c.train[name], weight=c.weights[name]) for name in c.train]
  eval_src = [data.Source(c.heldout[name]) for name in c.heldout]
  return train_src, eval_src, c.tokenizer()


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """A global [B, T] host batch → one global array per model input, split over (data, fsdp); each
  process reads only the rows its devices hold (`batching.local_rows`).

  `source_id` (which source filled a row) stays on the host: the step does not read it. With
  --mesh_context > 1 the rows go into the context-parallel layout (parallel/context.py), `row_index` added."""
  features = context.context_batch({k: batch[k] for k in stream_lib.FEATURES}, mesh.shape["context"])
  return batching.global_batch(features, mesh)


def _model_config(run: RunConfig, tok, run_dir: epath.Path, resuming: bool) -> ModelConfig:
  """The model this run trains.

  A new run: the config's model with the tokenizer's vocabulary, or the shape of the `--init_from`
  weights. A resumed run: the shape saved beside its checkpoints when it started (`model_config.json`),
  whatever `--init_from` says now (the checkpoint holds the weights; the source may be gone).
  """
  saved_shape = lambda d: dataclasses.replace(run.model, **{
      f: getattr(config_lib.from_dict(json.loads((d / MODEL_FILE).read_text())), f)
      for f in init_from.SHAPE_FIELDS})
  if resuming and (run_dir / MODEL_FILE).exists():
    return saved_shape(run_dir)
  if run.init_state_from:  # the run's state decides the shape
    model_cfg = saved_shape(_state_dir(run.init_state_from))
    if tok.vocab_size > model_cfg.vocab_size:
      raise ConfigError(f"--init_state_from={run.init_state_from}: its vocabulary has "
                        f"{model_cfg.vocab_size} entries, the tokenizer {tok.vocab_size}; use the run's "
                        "tokenizer.")
    return model_cfg
  if run.init_from:
    # The weights decide the model's shape; the tokenizer must fit their embedding table.
    model_cfg = init_from.adopt_shape(run.init_from, run.model)
    if tok.vocab_size > model_cfg.vocab_size:
      raise ConfigError(f"--init_from={run.init_from}: its vocabulary has {model_cfg.vocab_size} entries, "
                        f"the tokenizer {tok.vocab_size}; use the tokenizer the weights were trained with.")
    return model_cfg
  if run.model.vocab_size != tok.vocab_size:
    # Pretraining starts from scratch: the embedding table takes the tokenizer's size.
    print(f"vocab_size {run.model.vocab_size} -> {tok.vocab_size} (the tokenizer's)", flush=True)
    return dataclasses.replace(run.model, vocab_size=tok.vocab_size)
  return run.model


def _run_path(run_dir: str) -> epath.Path:
  # Local (made absolute: Orbax needs it) or a remote URL such as gs://; Orbax and the logs write there.
  return epath.Path(run_dir if "://" in run_dir else os.path.abspath(run_dir))


def _state_dir(run_dir: str) -> epath.Path:
  """The run directory of --init_state_from, checked: it holds a run's config and a checkpoint."""
  d = _run_path(run_dir)
  if not (d / MODEL_FILE).exists() or not checkpoint.saved_steps(str(d / "checkpoints")):
    raise ConfigError(f"--init_state_from={run_dir}: not a pretraining run directory with a checkpoint "
                      f"({MODEL_FILE} and checkpoints/<step>); give the run_dir of a run that saved one.")
  return d


def _restore_state_of(run_dir: str, model_cfg: ModelConfig, opt_cfg: OptimizerConfig, mesh) -> Any:
  """The train state of `run_dir`'s latest checkpoint on this run's mesh (the data position stays)."""
  src = checkpoint.Checkpointer(str(_state_dir(run_dir) / "checkpoints"), read_only=True)
  try:
    return src.restore(train.abstract_state(model_cfg, opt_cfg, mesh))[0]
  finally:
    src.close()


_CACHE_OPTIONS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                  "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def compilation_cache(setting: str, run_dir: epath.Path):
  """JAX's persistent compilation cache in <run_dir>/compilation_cache (or `setting`'s directory, or
  none for "off") while the run runs; JAX's own settings come back afterwards.

  Every program is cached, however small or quick to compile (JAX's defaults skip those under 1 s),
  so a restarted run finds its train step, and its small programs, there. Only process 0 writes
  entries (JAX's rule); every process reads them. JAX opens its cache once per process: it is reset
  to open the new directory, and again on the way out.
  """
  path = None if setting == "off" else setting or str(run_dir / "compilation_cache")
  before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}

  def apply(values):
    for name, value in zip(_CACHE_OPTIONS, values):
      jax.config.update(name, value)
    jax_cache.reset_cache()

  apply((path is not None, path, 0.0, -1))  # -1: no minimum entry size, and JAX may not raise it
  try:
    yield path
  finally:
    apply(before.values())


def pretrain(run: RunConfig) -> dict:
  """Runs (or resumes) pretraining; returns the final metrics."""
  train_src, eval_src, tok = _sources(run)
  run_dir = _run_path(run.run_dir)
  with compilation_cache(run.compilation_cache_dir, run_dir):
    return _pretrain(run, train_src, eval_src, tok, run_dir)


def _pretrain(run, train_src, eval_src, tok, run_dir) -> dict:
  # Every check runs before the checkpoint manager (and its threads) starts: bad input stops cleanly.
  resuming = bool(checkpoint.saved_steps(str(run_dir / "checkpoints")))
  model_cfg = _model_config(run, tok, run_dir, resuming=resuming)
  mesh = sharding.make_mesh(data=run.mesh_data, fsdp=run.mesh_fsdp, context=run.mesh_context,
                            tensor=run.mesh_tensor)
  sharding.validate(model_cfg, mesh)
  flops.peak_flops(mesh.devices.flat[0])  # on CPU measured now, before the input pipeline's workers run
  stages = run.stages or (Stage(0, run.batch_size, run.seq_len),)
  starts = stage_start_steps(stages)
  for st in stages:  # every stage's shapes are checked before anything is trained
    train.check_batch_shape(st.batch_size, st.seq_len, model_cfg, run.optim, mesh)
  train.check_batch_shape(run.batch_size, run.seq_len, model_cfg, run.optim, mesh)
  stage_of = lambda steps_done: max(i for i, s in enumerate(starts) if s <= steps_done)
  if run.init_state_from and not resuming:
    start = checkpoint.saved_steps(str(_state_dir(run.init_state_from) / "checkpoints"))[-1]
    if start >= run.steps:
      raise ConfigError(f"--steps={run.steps}: the state of --init_state_from={run.init_state_from} is at "
                        f"step {start} and steps count on from there; give more than {start}.")
  cache = os.path.join(run.data_dir, "tokens")  # local: tokenized documents, keyed by file content

  # One global stream for the whole run (llama_jax/data/stream.py): every stage continues it where the
  # previous one stopped, and each process fills only the rows of the batch shards its devices hold.
  train_stream = stream_lib.TrainStream.from_sources(train_src, tok, seed=run.seed,
                                                     restart_positions=run.restart_positions, cache_dir=cache)

  def train_iterator(i: int):
    return train_stream.batches(stages[i].batch_size, stages[i].seq_len,
                                batching.local_rows(mesh, stages[i].batch_size))

  # Every process packs the whole (small) held-out set into global batches and feeds its own rows, so
  # the held-out loss is the same whatever the number of processes (and a 1-document source works).
  eval_ds = (stream_lib.HeldOut.from_sources(eval_src, tok, batch_size=run.batch_size, seq_len=run.seq_len,
                                             restart_positions=run.restart_positions, cache_dir=cache)
             if eval_src else None)
  ckpt = checkpoint.Checkpointer(str(run_dir / "checkpoints"), save_interval_steps=run.checkpoint_every,
                                 max_to_keep=run.keep_checkpoints, keep_period=run.keep_period)
  try:  # also on an error: the saves in flight (the last good checkpoint) complete
    return _train(run, ckpt, model_cfg, mesh, stages, stage_of, train_iterator, eval_ds, tok, run_dir)
  finally:
    ckpt.close()


def _reporting_compile(train_step, model_cfg: ModelConfig, mesh, log: reporting.Log, first: int):
  """The train step, compiled ahead of time at its first call so that the compiled program's FLOPs and
  memory are reported (`reporting.compiled_stats`): one line and one metrics.jsonl record at step
  `first`. jit keeps the executable that `lower(...).compile()` built: the step compiles once."""
  jitted = getattr(train_step, "jitted", None)
  if jitted is None:  # a wrapped step (tests): nothing to lower
    return train_step
  reported = False

  def step(state, batch):
    nonlocal reported
    if not reported:
      reported = True
      events = []
      listener = lambda event, **_: events.append(event)
      jax.monitoring.register_event_listener(listener)
      start = time.perf_counter()
      try:
        with sharding.use(mesh, sharding.logical_rules(model_cfg, mesh)):  # as the step traces itself
          compiled = jitted.lower(state, batch).compile()
      finally:
        jax.monitoring.unregister_event_listener(listener)
      stats = reporting.compiled_stats(compiled, mesh.size)
      b, t = batch["inputs"].shape
      stats.update(compile_s=time.perf_counter() - start,
                   model_flops=flops.flops_per_token(model_cfg, t) * b * t)
      if "/jax/compilation_cache/compile_requests_use_cache" in events:
        stats["compile_cache_hit"] = float("/jax/compilation_cache/cache_hits" in events)
      note = "; XLA counts the scanned layer loop once" if model_cfg.scan_layers else ""
      log.compiled(first, stats, note)
    return train_step(state, batch)

  return step


def _train(run, ckpt, model_cfg, mesh, stages, stage_of, train_iterator, eval_ds, tok, run_dir) -> dict:
  nproc, pid = jax.process_count(), jax.process_index()
  latest = ckpt.latest_step()
  check_and_save_config(run, model_cfg, run_dir, resuming=latest is not None)
  if latest is not None:
    # One stream for every stage: the stage only fixes the row shape the restored position continues in.
    stage = stage_of(max(latest - 1, 0))
    state, data_it = ckpt.restore(train.abstract_state(model_cfg, run.optim, mesh), train_iterator(stage))
    print(f"resumed from {run.run_dir} at step {latest}", flush=True)
  elif run.init_state_from:
    state = _restore_state_of(run.init_state_from, model_cfg, run.optim, mesh)
    start = int(jax.device_get(state.step))
    stage = stage_of(start)
    data_it = train_iterator(stage)
    print(f"initialized from the train state of {run.init_state_from} at step {start} (params, optimizer "
          "moments); data from the start of the stream", flush=True)
  else:
    stage = 0
    data_it = train_iterator(stage)
    params = None
    if run.init_from:
      _, params = init_from.load_pretrained(run.init_from, mesh, expect=model_cfg)
      print(f"initialized from {run.init_from}", flush=True)
    state = train.create_train_state(model_cfg, run.optim, mesh, jax.random.key(run.seed), params=params)
  first = int(jax.device_get(state.step))  # the one sync before the loop
  log = reporting.Log(run_dir, run.steps, first)
  train_step = _reporting_compile(train.make_train_step(model_cfg, run.optim, mesh), model_cfg, mesh,
                                  log, first)
  to_global = lambda batch: global_batch(batch, mesh)
  evaluate = None
  if eval_ds is not None:
    eval_step = train.make_eval_step(model_cfg, mesh, grad_accum_steps=run.optim.grad_accum_steps)
    eval_batches, eval_counts = heldout.prepare(eval_ds, to_global, run.eval_batches)
    evaluate = lambda params: (heldout.evaluate(eval_step, params, eval_batches), eval_counts)
  n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
  print(f"model: {n_params:,} params, vocab {model_cfg.vocab_size} | mesh {dict(mesh.shape)} | "
        f"batch {stages[stage].batch_size}x{stages[stage].seq_len} | steps {first}→{run.steps}", flush=True)

  with loop.StepProfile(run.profile_steps, str(run_dir / "profile")) as profile:
    out = loop.run(
        state=state, first_step=first, steps=run.steps, train_step=train_step, data_it=data_it,
        stage=stage, stages=stages, stage_of=stage_of, train_iterator=train_iterator, to_global=to_global,
        new_reader=lambda i: metrics_lib.MetricsReader.for_model(model_cfg, stages[i].seq_len, mesh),
        ckpt=ckpt, preemption=preemption_lib.install_preemption_handler(), log=log,
        log_every=run.log_every, eval_every=run.eval_every, evaluate=evaluate, run_dir=run.run_dir,
        max_bad_steps=run.max_bad_steps, profile=profile)
  state, step, eval_loss, counts = out.state, out.step, out.eval_loss, out.token_counts
  ckpt.wait_until_finished()

  result = {"step": step, "eval_loss": eval_loss}
  if step == run.steps and pid == 0:
    if counts is not None:
      result["unigram_entropy"] = reporting.unigram_entropy(counts)
      print(f"held-out loss {eval_loss:.4f} nats/token vs unigram entropy of the same tokens "
            f"{result['unigram_entropy']:.4f} nats/token", flush=True)
    reporting.plot_losses(log.history, run_dir / "loss.png")
    print(f"loss curves: {run_dir / 'loss.png'}", flush=True)
    if run.sample_prompts and nproc == 1:
      _print_samples(run, model_cfg, state.params, tok, mesh)
  log.close()
  return result


# The closing samples. Greedy decoding of a small, briefly trained model falls into loops ("ROMEO." then
# blank lines, "0x0x0x..."): the argmax of a flat distribution feeds itself. Nucleus sampling (Holtzman et
# al. 2019) draws from the smallest set holding 90% of the probability, which drops the long tail of
# junk tokens such a model still spreads mass over; a temperature of 0.8 sharpens what is left a little,
# for text that reads as what the model learned rather than noise. The seed is the run's, so a rerun
# prints the same samples. The greedy line stays: deterministic, comparable from run to run.
SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 0.8, 0.9


def _print_samples(run: RunConfig, model_cfg: ModelConfig, params, tok, mesh) -> None:
  prompts = [tok.encode(p, bos=True) for p in run.sample_prompts]
  if mesh.shape["context"] > 1:  # generation splits no sequence: one device, as before the cache
    params, mesh = jax.device_get(params), None
  settings = {f"top_p {SAMPLE_TOP_P}, temperature {SAMPLE_TEMPERATURE}, seed {run.seed}": dict(
      temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, rng=jax.random.key(run.seed)), "greedy": {}}
  outs = {name: generate.generate(model_cfg, params, prompts, run.sample_tokens, stop_ids=(tok.eos_id,),
                                  mesh=mesh, **kw) for name, kw in settings.items()}
  for i, p in enumerate(run.sample_prompts):
    for name in settings:
      text = (p + tok.decode(outs[name][i])).replace("\n", "\n    | ")
      print(f"sample ({name}, {run.sample_tokens} tokens):\n    | {text}", flush=True)
