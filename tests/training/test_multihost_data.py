"""Multi-host data: processes that share batch shards feed the same rows, a process that holds a strict
subset of the rows feeds exactly those, and a run resumes on another process count with the same global
stream.

Five launches of the pretraining runner (tests/training/_multihost_pretrain_worker.py) on 8 CPU devices,
checkpoints at 6 and 12:
  A  1 process  x 8 devices, (1, 4, 1, 2) mesh, 12 steps      the reference
  B  2 processes x 4 devices, every tensor pair across the two processes (both hold every row), 12 steps
  C  A's step-6 checkpoint resumed on 2 processes (1 -> 2), as B
  D  B's step-6 checkpoint resumed on 1 process   (2 -> 1), as A
  E  2 processes x 4 devices, the plain (1, 8, 1, 1) mesh: each process holds half the rows, 3 steps
Each process records, per step and global row, the sha256 of the bytes its devices were fed for that row
(all five features, read back from the device shards). Rows are compared exactly: the global stream does
not depend on the mesh or the process count, so every run must feed A's bytes at every (step, row).
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
STEPS, SAVED, SUBSET_STEPS, BATCH = 12, 6, 3, 8
# Only for a loss computed from identical params on identical rows (the row hashes are asserted equal):
# the same program on another split of devices over processes, where XLA and gloo add the fp32 partial
# sums (matmuls, the cross-entropy mean over 8x64 tokens) in another order: a few fp32 ulps of each sum,
# ~1e-7 relative here (tests/training/test_multihost_train.py uses the same). Losses after optimizer steps
# on such runs are NOT compared: Adam turns that noise into param differences of up to lr x (a sign flip)
# per coordinate (tests/training/_adam_bound.py), so no fixed loss rtol follows from the math.
LOSS_RTOL = 1e-6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(num_processes: int, run_dir: str, text, steps: int = STEPS, layout: str = "crossing",
            timeout_s: float = 300) -> str:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "LLAMA_JAX_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(num_processes), str(port), run_dir,
                             str(steps), text["train"], text["tokenizer"], "--layout", layout],
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


def _fed(run_dir: str, num_processes: int) -> list[dict]:
  """Per process: {"first_step", "train": {step: {row: [distinct hashes over its devices]}}, ...}."""
  out = []
  for i in range(num_processes):
    with open(f"{run_dir}.rows.p{i}.json") as f:
      r = json.load(f)
    assert (r["process"], r["num_processes"]) == (i, num_processes)
    assert r["heldout"] == []  # eval_files=(): every batch fed is a train batch
    r["train"] = {int(s): {int(row): h for row, h in rows.items()} for s, rows in r["train"].items()}
    out.append(r)
  return out


def _global_rows(fed: list[dict]) -> dict[int, dict[int, str]]:
  """{step: {row: hash}} over all processes; asserts that every device of every process fed a row at a
  step got the same bytes for it."""
  steps = {s for r in fed for s in r["train"]}
  assert all(set(r["train"]) == steps for r in fed), [sorted(r["train"]) for r in fed]
  out = {}
  for s in sorted(steps):
    out[s] = {}
    for i, r in enumerate(fed):
      for row, hashes in r["train"][s].items():
        assert len(hashes) == 1, f"step {s} row {row}: process {i}'s devices got {len(hashes)} versions"
        first = out[s].setdefault(row, hashes[0])
        assert first == hashes[0], f"step {s} row {row}: process {i} fed other bytes than another process"
  return out


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
  dirs = {x: str(tmp / x) for x in "ABCDE"}
  nproc = {"A": 1, "B": 2, "C": 2, "D": 1, "E": 2}
  out = {"A": _launch(1, dirs["A"], text), "B": _launch(2, dirs["B"], text)}
  _resume_copy(dirs["A"], dirs["C"], SAVED)
  out["C"] = _launch(2, dirs["C"], text)
  _resume_copy(dirs["B"], dirs["D"], SAVED)
  out["D"] = _launch(1, dirs["D"], text)
  out["E"] = _launch(2, dirs["E"], text, steps=SUBSET_STEPS, layout="fsdp8")
  return {k: {"losses": _losses(v), "out": out[k], "fed": _fed(v, nproc[k])} for k, v in dirs.items()}


def test_reference_feeds_every_row_of_every_step(runs):
  assert runs["A"]["fed"][0]["first_step"] == 0
  rows = _global_rows(runs["A"]["fed"])  # also: both devices of each tensor pair got the same bytes
  assert {s: sorted(r) for s, r in rows.items()} == {s: list(range(BATCH)) for s in range(1, STEPS + 1)}
  assert len({h for r in rows.values() for h in r.values()}) == STEPS * BATCH  # a stream, not one batch


def test_tensor_pair_across_processes_feeds_the_same_rows(runs):
  ref, two = runs["A"], runs["B"]
  assert "tensor pairs: [[0, 1], [0, 1], [0, 1], [0, 1]]" in two["out"]  # every pair spans both processes
  every_row = {s: list(range(BATCH)) for s in range(1, STEPS + 1)}
  for r in two["fed"]:  # each process holds every shard, so it feeds every row
    assert {s: sorted(x) for s, x in r["train"].items()} == every_row
  assert _global_rows(two["fed"]) == _global_rows(ref["fed"])
  # Step 1: identical initial params (same seed) on identical rows; only the summation order differs.
  print(f"\nstep-1 loss: 1x8 {ref['losses'][1]!r}, 2x4 {two['losses'][1]!r}")
  np.testing.assert_allclose(two["losses"][1], ref["losses"][1], rtol=LOSS_RTOL, atol=0)


def test_strict_subset_of_rows_per_process(runs):
  held = [{s: set(x) for s, x in r["train"].items()} for r in runs["E"]["fed"]]
  assert all(set(h) == set(range(1, SUBSET_STEPS + 1)) for h in held)
  for s in range(1, SUBSET_STEPS + 1):
    p0, p1 = held[0][s], held[1][s]
    assert p0 and p1 and not p0 & p1, (s, sorted(p0), sorted(p1))  # each a non-empty strict subset
    assert p0 | p1 == set(range(BATCH)), (s, sorted(p0), sorted(p1))
  ref = _global_rows(runs["A"]["fed"])
  assert _global_rows(runs["E"]["fed"]) == {s: ref[s] for s in range(1, SUBSET_STEPS + 1)}


@pytest.mark.parametrize("run,source", [("C", "A"), ("D", "B")], ids=["1-to-2-processes", "2-to-1-process"])
def test_resume_on_another_process_count_continues_the_stream(runs, run, source):
  resumed = runs[run]
  assert f"at step {SAVED}" in resumed["out"]
  assert all(r["first_step"] == SAVED for r in resumed["fed"])
  ref = _global_rows(runs["A"]["fed"])
  assert _global_rows(resumed["fed"]) == {s: ref[s] for s in range(SAVED + 1, STEPS + 1)}
  assert sorted(resumed["losses"]) == list(range(1, STEPS + 1))
  # Step 7: the params restored from `source`'s step-6 checkpoint are exactly those `source` trained
  # step 7 from, on the same rows (asserted above); only the summation order differs.
  print(f"\nstep-{SAVED + 1} loss: {source} {runs[source]['losses'][SAVED + 1]!r}, "
        f"{run} {resumed['losses'][SAVED + 1]!r}")
  np.testing.assert_allclose(resumed["losses"][SAVED + 1], runs[source]["losses"][SAVED + 1],
                             rtol=LOSS_RTOL, atol=0)
