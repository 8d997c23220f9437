"""Puts the stand-ins (gcloud, the worker's python3/curl/uv, sbatch/srun) on a test's PATH and runs
tpu_scripts/ against them. See gcloud.py and slurm.py for what each stand-in does."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _install(src, dest, **subs):
  text = open(os.path.join(HERE, src)).read()
  for k, v in subs.items():
    text = text.replace(f"@{k}@", v)
  if src.endswith(".py"):
    text = f"#!{sys.executable}\n" + text
  with open(dest, "w") as f:
    f.write(text)
  os.chmod(dest, 0o755)
  return dest


def fake_repo(tmp, entry="fake"):
  """A copy of tpu_scripts/ and the requirements, with experiments/<entry>.py the trainer stand-in."""
  repo = tmp / "repo"
  shutil.copytree(os.path.join(REPO, "tpu_scripts"), repo / "tpu_scripts")
  for f in ("pyproject.toml", "requirements.txt", "requirements-test.txt"):
    if os.path.exists(os.path.join(REPO, f)):
      shutil.copy(os.path.join(REPO, f), repo / f)
  (repo / "experiments").mkdir()
  shutil.copy(os.path.join(HERE, "trainer.py"), repo / "experiments" / f"{entry}.py")
  return repo


def cloud_env(tmp, **extra):
  """Environment for running tpu_scripts/ against the gcloud stand-in in tmp."""
  bin_dir, remote, cloud, home = tmp / "bin", tmp / "remote", tmp / "cloud", tmp / "home"
  for d in (bin_dir, remote, cloud / "fail", home):
    d.mkdir(parents=True, exist_ok=True)
  _install("gcloud.py", bin_dir / "gcloud")
  uv = _install("uv.py", tmp / "uv", REAL_PY=sys.executable, PY310=str(remote / "python3"))
  _install("python3_310.sh", remote / "python3")
  _install("curl.sh", remote / "curl", UV=str(uv))
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
         "TMPDIR": str(tmp), "FAKE_GCLOUD_ROOT": str(cloud), "FAKE_REMOTE_BIN": str(remote),
         "TPU_NAME": "t1", "ZONE": "us-east5-a", "PROJECT": "proj", "ACCELERATOR_TYPE": "v5p-16",
         "RETRY_S": "0", "CHECK_EVERY_S": "0", "BACKOFF_S": "0"}
  env.update(extra)
  return env


def run(repo, script, *args, env, timeout=20, rc=0):
  """Runs repo/tpu_scripts/<script>; returns (stdout, stderr). Fails the test on a hang."""
  p = subprocess.Popen(["bash", str(repo / "tpu_scripts" / script), *args], env=env, cwd=repo,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       start_new_session=True)
  try:
    out, err = p.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    out, err = p.communicate()
    pytest.fail(f"{script} {args} did not return within {timeout} s\n--- stdout\n{out}\n--- stderr\n{err}")
  if rc is not None:
    assert p.returncode == rc, f"{script} exit {p.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"
  return out, err


def calls(env):
  path = os.path.join(env["FAKE_GCLOUD_ROOT"], "calls.jsonl")
  return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


def state(env):
  return json.load(open(os.path.join(env["FAKE_GCLOUD_ROOT"], "state.json")))


def set_state(env, node=None, qr=None, value="PREEMPTED"):
  s = state(env)
  if node:
    s["nodes"][node]["state"] = value
  if qr:
    s["qrs"][qr]["state"] = value
  with open(os.path.join(env["FAKE_GCLOUD_ROOT"], "state.json"), "w") as f:
    json.dump(s, f)


def fail_next(env, kind, n):
  with open(os.path.join(env["FAKE_GCLOUD_ROOT"], "fail", kind), "w") as f:
    f.write(str(n))


def worker_homes(env, node):
  d = os.path.join(env["FAKE_GCLOUD_ROOT"], "nodes", node)
  return sorted(os.path.join(d, w) for w in os.listdir(d)) if os.path.isdir(d) else []


def trainers(home):
  return [json.load(open(os.path.join(home, f))) for f in sorted(os.listdir(home))
          if f.startswith("trainer-") and f.endswith(".json")]


def alive(pid):
  try:
    with open(f"/proc/{pid}/status") as f:
      return not any(l.startswith("State:") and "Z" in l.split()[1] for l in f)
  except FileNotFoundError:
    return False


def kill_all_trainers(env):
  """Teardown: no trainer stand-in outlives its test (by its record, or by the pid file launch.sh
  wrote, for one that started too late to write its record)."""
  pids = set()
  for base, _, files in os.walk(env["FAKE_GCLOUD_ROOT"]):
    for f in files:
      path = os.path.join(base, f)
      try:
        if f.startswith("trainer-") and f.endswith(".json"):
          pids.add(json.load(open(path))["pid"])
        elif f.endswith(".pid") and os.path.basename(base) == "logs":
          pids.add(int(open(path).read()))
      except ValueError:
        pass
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def slurm_env(tmp, cuda_plugin=True, **extra):
  """sbatch/srun stand-ins on PATH, this test's Python as `python`, the real llama_jax importable,
  and (cuda_plugin) a stand-in jax_cuda12_plugin as a CUDA jax install would have."""
  bin_dir = tmp / "bin"
  bin_dir.mkdir(parents=True, exist_ok=True)
  for tool in ("sbatch", "srun"):
    _install(f"{tool}.py", bin_dir / tool)
  _install("uv.py", bin_dir / "uv", REAL_PY=sys.executable, PY310="/bin/false")
  paths = [REPO]
  if cuda_plugin:
    plugin = tmp / "site" / "jax_cuda12_plugin"
    plugin.mkdir(parents=True, exist_ok=True)
    (plugin / "__init__.py").write_text("")
    paths.append(str(tmp / "site"))
  env = {"PATH": os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
         "HOME": str(tmp), "TMPDIR": str(tmp), "PYTHONPATH": os.pathsep.join(paths)}
  env.update(extra)
  return env


def slurm_repo(tmp, entry="fake"):
  repo = fake_repo(tmp, entry)
  shutil.copy(os.path.join(HERE, "slurm_trainer.py"), repo / "experiments" / f"{entry}.py")
  return repo


def tasks(repo):
  d = repo / "tasks"
  return {f[:-5]: json.load(open(d / f)) for f in os.listdir(d)} if d.exists() else {}
