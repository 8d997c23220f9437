"""Preemption: SIGTERM sets the flag the loop checks."""

import os
import signal

from llama_jax.training import preemption as preemption_lib


def test_sigterm_sets_the_preemption_flag():
  """SIGTERM no longer kills the process: it sets the flag the run loop checks after each step (the
  save-and-stop itself is tested end to end in tests/training/test_pretrain.py)."""
  previous = signal.getsignal(signal.SIGTERM)
  try:
    preemption = preemption_lib.install_preemption_handler()
    assert not preemption.reached(0)
    os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice: the process keeps running
    assert preemption.reached(0)
  finally:
    signal.signal(signal.SIGTERM, previous)
