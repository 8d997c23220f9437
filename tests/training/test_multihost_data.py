"""Multi-host data: processes that share batch shards feed the same rows, and a run resumes on another
process count with the same global stream.

Four launches of the pretraining runner (tests/training/_multihost_pretrain_worker.py) on a (1, 4, 2)
mesh of 8 CPU devices, 12 steps, checkpoints at 6 and 12:
  A  1 process  x 8 devices                                 the reference
  B  2 processes x 4 devices, every tensor pair across the two processes
  C  A's step-6 checkpoint resumed on 2 processes (1 -> 2)
  D  B's step-6 checkpoint resumed on 1 process   (2 -> 1)
All four must give A's losses: the same rows in every step, whatever the process layout.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from llama_jax.data import tokenizers as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "training", "_multihost_pretrain_worker.py")
STEPS, SAVED = 12, 6
# The same program on another split of devices over processes: gloo may add the cross-process
# reductions in another order, a few fp32 ulps (tests/training/test_multihost_train.py uses the same).
LOSS_RTOL = 1e-6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(num_processes: int, run_dir: str, text, timeout_s: float = 300) -> str:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "LLAMA_JAX_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(num_processes), str(port), run_dir,
                             str(STEPS), text["train"], text["tokenizer"]],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
           for i in range(num_processes)]
  deadline, logs = time.monotonic() + timeout_s, []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, (_, err)) in enumerate(zip(procs, logs)):
    err = "\n".join(l for l in err.splitlines() if not l.startswith("[Gloo]"))
    assert p.returncode == 0, f"{num_processes}-process run, process {i} (rc={p.returncode}):\n{err[-3000:]}"
  return logs[0][0]


def _losses(run_dir: str) -> dict[int, float]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _resume_copy(src_run: str, dst_run: str, step: int) -> None:
  """A run directory holding only `src_run`'s checkpoint `step` (and its metrics up to it)."""
  os.makedirs(os.path.join(dst_run, "checkpoints"))
  shutil.copytree(os.path.join(src_run, "checkpoints", str(step)),
                  os.path.join(dst_run, "checkpoints", str(step)))
  shutil.copy(os.path.join(src_run, "metrics.jsonl"), os.path.join(dst_run, "metrics.jsonl"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
  d = tmp_path_factory.mktemp("text")
  stdlib = sysconfig.get_paths()["stdlib"]
  files = sorted(f for f in os.listdir(stdlib) if f.endswith(".py"))[:40]
  docs = [open(os.path.join(stdlib, f), encoding="utf-8", errors="replace").read() for f in files]
  with open(d / "train.jsonl", "w") as f:
    for t in docs:
      f.write(json.dumps({"text": t}) + "\n")
  with open(d / "spm_input.txt", "w") as f:
    f.write("\n".join(docs))
  tokenizer_lib.train_sentencepiece([str(d / "spm_input.txt")], str(d / "tok"), 512)
  return {"train": str(d / "train.jsonl"), "tokenizer": str(d / "tok.model")}


@pytest.fixture(scope="module")
def runs(text, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("runs")
  a, b, c, d = (str(tmp / x) for x in "ABCD")
  out = {"A": _launch(1, a, text), "B": _launch(2, b, text)}
  _resume_copy(a, c, SAVED)
  out["C"] = _launch(2, c, text)
  _resume_copy(b, d, SAVED)
  out["D"] = _launch(1, d, text)
  return {k: (_losses(v), out[k]) for k, v in zip("ABCD", (a, b, c, d))}


def test_tensor_pair_across_processes_trains_like_one_process(runs):
  (ref, _), (two, out) = runs["A"], runs["B"]
  assert "tensor pairs: [[0, 1], [0, 1], [0, 1], [0, 1]]" in out  # every pair spans both processes
  assert sorted(ref) == sorted(two) == list(range(1, STEPS + 1))
  steps = sorted(ref)
  print(f"\n1x8 losses: {[ref[s] for s in steps]}\n2x4 losses: {[two[s] for s in steps]}")
  np.testing.assert_allclose([two[s] for s in steps], [ref[s] for s in steps], rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("run", ["C", "D"], ids=["1-to-2-processes", "2-to-1-process"])
def test_resume_on_another_process_count_continues_the_stream(runs, run):
  ref, _ = runs["A"]
  resumed, out = runs[run]
  assert f"at step {SAVED}" in out
  steps = list(range(SAVED + 1, STEPS + 1))
  assert sorted(resumed) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in steps], [ref[s] for s in steps], rtol=LOSS_RTOL, atol=0)
