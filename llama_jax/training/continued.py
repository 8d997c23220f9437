"""What the continued-pretraining recipes (long_context.py, annealing.py) share: the data as explicit
files, the starting params as a params-only directory, and the short-context held-out loss.

A continued run is a pretraining run (`pretrain()`) with `init_from=orbax:<params dir>`; `init_from`
needs explicit `train_files` and the tokenizer the weights were trained with, so the embedded corpus is
resolved to its prepared files and tokenizer here (the same files a from-scratch run of the corpus reads).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
from jax.sharding import Mesh

from llama_jax.config import ModelConfig
from llama_jax.data import corpus, pipeline, stream as stream_lib, tokenizers as tokenizer_lib
from llama_jax.errors import ConfigError
from llama_jax.evals import heldout
from llama_jax.interop import init_from as init_from_lib, orbax as orbax_params
from llama_jax.parallel import sharding
from llama_jax.training import averaging, pretrain, step as train
from llama_jax.training.pretrain import RunConfig


@dataclasses.dataclass(frozen=True)
class Data:
  names: tuple[str, ...]  # one per train file: the corpus source name, or the path
  train_files: tuple[str, ...]
  weights: tuple[float, ...]
  eval_files: tuple[str, ...]
  tokenizer: str


def resolve_data(run: RunConfig) -> Data:
  """The run's data as files: its --train_files, or the embedded corpus under --data_dir."""
  if run.train_files:
    weights = run.train_weights or (1.0,) * len(run.train_files)
    return Data(run.train_files, run.train_files, weights, run.eval_files, run.tokenizer)
  c = corpus.prepare(run.data_dir, vocab_size=run.corpus_vocab_size)
  names = tuple(c.train)
  weights = run.train_weights or tuple(c.weights[n] for n in names)
  return Data(names, tuple(c.train[n] for n in names), weights, tuple(c.heldout[n] for n in names),
              c.tokenizer_path)


def with_data(run: RunConfig, data: Data) -> RunConfig:
  return dataclasses.replace(run, train_files=data.train_files, train_weights=data.weights,
                             eval_files=data.eval_files, tokenizer=data.tokenizer)


def make_mesh(run: RunConfig) -> Mesh:
  return sharding.make_mesh(data=run.mesh_data, fsdp=run.mesh_fsdp, context=run.mesh_context,
                            tensor=run.mesh_tensor)


def latest_params(run_dir: str, mesh: Mesh, flag: str = "--from_run") -> tuple[ModelConfig, Any]:
  """The params of a pretraining run's latest checkpoint (the optimizer state stays on disk)."""
  config, sources = averaging.run_sources(run_dir)
  return config, averaging.average_params(config, sources[-1:], mesh, flag)


def materialize_start(out_dir: str, mesh: Mesh, *, init_from: str | None, from_run: str | None) -> str:
  """`out_dir` (params-only) holding the starting weights: `init_from` (hf:/meta:/orbax:) or the latest
  checkpoint of the pretraining run `from_run`. Written once; returns `orbax:<out_dir>`."""
  if (init_from is None) == (from_run is None):
    raise ConfigError("give one of --init_from=hf:|meta:|orbax:PATH or --from_run=<pretraining run_dir>.")
  if not os.path.exists(os.path.join(out_dir, orbax_params.CONFIG_FILE)):
    if from_run is not None:
      config, params = latest_params(from_run, mesh)
    else:
      config, params = init_from_lib.load_pretrained(init_from, mesh)
    orbax_params.save_params(out_dir, params, config)
  return f"orbax:{out_dir}"


def heldout_loss(config: ModelConfig, params: Any, mesh: Mesh, data: Data, *, batch_size: int,
                 seq_len: int, batches: int, restart_positions: bool = True, cache_dir: str | None = None
                 ) -> float:
  """Mean held-out loss per token over the first `batches` [batch_size, seq_len] batches."""
  if not data.eval_files:
    raise ConfigError("--eval_files: the held-out gate needs held-out files.")
  tok = tokenizer_lib.load_tokenizer(data.tokenizer)
  ds = stream_lib.HeldOut.from_sources([pipeline.Source(p) for p in data.eval_files], tok,
                                       batch_size=batch_size, seq_len=seq_len,
                                       restart_positions=restart_positions, cache_dir=cache_dir)
  eval_step = train.make_eval_step(config, mesh)
  loss, _ = heldout.heldout_loss(eval_step, params, ds, lambda b: pretrain.global_batch(b, mesh), batches)
  return loss


def run_to_end(run: RunConfig) -> None:
  """`pretrain(run)`, and a clean stop if it ended before its last step (a preemption saved a checkpoint
  and stopped): what comes next (a stage's gate, the next part, an average) needs the whole run."""
  step = pretrain.pretrain(run)["step"]
  if step != run.steps:
    raise ConfigError(f"{run.run_dir} stopped at step {step} of {run.steps} (preempted?); rerun the same "
                      "command to resume it.")


def write_json(path: str, obj: Any) -> None:
  if jax.process_index() != 0:
    return
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)
