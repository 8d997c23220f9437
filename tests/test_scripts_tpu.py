"""tpu_scripts/ run end to end against a stand-in gcloud (tests/stand_ins/gcloud.py): the fake TPU's
workers are directories on this machine, `ssh --command` runs there with a remote-like environment, and
the launched program is a trainer stand-in that records its pid, flags and environment."""

import os
import re
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


# --- 2, 3. setup_tpu.sh: Python >= 3.11 on an image with 3.10, and only the runtime set -----------

def pins(path):
  return [l.split("#")[0].strip() for l in open(path) if l.split("#")[0].strip()]


TEST_ONLY = ("torch", "transformers", "pytest", "ipykernel", "nbclient", "nbformat", "beartype")


def test_setup_brings_python_311_and_installs_only_the_runtime_set(cloud):
  repo, env = cloud
  run(repo, "create_tpu.sh", env=env)
  run(repo, "setup_tpu.sh", env=env, timeout=30)
  jax_pin = next(p for p in pins(os.path.join(REPO, "requirements.txt")) if p.startswith("jax=="))
  for home in worker_homes(env, "t1"):
    venv = os.path.join(home, "llama_jax", ".venv")
    version = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                              "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.split()
    assert [int(v) for v in version] >= [3, 11], f"{home}: venv Python {version}"
    installed = open(os.path.join(venv, "installed.txt")).read().split("\n")
    assert set(pins(os.path.join(REPO, "requirements.txt"))) <= set(installed)
    assert jax_pin.replace("jax==", "jax[tpu]==") in installed  # libtpu matching the pinned jax
    assert not [p for p in installed if p.split("=")[0].split("[")[0] in TEST_ONLY]
    assert os.path.exists(os.path.join(home, "llama_jax", "experiments", "fake.py"))


def test_requirements_split_runtime_and_test():
  runtime = pins(os.path.join(REPO, "requirements.txt"))
  test = pins(os.path.join(REPO, "requirements-test.txt"))
  assert test[0] == "-r requirements.txt"
  names = lambda ps: {p.split("==")[0].lower() for p in ps if "==" in p}  # noqa: E731
  assert not names(runtime) & names(test[1:]), "a package pinned in both files"
  assert not names(runtime) & set(TEST_ONLY)
  assert set(TEST_ONLY) <= names(test)
  assert all("==" in p for p in runtime + test[1:]), "every requirement is pinned"
  # Every third-party module the library imports at module level is in the runtime set (lazy
  # imports are optional paths: torch only reads Meta's .pth files in interop/weights.py).
  from importlib.metadata import packages_distributions
  dists = packages_distributions()
  imported = set()
  for base, _, files in os.walk(os.path.join(REPO, "llama_jax")):
    for f in files:
      if f.endswith(".py"):
        for m in re.finditer(r"^(?:from|import)\s+([A-Za-z_]\w*)", open(os.path.join(base, f)).read(),
                             re.M):
          imported.add(m.group(1))
  third_party = {d.lower().replace("_", "-") for mod in imported for d in dists.get(mod, [])}
  runtime_names = {n.replace("_", "-") for n in names(runtime)}
  # jaxlib and ml_dtypes come with jax.
  assert third_party - {"jaxlib", "ml-dtypes", "llama-jax"} <= runtime_names, third_party - runtime_names


# --- 4. the runtime version follows the accelerator ------------------------------------------------

def created_version(env):
  (create,) = [c for c in calls(env) if c[3] == "create"]
  return next(a.split("=", 1)[1] for a in create if a.startswith(("--version=", "--runtime-version=")))


@pytest.mark.parametrize("accelerator, version", [
    ("v6e-16", "v2-alpha-tpuv6e"), ("v5p-32", "v2-alpha-tpuv5"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v4-8", "tpu-ubuntu2204-base")])
def test_runtime_version_per_accelerator(cloud, accelerator, version):
  repo, env = cloud
  env = dict(env, ACCELERATOR_TYPE=accelerator)
  out, _ = run(repo, "create_tpu.sh", "--dry-run", env=env)
  assert f"--version={version}" in shlex.split(out)
  run(repo, "create_tpu.sh", "--queued", env=env)
  assert created_version(env) == version
  # An explicit RUNTIME_VERSION wins.
  out, _ = run(repo, "create_tpu.sh", "--dry-run", env=dict(env, RUNTIME_VERSION="custom-image"))
  assert "--version=custom-image" in shlex.split(out)


@pytest.mark.parametrize("accelerator", ["v7x-8", "tpu7x-8", "v5e-8", "v9-1"])
def test_unknown_accelerator_is_an_error_listing_the_known_ones(cloud, accelerator):
  repo, env = cloud
  _, err = run(repo, "create_tpu.sh", env=dict(env, ACCELERATOR_TYPE=accelerator), rc=2)
  assert f"ACCELERATOR_TYPE={accelerator}" in err
  for known in ("v6e-", "v5p-", "v5litepod-", "v4-"):
    assert known in err
  assert not calls(env), "called gcloud with an unknown accelerator"


# --- 7. first-time user: project, ssh flags, environment, key propagation, multislice ------------

def test_no_project_is_an_error_and_gclouds_default_is_used(cloud):
  repo, env = cloud
  env = {k: v for k, v in env.items() if k != "PROJECT"}
  _, err = run(repo, "create_tpu.sh", env=dict(env, FAKE_PROJECT=""), rc=2)
  assert "PROJECT" in err and "gcloud config set project" in err
  assert not [c for c in calls(env) if c[:2] == ["compute", "tpus"]]
  run(repo, "create_tpu.sh", env=dict(env, FAKE_PROJECT="their-project"))
  (create,) = [c for c in calls(env) if c[:2] == ["compute", "tpus"]]
  assert "--project=their-project" in create


def test_ssh_flags_reach_every_ssh_and_scp(cloud):
  repo, env = cloud
  env = dict(env, SSH_FLAGS="--internal-ip --strict-host-key-checking=no")
  run(repo, "create_tpu.sh", env=env)
  run(repo, "setup_tpu.sh", env=env, timeout=30)
  run(repo, "launch.sh", "fake", env=env, timeout=15)
  run(repo, "stop.sh", env=env)
  remote = [c for c in calls(env) if c[3] in ("ssh", "scp")]
  assert len(remote) >= 4
  for c in remote:
    assert "--internal-ip" in c and "--strict-host-key-checking=no" in c, c


def test_environment_reaches_the_trainer(cloud, tmp_path):
  repo, env = cloud
  env = dict(env, LIBTPU_INIT_ARGS="--xla_tpu_enable_async_collective_fusion=true --x='a b'",
             LLAMA_JAX_COORDINATOR_PORT="12345", MY_SETTING="it's mine", FORWARD_ENV="MY_SETTING")
  run(repo, "create_tpu.sh", env=env)
  prepare_workers(env, "t1", tmp_path)
  run(repo, "launch.sh", "fake", env=env, timeout=15)
  assert wait_for(lambda: len(running(env, "t1")) == 2)
  for t in running(env, "t1").values():
    for name in ("LIBTPU_INIT_ARGS", "LLAMA_JAX_COORDINATOR_PORT", "MY_SETTING"):
      assert t["env"].get(name) == env[name], name


def test_setup_waits_for_ssh_keys_to_propagate(cloud):
  repo, env = cloud
  run(repo, "create_tpu.sh", env=env)
  harness.fail_next(env, "ssh", 2)  # the first two ssh calls after create are refused
  run(repo, "setup_tpu.sh", env=env, timeout=30)
  for home in worker_homes(env, "t1"):
    assert os.path.exists(os.path.join(home, "llama_jax", ".venv", "installed.txt"))


def test_multislice_two_slices_end_to_end(cloud):
  repo, env = cloud
  env = dict(env, NUM_SLICES="2")
  run(repo, "multislice.sh", "create", env=env)
  run(repo, "multislice.sh", "setup", env=env, timeout=30)
  t0 = time.time()
  run(repo, "multislice.sh", "launch", "fake", "--steps=7", env=env, timeout=15)
  assert time.time() - t0 < 10
  nodes = harness.state(env)["qrs"]["t1-qr"]["nodes"]
  assert len(nodes) == 2
  assert wait_for(lambda: all(len(running(env, n)) == 2 for n in nodes)), "not every worker runs"
  for n in nodes:
    for home, t in running(env, n).items():
      assert t["argv"] == ["--steps=7"]
      assert int(open(os.path.join(home, "llama_jax", "logs", "run.pid")).read()) == t["pid"]
  # All slices through the queued resource, as Google's docs show: one ssh reaching every node.
  launches = [c for c in calls(env) if c[3] == "ssh" and "experiments/fake.py" in str(c)]
  assert len(launches) == 1 and launches[0][2] == "queued-resources" and "--node=all" in launches[0]
  run(repo, "multislice.sh", "stop", env=env)
  assert wait_for(lambda: not any(running(env, n) for n in nodes))
  run(repo, "multislice.sh", "delete", env=env)
  assert not harness.state(env)["qrs"]


# --- 5. the preemption watcher -----------------------------------------------------------------

CREATE_FLAGS = ["--spot", "--network=train-net", "--subnetwork=train-sub"]


def test_watcher_recreates_the_same_machine_and_relaunches(cloud):
  repo, env = cloud
  run(repo, "create_tpu.sh", *CREATE_FLAGS, env=env)
  first = harness.state(env)["nodes"]["t1"]["create_args"]
  run(repo, "setup_tpu.sh", env=env, timeout=30)
  run(repo, "launch.sh", "fake", "--run_dir=/mnt/ckpt", env=env, timeout=15)
  assert wait_for(lambda: len(running(env, "t1")) == 2)
  old = {t["pid"] for t in running(env, "t1").values()}
  harness.set_state(env, node="t1", value="PREEMPTED")
  # Check 1 sees PREEMPTED and recovers; check 2 sees READY; MAX_CHECKS=2 ends the watch.
  _, err = run(repo, "relaunch_on_preemption.sh", *CREATE_FLAGS, "fake", "--run_dir=/mnt/ckpt",
               env=dict(env, MAX_CHECKS="2"), timeout=40)
  assert "PREEMPTED" in err
  assert harness.state(env)["nodes"]["t1"]["create_args"] == first  # spot, network kept
  assert wait_for(lambda: len(running(env, "t1")) == 2)
  live = running(env, "t1")
  assert len(live) == 2 and not {t["pid"] for t in live.values()} & old
  for home, t in live.items():
    assert t["argv"] == ["--run_dir=/mnt/ckpt"]
    assert int(open(os.path.join(home, "llama_jax", "logs", "run.pid")).read()) == t["pid"]


def test_watcher_survives_a_stockout_and_retries(cloud):
  repo, env = cloud
  run(repo, "create_tpu.sh", "--spot", env=env)
  harness.set_state(env, node="t1", value="PREEMPTED")
  harness.fail_next(env, "create", 2)  # two stockouts, then capacity
  _, err = run(repo, "relaunch_on_preemption.sh", "--spot", "fake", env=dict(env, MAX_CHECKS="4"),
               timeout=40)
  assert err.count("RESOURCE_EXHAUSTED") == 2 and "retrying" in err
  assert wait_for(lambda: len(running(env, "t1")) == 2), "no relaunch after the stockout"
  assert "--spot" in harness.state(env)["nodes"]["t1"]["create_args"]


def test_watcher_keeps_watching_when_describe_fails_transiently(cloud):
  repo, env = cloud
  run(repo, "create_tpu.sh", env=env)
  # A describe that fails for another reason than NOT_FOUND must not delete a healthy TPU.
  harness.set_state(env, node="t1", value="READY")
  s = harness.state(env)
  harness.fail_next(env, "describe", 1)  # e.g. a network error: not NOT_FOUND
  run(repo, "relaunch_on_preemption.sh", "fake", env=dict(env, MAX_CHECKS="2"), timeout=20)
  assert harness.state(env)["nodes"]["t1"] == s["nodes"]["t1"]
  assert not [c for c in calls(env) if c[3] in ("delete", "ssh")]


def test_watcher_stops_on_a_failed_queued_resource(cloud):
  repo, env = cloud
  run(repo, "create_tpu.sh", "--queued", "--spot", env=env)
  harness.set_state(env, qr="t1-qr", value="FAILED")
  _, err = run(repo, "relaunch_on_preemption.sh", "--queued", "--spot", "fake", env=env,
               timeout=20, rc=None)
  assert "FAILED" in err and "queued-resources describe t1-qr" in err
  assert not [c for c in calls(env) if c[3] == "delete"], "a FAILED request was deleted"


def test_watcher_recreates_a_suspended_queued_resource(cloud):
  repo, env = cloud
  run(repo, "create_tpu.sh", "--queued", "--spot", env=env)
  harness.set_state(env, qr="t1-qr", value="SUSPENDED")
  run(repo, "relaunch_on_preemption.sh", "--queued", "--spot", "fake", env=dict(env, MAX_CHECKS="2"),
      timeout=40)
  qr = harness.state(env)["qrs"]["t1-qr"]
  assert qr["state"] == "ACTIVE" and "--spot" in qr["create_args"]
  assert wait_for(lambda: len(running(env, "t1")) == 2)
