"""The post-training recipe (Llama 3 §4.1): SFT, the reward model and DPO from a pretrained checkpoint.

`post_train(PostTrainConfig)` is what experiments/post_train.py calls. It reads the JSONL data
(data/posttrain.py) in the tokenizer's chat format (data/chat.py), builds the objective's loss
(training/posttrain_losses.py) as a `functools.partial` of its hyperparameters, and then runs exactly the
pretraining machinery: the one train step (training/step.py), the host loop (training/loop.py), the
checkpointer with the data position (exact resume), metrics.jsonl / TensorBoard / the progress line
(training/reporting.py). Nothing here is a second trainer.

  sft     the chat dialogs packed into rows; the pretraining loss on the assistant tokens
  reward  preference pairs; the LM's trunk with a fresh scalar head (params.reward_params_from_lm);
          Bradley–Terry loss; metric `accuracy` = pairs ranked right
  dpo     preference pairs; before each step the reference model (default: the --init_from model, frozen)
          scores the batch (posttrain_losses.score_reference) and its log-probs join the batch as
          `ref_logp`. The reference params are not train state: never checkpointed, reloaded from
          `reference` on resume. Metrics named as TRL's: rewards/chosen, rewards/rejected,
          rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (+ nll_loss, dpo_loss).

A run directory is laid out as pretraining's (checkpoints/, metrics.jsonl, run_config.json,
model_config.json), so `experiments/average.py --run_dir` reads it, and the final params are also saved
params-only in <run_dir>/final for the next round: `--init_from=orbax:<run_dir>/final`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Literal

import jax
from etils import epath
from jax.experimental import multihost_utils

from llama_jax import config as config_lib
from llama_jax.config import ModelConfig
from llama_jax.data import chat, posttrain as data, stream as stream_lib, tokenizers as tokenizer_lib
from llama_jax.errors import ConfigError
from llama_jax.evals import heldout
from llama_jax.interop import init_from, orbax as orbax_lib
from llama_jax.model import params as params_lib
from llama_jax.parallel import batching, sharding
from llama_jax.training import checkpoint, flops, loop, metrics as metrics_lib, posttrain_losses as pl
from llama_jax.training import preemption as preemption_lib, pretrain, reporting, step as train
from llama_jax.training.optim import OptimizerConfig
from llama_jax.training.stages import Stage

Objective = Literal["sft", "dpo", "reward"]
CONFIG_FILE, MODEL_FILE = pretrain.CONFIG_FILE, pretrain.MODEL_FILE
FINAL_DIR = "final"


@dataclasses.dataclass(frozen=True)
class PostTrainConfig:
  """A post-training run. `model` gives only the execution choices (dtypes, remat, attention, max_seq_len);
  the shape comes from the `init_from` checkpoint."""

  objective: Objective
  init_from: str  # hf:/path, meta:/path, gguf:/file.gguf or orbax:/path
  tokenizer: str
  run_dir: str
  sft_files: tuple[str, ...] = ()
  preference_files: tuple[str, ...] = ()
  eval_files: tuple[str, ...] = ()  # held-out files of the objective's kind
  on_bad_line: data.OnBadLine = "fail"
  seq_len: int = 2048
  batch_size: int = 32  # rows (SFT) or pairs (DPO, reward) per optimizer step
  steps: int = 1000
  optim: OptimizerConfig = OptimizerConfig(peak_lr=1e-5, final_lr=1e-6, warmup_steps=0, total_steps=1000)
  model: ModelConfig = ModelConfig()
  # DPO (posttrain_losses.dpo_loss); the paper: beta 0.1, NLL coefficient 0.2.
  beta: float = 0.1
  label_smoothing: float = 0.0
  dpo_variant: pl.DpoVariant = "sigmoid"
  nll_coef: float = 0.2
  reference: str | None = None  # DPO's frozen reference model; None = init_from
  seed: int = 0
  mesh_data: int = 1
  mesh_fsdp: int = -1
  mesh_tensor: int = 1
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  max_bad_steps: int = 10
  allow_config_change: bool = False
  # JAX's persistent compilation cache, as pretraining's: "" = <run_dir>/compilation_cache, "off", or a
  # directory (e.g. one shared by the rounds of a recipe: the same model compiles the same programs).
  compilation_cache_dir: str = ""

  def __post_init__(self):
    if self.objective not in Objective.__args__:
      raise ConfigError(f"--objective={self.objective!r}: choose one of {Objective.__args__}.")
    for f in ("steps", "batch_size", "log_every", "eval_every", "eval_batches", "checkpoint_every",
              "keep_checkpoints", "max_bad_steps"):
      if getattr(self, f) < 1:
        raise ConfigError(f"--{f}={getattr(self, f)}: must be >= 1.")
    if self.seq_len < 2:
      raise ConfigError(f"--seq_len={self.seq_len}: must be >= 2 (inputs and next-token targets).")
    if not self.init_from:
      raise ConfigError("--init_from is required: post-training starts from a pretrained model "
                        "(hf:/path, meta:/path, gguf:/file.gguf or orbax:/path).")
    if not self.tokenizer:
      raise ConfigError("--tokenizer is required: the tokenizer the --init_from weights were trained with.")
    wanted, other = (("sft_files", "preference_files") if self.objective == "sft"
                     else ("preference_files", "sft_files"))
    if not getattr(self, wanted):
      raise ConfigError(f"--objective={self.objective} needs --{wanted} (JSONL).")
    if getattr(self, other):
      raise ConfigError(f"--objective={self.objective} trains on --{wanted}; drop --{other}.")
    if self.reference and self.objective != "dpo":
      raise ConfigError(f"--reference is DPO's reference model; drop it for --objective={self.objective}.")
    # dpo_loss's own checks, here with the flags' names, before any file is read.
    if self.dpo_variant not in pl.DpoVariant.__args__:
      raise ConfigError(f"--dpo_variant={self.dpo_variant!r}: choose one of {pl.DpoVariant.__args__}.")
    if not self.beta > 0:
      raise ConfigError(f"--beta={self.beta}: must be > 0 (the paper's DPO runs use 0.1).")
    if self.label_smoothing and (self.dpo_variant != "sigmoid" or not 0 < self.label_smoothing < 0.5):
      raise ConfigError(f"--label_smoothing={self.label_smoothing}: needs --dpo_variant=sigmoid and "
                        "0 <= --label_smoothing < 0.5.")
    if self.nll_coef < 0:
      raise ConfigError(f"--nll_coef={self.nll_coef}: must be >= 0 (the paper uses 0.2).")


# Settings that may change between a run and its resume without changing what is trained.
# The policy resumes from its checkpoint (init_from no longer matters); DPO's reference is reloaded, so a
# change of `reference` (which post_train sets to init_from when not given) does matter.
_HARMLESS = {"run_dir", "steps", "mesh_data", "mesh_fsdp", "mesh_tensor", "init_from", "log_every",
             "eval_every", "eval_batches", "eval_files", "checkpoint_every", "keep_checkpoints",
             "max_bad_steps", "allow_config_change", "compilation_cache_dir", "optim.grad_accum_steps",
             "model.remat_policy", "model.attention_impl", "model.loss_chunk",
             "model.scan_layers", "model.attention_block_size"}
_FLAG = {"optim.peak_lr": "--lr", "optim.final_lr": "--final_lr", "optim.total_steps": "--steps",
         "optim.warmup_steps": "--warmup_steps", "model.dtype": "--dtype", "dpo_variant": "--dpo_variant"}


def _flag_of(key: str) -> str:
  return _FLAG.get(key, f"--{key}" if "." not in key else f"--config ({key})")


def _model_config(cfg: PostTrainConfig, tok, run_dir: epath.Path, resuming: bool) -> ModelConfig:
  """The model trained: the shape saved when the run started (a resume), else the --init_from
  checkpoint's (head "reward" for the reward model); the run's execution choices."""
  saved = run_dir / MODEL_FILE
  if resuming and saved.exists():
    shape = config_lib.from_dict(json.loads(saved.read_text()))
    return dataclasses.replace(cfg.model, **{f: getattr(shape, f) for f in init_from.SHAPE_FIELDS})
  model_cfg = init_from.adopt_shape(cfg.init_from, cfg.model)
  if cfg.objective == "reward":
    model_cfg = dataclasses.replace(model_cfg, head="reward")
  elif model_cfg.head != "lm":
    raise ConfigError(f"--init_from={cfg.init_from}: holds a reward model (head 'reward'); "
                      f"--objective={cfg.objective} trains a language model: start from one.")
  try:  # every id the tokenizer makes (chat specials included) needs an embedding row
    tokenizer_lib.check_model_vocab(model_cfg.vocab_size, tok)
  except ConfigError as e:
    raise ConfigError(f"--init_from={cfg.init_from} does not cover --tokenizer={cfg.tokenizer}: {e}"
                      ) from None
  return model_cfg


def _initial_params(cfg: PostTrainConfig, model_cfg: ModelConfig, mesh) -> Any:
  """The params a new run starts from: the checkpoint's; for the reward model from an LM, its trunk and
  a fresh scalar head."""
  loaded = init_from.read_config(cfg.init_from)
  if model_cfg.head == "reward" and loaded.head == "lm":
    _, lm = init_from.load_pretrained(cfg.init_from, mesh, expect=dataclasses.replace(model_cfg, head="lm"))
    head_rng = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    return params_lib.reward_params_from_lm(lm, model_cfg, mesh, head_rng)
  return init_from.load_pretrained(cfg.init_from, mesh, expect=model_cfg)[1]


def _tokenizer(path: str):
  tok = tokenizer_lib.load_tokenizer(path)
  return tok.with_chat_tokens() if hasattr(tok, "with_chat_tokens") else tok


def _loss(cfg: PostTrainConfig):
  if cfg.objective == "sft":
    return pl.sft_loss
  if cfg.objective == "reward":
    return pl.reward_loss
  return functools.partial(pl.dpo_loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                           variant=cfg.dpo_variant, nll_coef=cfg.nll_coef)


_PREFERENCE_INPUTS = data.PREFERENCE_FEATURES + ("ref_logp",)


def post_train(cfg: PostTrainConfig) -> dict:
  """Runs (or resumes) post-training; returns {"step", "eval_loss", "final"} (final: the params-only
  directory, written when the run reaches `steps`)."""
  loss_fn = _loss(cfg)
  if cfg.objective == "dpo" and not cfg.reference:  # saved in run_config.json: a resume must use the same
    cfg = dataclasses.replace(cfg, reference=cfg.init_from)
  if not os.path.exists(cfg.tokenizer):
    raise ConfigError(f"--tokenizer: {cfg.tokenizer} does not exist; check the path.")
  tok = _tokenizer(cfg.tokenizer)
  fmt = chat.ChatFormat.for_tokenizer(tok)
  run_dir = epath.Path(cfg.run_dir if "://" in cfg.run_dir else os.path.abspath(cfg.run_dir))
  resuming = bool(checkpoint.saved_steps(str(run_dir / "checkpoints")))
  model_cfg = _model_config(cfg, tok, run_dir, resuming)
  mesh = sharding.make_mesh(data=cfg.mesh_data, fsdp=cfg.mesh_fsdp, tensor=cfg.mesh_tensor)
  sharding.validate(model_cfg, mesh)
  train.check_batch_shape(cfg.batch_size, cfg.seq_len, model_cfg, cfg.optim, mesh)
  flops.peak_flops(mesh.devices.flat[0])  # on CPU measured now, before the input pipeline's workers run

  # The data: every line validated before anything trains.
  rows = batching.local_rows(mesh, cfg.batch_size)
  if cfg.objective == "sft":
    dialogs, _ = data.read_sft(cfg.sft_files, tok, fmt, cfg.seq_len, cfg.on_bad_line)
    stream = data.SFTStream(dialogs, seed=cfg.seed, pad_id=tok.pad_id)
    eval_stream = (data.SFTStream(data.read_sft(cfg.eval_files, tok, fmt, cfg.seq_len, cfg.on_bad_line,
                                                flag="--eval_files")[0], seed=0, pad_id=tok.pad_id)
                   if cfg.eval_files else None)
    to_global = lambda b: batching.global_batch({k: b[k] for k in stream_lib.FEATURES}, mesh)  # noqa: E731
  else:
    pairs, _ = data.read_preferences(cfg.preference_files, tok, fmt, cfg.seq_len, cfg.on_bad_line)
    stream = data.PreferenceStream(pairs, seed=cfg.seed, pad_id=tok.pad_id)
    eval_stream = (data.PreferenceStream(data.read_preferences(
        cfg.eval_files, tok, fmt, cfg.seq_len, cfg.on_bad_line, flag="--eval_files")[0], seed=0,
        pad_id=tok.pad_id) if cfg.eval_files else None)
    keys = _PREFERENCE_INPUTS if cfg.objective == "dpo" else data.PREFERENCE_FEATURES
    to_global = lambda b: batching.global_batch({k: b[k] for k in keys}, mesh)  # noqa: E731

  with pretrain.compilation_cache(cfg.compilation_cache_dir, run_dir):
    ckpt = checkpoint.Checkpointer(str(run_dir / "checkpoints"), save_interval_steps=cfg.checkpoint_every,
                                   max_to_keep=cfg.keep_checkpoints)
    try:  # also on an error: the saves in flight complete
      return _train(cfg, ckpt, model_cfg, mesh, stream, eval_stream, rows, to_global, loss_fn, run_dir)
    finally:
      ckpt.close()


def _train(cfg, ckpt, model_cfg, mesh, stream, eval_stream, rows, to_global, loss_fn, run_dir) -> dict:
  latest = ckpt.latest_step()
  pretrain.check_and_save_config(cfg, model_cfg, run_dir, resuming=latest is not None,
                                 harmless=_HARMLESS, flag_of=_flag_of)
  batches = stream.batches(cfg.batch_size, cfg.seq_len, rows)

  score = None
  if cfg.objective == "dpo":
    # The frozen reference: loaded on every start (a resume too), never part of the checkpoint.
    _, ref_params = init_from.load_pretrained(cfg.reference, mesh, expect=model_cfg)
    ref_score = pl.score_reference(model_cfg, mesh)
    score = lambda b: pl.add_reference_logps(ref_score, ref_params, b, mesh)["ref_logp"]  # noqa: E731
    batches = data.with_ref_logp(batches, score=score)

  if latest is not None:
    state, batches = ckpt.restore(train.abstract_state(model_cfg, cfg.optim, mesh), batches)
    print(f"resumed from {cfg.run_dir} at step {latest}", flush=True)
  else:
    params = _initial_params(cfg, model_cfg, mesh)
    print(f"initialized from {cfg.init_from}", flush=True)
    state = train.create_train_state(model_cfg, cfg.optim, mesh, jax.random.key(cfg.seed), params=params)
  first = int(jax.device_get(state.step))
  log = reporting.Log(run_dir, cfg.steps, first)
  train_step = train.make_train_step(model_cfg, cfg.optim, mesh, loss_fn=loss_fn)

  evaluate = None
  if eval_stream is not None:
    eval_step = train.make_eval_step(model_cfg, mesh, loss_fn=loss_fn,
                                     grad_accum_steps=cfg.optim.grad_accum_steps)
    eval_host = list(eval_stream.in_file_order(cfg.batch_size, cfg.seq_len))[:cfg.eval_batches]
    if score is not None:  # the reference is frozen: its log-probs of the held-out pairs once
      eval_host = [{**b, "ref_logp": score(b)} for b in eval_host]
    eval_batches = [to_global(b) for b in eval_host]
    evaluate = lambda params: (heldout.evaluate(eval_step, params, eval_batches), None)  # noqa: E731

  stages = (Stage(0, cfg.batch_size, cfg.seq_len),)
  n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
  print(f"{cfg.objective}: {n_params:,} params, vocab {model_cfg.vocab_size} | mesh {dict(mesh.shape)} | "
        f"batch {cfg.batch_size}x{cfg.seq_len} | steps {first}→{cfg.steps}", flush=True)
  out = loop.run(
      state=state, first_step=first, steps=cfg.steps, train_step=train_step, data_it=batches, stage=0,
      stages=stages, stage_of=lambda _: 0, train_iterator=lambda _: batches, to_global=to_global,
      new_reader=lambda _: metrics_lib.MetricsReader.for_model(model_cfg, cfg.seq_len, mesh),
      ckpt=ckpt, preemption=preemption_lib.install_preemption_handler(), log=log, log_every=cfg.log_every,
      eval_every=cfg.eval_every, evaluate=evaluate, run_dir=cfg.run_dir, max_bad_steps=cfg.max_bad_steps)
  ckpt.wait_until_finished()
  result = {"step": out.step, "eval_loss": out.eval_loss, "final": None}
  final = run_dir / FINAL_DIR
  if out.step == cfg.steps:
    # A run continued to more steps replaces the shorter run's final; a rerun of a finished run keeps it.
    if out.step > first or not final.exists():
      if final.exists():
        if jax.process_index() == 0:
          final.rmtree()
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices("final params removed")
      orbax_lib.save_params(str(final), out.state.params, model_cfg)
    result["final"] = str(final)
    if jax.process_index() == 0:
      print(f"final params: {final} (--init_from=orbax:{final})", flush=True)
  log.close()
  return result
