"""tpu_scripts/: shellcheck-clean, strict mode, --help, and dry runs that call no tool."""

import os
import shlex
import shutil
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tpu_scripts")
ALL = sorted(
    os.path.relpath(os.path.join(d, f), SCRIPTS)
    for d, _, files in os.walk(SCRIPTS) for f in files if f.endswith((".sh", ".sbatch")))
EXECUTABLE = [s for s in ALL if s != "common.sh"]  # common.sh is sourced, not run

ENV = {"TPU_NAME": "llama-v5p", "ZONE": "us-east5-a", "PROJECT": "proj",
       "ACCELERATOR_TYPE": "v5p-32", "RUNTIME_VERSION": "v2-alpha-tpuv5"}
SSH = "gcloud compute tpus tpu-vm ssh llama-v5p --zone=us-east5-a --project=proj --worker=all"
LAUNCH = (f"{SSH} --command='cd llama_jax && . .venv/bin/activate && mkdir -p logs && nohup python "
          "experiments/pretrain.py{flags} > logs/run.log 2>&1 < /dev/null & echo $! > logs/run.pid'")
INSTALL = ("cd llama_jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip"
           " && pip install -q -r requirements.txt \"jax[tpu]\" && pip install -q --no-deps -e .'")


@pytest.fixture(scope="module")
def stub_bin(tmp_path_factory):
  """gcloud/sbatch/srun stand-ins that record any call: a dry run must make none."""
  d = tmp_path_factory.mktemp("bin")
  for tool in ("gcloud", "sbatch", "srun"):
    p = d / tool
    p.write_text(f"#!/bin/sh\necho {tool} >> {d}/called\nexit 97\n")
    p.chmod(0o755)
  return d


def dry_run(stub_bin, script, *args, extra_env=None, rc=0):
  env = {"PATH": f"{stub_bin}{os.pathsep}{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/"),
         **ENV, **(extra_env or {})}
  p = subprocess.run(["bash", os.path.join(SCRIPTS, script), *args], env=env, cwd=REPO,
                     capture_output=True, text=True, timeout=30)
  assert p.returncode == rc, p.stderr
  assert not (stub_bin / "called").exists(), "a dry run called a real tool"
  return p.stdout.splitlines()


# --- static checks ---------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install shellcheck); CI installs it")
@pytest.mark.parametrize("script", ALL)
def test_shellcheck(script):
  p = subprocess.run(["shellcheck", "-x", os.path.join(SCRIPTS, script)], capture_output=True,
                     text=True, timeout=60)
  assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", EXECUTABLE)
def test_strict_mode_usage_and_executable(script, stub_bin):
  path = os.path.join(SCRIPTS, script)
  text = open(path).read()
  assert "set -euo pipefail" in text
  assert os.stat(path).st_mode & stat.S_IXUSR
  help_lines = dry_run(stub_bin, script, "--help")
  assert help_lines and help_lines[0].startswith("usage:")


# --- dry runs: what they print is what would run (behaviour: tests/test_scripts_tpu.py, _slurm.py) ---

def test_launch_flags_survive_two_shells(stub_bin):
  flags = ["--note=it's a test", 'x"y', "$HOME", "--dry-run_not_ours=1"]
  (line,) = dry_run(stub_bin, "launch.sh", "--dry-run", "pretrain", "--", *flags)
  remote = next(a for a in shlex.split(line) if a.startswith("--command="))[len("--command="):]
  words = shlex.split(remote)
  start = words.index("experiments/pretrain.py") + 1
  assert words[start:words.index(">")] == flags


def test_launch_rejects_bad_entry(stub_bin):
  dry_run(stub_bin, "launch.sh", "--dry-run", rc=2)
  dry_run(stub_bin, "launch.sh", "--dry-run", "../evil", rc=2)
