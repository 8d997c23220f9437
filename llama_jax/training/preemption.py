"""Preemption: SIGTERM (or JAX's preemption service on several hosts) asks the loop to save and stop."""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
  """Set when the scheduler asks the job to stop (SIGTERM); the loop saves and exits at `reached`."""

  def __init__(self):
    self._event = threading.Event()

  def set(self) -> None:
    self._event.set()

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`. Call it at every step, on every host.

    On several hosts, JAX's preemption service agrees on one step for all (each host's own flag could
    trip at different steps, and a save that not every host joins hangs).
    """
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # preemption service disabled: fall back to this host's flag
        pass
    return self._event.is_set()


def install_preemption_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Preemption:
  """A `Preemption` whose flag SIGTERM sets (instead of killing the process).

  With several processes the handler is not installed: JAX's preemption service (started by
  jax.distributed.initialize) owns SIGTERM there, and `Preemption.reached` asks it.
  """
  preemption = Preemption()
  if jax.process_count() > 1:
    return preemption

  def handler(signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint and stopping after this step", signum)
    preemption.set()

  for s in signals:
    signal.signal(s, handler)
  return preemption
