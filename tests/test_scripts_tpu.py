"""tpu_scripts/ run end to end against a stand-in gcloud (tests/stand_ins/gcloud.py): the fake TPU's
workers are directories on this machine, `ssh --command` runs there with a remote-like environment, and
the launched program is a trainer stand-in that records its pid, flags and environment."""

import os
import select
import shlex
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "stand_ins"))
import harness  # noqa: E402
from harness import alive, calls, run, trainers, worker_homes  # noqa: E402

REPO = harness.REPO


@pytest.fixture
def cloud(tmp_path):
  repo = harness.fake_repo(tmp_path)
  env = harness.cloud_env(tmp_path)
  yield repo, env
  harness.kill_all_trainers(env)


def wait_for(pred, timeout=10.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if pred():
      return True
    time.sleep(0.05)
  return pred()


def running(env, node):
  """{worker home: the trainer record} for each worker of `node` whose recorded pid is alive."""
  out = {}
  for home in worker_homes(env, node):
    live = [t for t in trainers(home) if alive(t["pid"])]
    assert len(live) <= 1, f"{home}: {len(live)} trainers running"
    if live:
      out[home] = live[0]
  return out


def prepare_workers(env, node, tmp):
  """What setup_tpu.sh leaves on a worker, made directly: the code and a Python 3.11 venv."""
  for home in worker_homes(env, node):
    code = os.path.join(home, "llama_jax")
    os.makedirs(os.path.join(code, "experiments"), exist_ok=True)
    subprocess.run(["cp", os.path.join(harness.HERE, "trainer.py"),
                    os.path.join(code, "experiments", "fake.py")], check=True)
    subprocess.run([str(tmp / "uv"), "venv", "--python", "3.11", ".venv"], cwd=code, check=True)


# --- 1. launch.sh: the pid is the trainer's, and ssh returns at once ------------------------------

def test_launch_records_the_trainers_pid_returns_and_stop_ends_it(cloud, tmp_path):
  repo, env = cloud
  run(repo, "create_tpu.sh", env=env)
  prepare_workers(env, "t1", tmp_path)
  t0 = time.time()
  run(repo, "launch.sh", "fake", "--steps=3", "--note=it's here", env=env, timeout=15)
  assert time.time() - t0 < 10, "ssh stayed attached to the run"
  assert wait_for(lambda: len(running(env, "t1")) == 2)
  for home, t in running(env, "t1").items():
    assert t["argv"] == ["--steps=3", "--note=it's here"]
    assert t["python"] >= [3, 11]
    with open(os.path.join(home, "llama_jax", "logs", "run.pid")) as f:
      assert int(f.read()) == t["pid"], "logs/run.pid is not the trainer's pid"
  run(repo, "stop.sh", env=env)
  assert wait_for(lambda: not running(env, "t1")), "stop.sh left the trainer running"
  for home in worker_homes(env, "t1"):
    assert any(f.endswith(".stopped") for f in os.listdir(home)), "the trainer got no SIGTERM"


def test_logs_follows_the_trainers_log(cloud, tmp_path):
  repo, env = cloud
  run(repo, "create_tpu.sh", env=env)
  prepare_workers(env, "t1", tmp_path)
  run(repo, "launch.sh", "fake", "--steps=3", env=env, timeout=15)
  p = subprocess.Popen(["bash", str(repo / "tpu_scripts" / "logs.sh")], env=env, cwd=repo,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       start_new_session=True)
  try:
    # tail -F never ends: read until the trainer's first line shows up, then hang up.
    deadline = time.time() + 10
    line = ""
    while time.time() < deadline and "started" not in line:
      if select.select([p.stdout], [], [], 0.2)[0]:
        line = p.stdout.readline()
    assert "trainer" in line and "--steps=3" in line
  finally:
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
