"""Annealing ([P] §3.1.3, §3.4.3): the learning rate linearly to 0 over the last steps, on a mix upsampled
toward the sources named as high quality, and the final model the average of the checkpoints kept on the
way (training/averaging.py).

  <root_dir>/start/        the pre-annealing params (params-only: --init_from, or --from_run's latest)
  <root_dir>/run/          the annealing run: one pretraining run, decay="linear" to final_lr=0, every
                           checkpoint kept (keep_period = checkpoint_every); from --from_run it continues
                           that run's train state (optimizer moments, step count), as its tail
  <root_dir>/average/      the average of the annealing run's checkpoints (read by --init_from=orbax:)
  <root_dir>/anneal.json   held-out loss of the start, the last checkpoint and the average
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from llama_jax.errors import ConfigError
from llama_jax.interop import orbax as orbax_params
from llama_jax.training import averaging, checkpoint, continued
from llama_jax.training.pretrain import RunConfig


@dataclasses.dataclass(frozen=True)
class AnnealConfig:
  # The annealing run: steps (the annealing length), batch x seq, peak LR (optim.peak_lr; the LR falls
  # from it linearly to 0), checkpoint_every (each is kept and averaged), data, mesh.
  run: RunConfig
  root_dir: str
  init_from: str | None = None
  from_run: str | None = None
  # Source name (the embedded corpus: "shakespeare", "python"; else the train file's path) -> weight
  # multiplier: the upsampling of the high-quality sources. Unnamed sources keep their weight.
  upsample: tuple[tuple[str, float], ...] = ()
  average_last: int | None = None  # average only the last N checkpoints (None: all kept during annealing)

  def __post_init__(self):
    if any(w < 0 for _, w in self.upsample):
      raise ConfigError(f"--upsample={self.upsample}: multipliers must be >= 0.")


def _weights(cfg: AnnealConfig, data: continued.Data) -> tuple[float, ...]:
  up = dict(cfg.upsample)
  unknown = sorted(set(up) - set(data.names))
  if unknown:
    raise ConfigError(f"--upsample: {unknown} are not sources of this run (it has {list(data.names)}).")
  return tuple(w * up.get(n, 1.0) for n, w in zip(data.names, data.weights))


def annealing_run(template: RunConfig, data: continued.Data, run_dir: str, start: str,
                  from_run: str | None = None) -> RunConfig:
  """`template` as an annealing run of template.steps steps on `data`: the LR from optim.peak_lr linearly
  to 0 at the last step, every checkpoint_every checkpoint kept.

  From a pretraining run (`from_run`) the annealing is that run's tail, as in the paper: it continues the
  latest train state — the AdamW moments and the step count (S) — over steps S+1 .. S+template.steps, the
  LR linear from peak_lr at S (the schedule's "warmup" ends there, unused) to 0. From weights alone
  (`start`, orbax:; --init_from) the moments start at zero and warm up over optim.warmup_steps. Fresh
  moments make the first updates about LR per parameter whatever the gradient: a jolt that costs a
  trained model more than the annealing gives back (measured: held-out 4.3412 -> 4.4818 over 100 steps).
  """
  o = template.optim
  first = 0 if from_run is None else checkpoint.saved_steps(os.path.join(from_run, "checkpoints"))[-1]
  warmup = first if from_run is not None else min(o.warmup_steps, template.steps - 1)
  return dataclasses.replace(
      continued.with_data(template, data), run_dir=run_dir, steps=first + template.steps,
      init_from=None if from_run else start, init_state_from=from_run,
      optim=dataclasses.replace(o, decay="linear", final_lr=0.0, total_steps=first + template.steps,
                                warmup_steps=warmup),
      keep_period=template.checkpoint_every, sample_prompts=())


def anneal(cfg: AnnealConfig) -> dict:
  """Runs (or resumes) the annealing, averages its checkpoints; returns the held-out losses."""
  root = os.path.abspath(cfg.root_dir)
  os.makedirs(root, exist_ok=True)
  data = continued.resolve_data(cfg.run)
  data = dataclasses.replace(data, weights=_weights(cfg, data))
  mesh = continued.make_mesh(cfg.run)
  start = continued.materialize_start(os.path.join(root, "start"), mesh, init_from=cfg.init_from,
                                      from_run=cfg.from_run)
  o = cfg.run.optim
  run = annealing_run(cfg.run, data, os.path.join(root, "run"), start, cfg.from_run)
  print(f"annealing: {cfg.run.steps} steps (to step {run.steps}), LR {o.peak_lr:g} -> 0 linearly, weights "
        f"{dict(zip(data.names, (round(w, 4) for w in data.weights)))}", flush=True)
  continued.run_to_end(run)
  config, sources = averaging.run_sources(run.run_dir)
  sources = sources[-cfg.average_last:] if cfg.average_last else sources
  avg_dir = os.path.join(root, "average")
  if not os.path.exists(os.path.join(avg_dir, orbax_params.CONFIG_FILE)):  # else written before a restart
    shutil.rmtree(avg_dir, ignore_errors=True)  # an average cut short: streamed again from the start
    averaging.write_average(avg_dir, config, sources, mesh, "--root_dir")
  short = dict(batch_size=run.batch_size, seq_len=run.seq_len, batches=run.eval_batches,
               restart_positions=run.restart_positions, cache_dir=os.path.join(run.data_dir, "tokens"))
  losses = {}
  for name, params in (("start", orbax_params.load_params(start.removeprefix("orbax:"), mesh)[1]),
                       ("last", continued.latest_params(run.run_dir, mesh)[1]),
                       ("average", orbax_params.load_params(avg_dir, mesh)[1])):
    losses[name] = continued.heldout_loss(config, params, mesh, data, **short)
  out = {"heldout_loss": losses, "averaged": [s.label for s in sources], "average_dir": avg_dir,
         "weights": dict(zip(data.names, data.weights)), "steps": run.steps}
  continued.write_json(os.path.join(root, "anneal.json"), out)
  print(f"held-out loss: pre-annealing {losses['start']:.4f} | last checkpoint {losses['last']:.4f} | "
        f"average of {len(sources)} checkpoints {losses['average']:.4f} -> {avg_dir}", flush=True)
  return out
