"""The host loop: dispatch step t, read step t−1, evaluate, checkpoint, stop on preemption.

It dispatches step t before it reads step t−1's metrics (no host sync in the hot path), evaluates on
held-out data every `eval_every` steps, checkpoints every `checkpoint_every` steps and on SIGTERM. What it
runs (the state, the step, the data, the checkpointer) is built by the recipe (training/pretrain.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

from llama_jax.training import checkpoint, metrics as metrics_lib, preemption as preemption_lib, reporting
from llama_jax.training.stages import Stage


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  eval_loss: float | None
  token_counts: Any  # of the held-out tokens last scored (None without held-out data)


def run(*, state: Any, first_step: int, steps: int, train_step: Callable, data_it: Iterator,
        stage: int, stages: Sequence[Stage], stage_of: Callable[[int], int],
        train_iterator: Callable[[int], Iterator], to_global: Callable[[dict], dict],
        new_reader: Callable[[int], metrics_lib.MetricsReader], ckpt: checkpoint.Checkpointer,
        preemption: preemption_lib.Preemption, log: reporting.Log, log_every: int, eval_every: int,
        evaluate: Callable[[Any], tuple[float, Any]] | None, nproc: int, run_dir: str) -> LoopResult:
  """Trains from `first_step` to `steps` (or to a preemption); returns where it stopped.

  `stage_of(steps_done)` is the stage the next step runs in; `train_iterator(i)` and `new_reader(i)`
  make stage i's data iterator and metrics reader; `to_global` turns this process's rows into the
  step's global arrays; `evaluate(params)` gives (held-out loss, counts of the tokens scored).
  """
  reader = new_reader(stage)
  step, eval_loss, counts = first_step, None, None
  while step < steps:
    if stage_of(step) != stage:  # a new batch/sequence stage: new rows, one more compiled shape
      if (out := reader.flush()) is not None:
        log.write(*out, log_every)
      stage = stage_of(step)
      data_it = train_iterator(stage)
      reader = new_reader(stage)
      print(f"stage {stage}: batch {stages[stage].batch_size} x seq {stages[stage].seq_len} from step "
            f"{step + 1}", flush=True)
    batch = next(data_it)
    state, metrics = train_step(state, to_global(batch))
    step += 1
    if (out := reader.read(step, metrics, metrics_lib.batch_tokens(batch) * nproc)) is not None:
      log.write(*out, log_every)
    stop = preemption.reached(step)
    if stop or ckpt.should_save(step):
      ckpt.save(step, state, data_it, force=stop)
    if stop:
      print(f"preempted: saved step {step} to {run_dir}; rerun the same command to resume", flush=True)
      break
    if evaluate is not None and (step % eval_every == 0 or step == steps):
      if (out := reader.flush()) is not None:
        log.write(*out, log_every)
      eval_loss, counts = evaluate(state.params)
      log.write(step, {"eval_loss": eval_loss}, log_every)
  if (out := reader.flush()) is not None:
    log.write(*out, log_every)
  return LoopResult(state, step, eval_loss, counts)
