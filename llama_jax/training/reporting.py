"""What a run reports: metrics.jsonl, TensorBoard events and the progress line; the compiled train step's
FLOPs and memory; the loss plot; the unigram entropy the held-out loss is compared with. Process 0
writes."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath


def unigram_entropy(token_counts: np.ndarray) -> float:
  """Entropy (nats) of the empirical unigram distribution: the loss of the best context-free model."""
  p = token_counts[token_counts > 0] / token_counts.sum()
  return float(-(p * np.log(p)).sum())


def compiled_stats(compiled: Any, n_devices: int) -> dict[str, float]:
  """XLA's count of a compiled step: FLOPs on all devices, and bytes per device.

  The program XLA compiles is one device's share, so its FLOPs are multiplied by the device count. XLA
  counts the body of a loop once, whatever its trip count: a scanned layer stack (scan_layers=True)
  shows one layer's FLOPs, not L. peak_bytes = arguments + outputs not aliased to a donated argument +
  temporaries + generated code: what the step needs resident on one device.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
  out = {"compiled_flops": float((cost or {}).get("flops", math.nan)) * n_devices}
  mem = compiled.memory_analysis()
  if mem is not None:
    out.update(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
               alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
               generated_code_bytes=mem.generated_code_size_in_bytes)
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                         + out["temp_bytes"] + out["generated_code_bytes"])
  return {k: float(v) for k, v in out.items()}


def _bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return ""


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

  def compiled(self, step: int, stats: dict, note: str = ""):
    """One line and one metrics.jsonl record for the compiled train step (`compiled_stats` plus
    compile_s, compile_cache_hit and model_flops)."""
    if not self.enabled:
      return
    record = {"step": step, **stats}
    self.history.append(record)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    hit = {1.0: " (from the compilation cache)", 0.0: " (not in the compilation cache)"}.get(
        stats.get("compile_cache_hit"), "")
    line = (f"train step compiled in {stats['compile_s']:.1f} s{hit} | {stats['compiled_flops']:.2e} FLOPs "
            f"per step (XLA; {stats['compiled_flops'] / stats['model_flops']:.2f}x the model's "
            f"{stats['model_flops']:.2e}{note})")
    if "peak_bytes" in stats:
      line += (f" | per device: arguments {_bytes(stats['argument_bytes'])}, outputs "
               f"{_bytes(stats['output_bytes'])} ({_bytes(stats['alias_bytes'])} reusing donated inputs), "
               f"temporaries {_bytes(stats['temp_bytes'])}, code {_bytes(stats['generated_code_bytes'])}, "
               f"peak {_bytes(stats['peak_bytes'])}")
    print(line, flush=True)

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
