"""What a run reports: metrics.jsonl, TensorBoard events and the progress line; the loss plot; the
unigram entropy the held-out loss is compared with. Process 0 writes."""

from __future__ import annotations

import json
import logging
import time
from typing import Sequence

import jax
import numpy as np
from etils import epath


def unigram_entropy(token_counts: np.ndarray) -> float:
  """Entropy (nats) of the empirical unigram distribution: the loss of the best context-free model."""
  p = token_counts[token_counts > 0] / token_counts.sum()
  return float(-(p * np.log(p)).sum())


class Log:
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
