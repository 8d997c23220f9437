"""The host loop: dispatch step t, read step t−1, evaluate, checkpoint, stop on preemption, profile.

It dispatches step t before it reads step t−1's metrics (no host sync in the hot path), evaluates on
held-out data every `eval_every` steps, checkpoints every `checkpoint_every` steps, at the last step and
on SIGTERM. What it runs (the state, the step, the data, the checkpointer) is built by the recipe
(training/pretrain.py).

Non-finite steps: the step itself drops an update whose loss or gradient norm is NaN/Inf (metrics
"skipped"); the loop counts them, and stops with an error after `max_bad_steps` in a row. It never saves
while the latest step was skipped, so a diverging run cannot rotate its last good checkpoint out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax

from llama_jax.errors import ConfigError
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
        evaluate: Callable[[Any], tuple[float, Any]] | None, run_dir: str,
        max_bad_steps: int, profile: StepProfile | None = None) -> LoopResult:
  """Trains from `first_step` to `steps` (or to a preemption); returns where it stopped.

  `stage_of(steps_done)` is the stage the next step runs in; `train_iterator(i)` and `new_reader(i)`
  make stage i's data iterator and metrics reader; `to_global` turns this process's rows into the
  step's global arrays; `evaluate(params)` gives (held-out loss, counts of the tokens scored);
  `profile` traces its steps (the caller closes it, also on an error).
  """
  reader = new_reader(stage)
  bad = _BadSteps(max_bad_steps, ckpt)

  def record(out):  # a fetched step's metrics: log them, count a skipped step
    if out is not None:
      log.write(*out, log_every)
      bad.add(*out)

  step, eval_loss, counts = first_step, None, None
  while step < steps:
    if stage_of(step) != stage:  # a new batch/sequence stage: new rows, one more compiled shape
      record(reader.flush())
      stage = stage_of(step)
      data_it = train_iterator(stage)
      reader = new_reader(stage)
      print(f"stage {stage}: batch {stages[stage].batch_size} x seq {stages[stage].seq_len} from step "
            f"{step + 1}", flush=True)
    batch = next(data_it)
    if profile is not None:
      profile.before(step + 1, state)
    state, metrics = train_step(state, to_global(batch))
    step += 1
    # `batch` is the global [B, T] batch: tokens/s counts each row once, whatever the process count.
    record(reader.read(step, metrics, metrics_lib.batch_tokens(batch)))
    if profile is not None:  # after step t−1's fetch, so the wait for step t counts as step t's time
      profile.after(step, (state, metrics))
    stop = preemption.reached(step)
    if stop:  # the state is finite even mid-streak (the step kept the old params): save to resume
      ckpt.save(step, state, data_it, force=True)
      print(f"preempted: saved step {step} to {run_dir}; rerun the same command to resume", flush=True)
      break
    if ckpt.should_save(step) or step == steps:  # the last step is always saved
      record(reader.flush())  # this step's metrics decide whether it may be saved
      if bad.in_a_row:
        # Conservative even at the last step: the params are finite (skipped updates), but they may be
        # the ones that give non-finite losses; keep the older checkpoints instead of rotating them out.
        print(f"step {step}: not saved (the last {bad.in_a_row} steps were non-finite); the last "
              f"checkpoint is step {ckpt.latest_step()}", flush=True)
      else:
        ckpt.save(step, state, data_it, force=True)
    if evaluate is not None and (step % eval_every == 0 or step == steps):
      record(reader.flush())
      eval_loss, counts = evaluate(state.params)
      log.write(step, {"eval_loss": eval_loss}, log_every)
  record(reader.flush())
  return LoopResult(state, step, eval_loss, counts)


class StepProfile:
  """A jax.profiler trace of steps `first..last` (as logged, both included) into `log_dir`.

  Every process traces its own devices; with several processes each writes its own subdirectory
  (process_<i>), since the trace files are named by host and processes may share one.
  """

  def __init__(self, steps: tuple[int, int] | None, log_dir: str):
    self.steps = steps
    self.log_dir = log_dir if jax.process_count() == 1 else f"{log_dir}/process_{jax.process_index()}"
    self.active = False

  def before(self, step: int, state: Any) -> None:
    """Call before dispatching `step`: starts the trace at the range's first step (or, resumed inside
    the range, at the first step this run makes)."""
    if self.steps is None or self.active or not self.steps[0] <= step <= self.steps[1]:
      return
    jax.block_until_ready(state)  # the steps before the range finish outside the trace
    jax.profiler.start_trace(self.log_dir)
    self.active = True
    if jax.process_index() == 0:
      print(f"profiling steps {step}-{self.steps[1]} into {self.log_dir}", flush=True)

  def after(self, step: int, outputs: Any) -> None:
    """Call after dispatching `step`: at the range's last step, waits for its outputs, then stops."""
    if self.active and step >= self.steps[1]:
      self.close(outputs)

  def close(self, outputs: Any = None) -> None:
    if not self.active:
      return
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active = False
    if jax.process_index() == 0:
      print(f"profile written to {self.log_dir}: TensorBoard's Profile tab, with that as its logdir",
            flush=True)

  def __enter__(self) -> "StepProfile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()  # a preemption or an error inside the range: keep what was traced


class _BadSteps:
  """Counts skipped (non-finite) steps; raises after `limit` in a row."""

  def __init__(self, limit: int, ckpt: checkpoint.Checkpointer):
    self.limit, self.ckpt = limit, ckpt
    self.in_a_row = self.total = 0

  def add(self, step: int, metrics: dict) -> None:
    if not metrics.get("skipped"):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    print(f"step {step}: non-finite loss {metrics['loss']} / grad norm {metrics['grad_norm']}: update "
          f"skipped ({self.in_a_row} in a row, {self.total} in all)", flush=True)
    if self.in_a_row >= self.limit:
      raise ConfigError(
          f"step {step}: {self.in_a_row} non-finite steps in a row (--max_bad_steps={self.limit}); the "
          f"params are those of step {step - self.in_a_row}, the last checkpoint is step "
          f"{self.ckpt.latest_step()}. Lower --lr or check the data, then rerun to resume from it.")
