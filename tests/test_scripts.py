"""tpu_scripts/: shellcheck-clean, and each --dry-run prints exactly the commands it would run."""

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


# --- exact dry runs --------------------------------------------------------------------------------

def test_create(stub_bin):
  assert dry_run(stub_bin, "create_tpu.sh", "--dry-run") == [
      "gcloud compute tpus tpu-vm create llama-v5p --zone=us-east5-a --project=proj "
      "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5"]
  assert dry_run(stub_bin, "create_tpu.sh", "--dry-run", "--queued", "--spot") == [
      "gcloud compute tpus queued-resources create llama-v5p-qr --node-id=llama-v5p "
      "--zone=us-east5-a --project=proj --accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 "
      "--spot"]


def test_setup_copy_and_clone(stub_bin):
  assert dry_run(stub_bin, "setup_tpu.sh", "--dry-run") == [
      f"tar -czf /tmp/llama-v5p-llama_jax.tar.gz -C {REPO} --exclude=.git --exclude=.venv "
      "--exclude=__pycache__ .",
      "gcloud compute tpus tpu-vm scp /tmp/llama-v5p-llama_jax.tar.gz llama-v5p:llama_jax.tar.gz "
      "--zone=us-east5-a --project=proj --worker=all",
      f"{SSH} --command='set -e; mkdir -p llama_jax && tar -xzf llama_jax.tar.gz -C llama_jax; "
      + INSTALL]
  url = "https://github.com/acme/llama_jax.git"
  assert dry_run(stub_bin, "setup_tpu.sh", "--dry-run", extra_env={"REPO_URL": url}) == [
      f"{SSH} --command='set -e; if [ -d llama_jax/.git ]; then git -C llama_jax fetch origin && "
      "git -C llama_jax checkout main && git -C llama_jax reset --hard origin/main; else git clone "
      f"--branch main {url} llama_jax; fi; " + INSTALL]


def test_launch(stub_bin):
  out = dry_run(stub_bin, "launch.sh", "--dry-run", "pretrain", "--run_dir=gs://b/ckpt",
                "--steps=1000")
  assert out == [LAUNCH.format(flags=" --run_dir=gs://b/ckpt --steps=1000")]
  # `experiments/x.py` is accepted for `x`; no flags is fine.
  assert dry_run(stub_bin, "launch.sh", "--dry-run", "experiments/pretrain.py") == [
      LAUNCH.format(flags="")]


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


def test_logs_stop_delete(stub_bin):
  assert dry_run(stub_bin, "logs.sh", "--dry-run", extra_env={"RUN_NAME": "r1"}) == [
      SSH.replace("--worker=all", "--worker=0")
      + " --command='tail -n 100 -F llama_jax/logs/r1.log'"]
  assert dry_run(stub_bin, "stop.sh", "--dry-run") == [
      f"{SSH} --command='if [ -f llama_jax/logs/run.pid ]; then kill $(cat llama_jax/logs/run.pid) "
      "2>/dev/null || true; rm -f llama_jax/logs/run.pid; fi'"]
  assert dry_run(stub_bin, "delete_tpu.sh", "--dry-run") == [
      "gcloud compute tpus tpu-vm delete llama-v5p --zone=us-east5-a --project=proj --quiet"]
  assert dry_run(stub_bin, "delete_tpu.sh", "--dry-run", "--queued") == [
      "gcloud compute tpus queued-resources delete llama-v5p-qr --zone=us-east5-a --project=proj "
      "--force --quiet"]


def test_multislice(stub_bin):
  env = {"NUM_SLICES": "2"}
  assert dry_run(stub_bin, "multislice.sh", "--dry-run", "create", extra_env=env) == [
      "gcloud compute tpus queued-resources create llama-v5p-qr --node-count=2 "
      "--node-prefix=llama-v5p --zone=us-east5-a --project=proj --accelerator-type=v5p-32 "
      "--runtime-version=v2-alpha-tpuv5"]
  launch = LAUNCH.format(flags=" --steps=5")
  assert dry_run(stub_bin, "multislice.sh", "--dry-run", "launch", "pretrain", "--steps=5",
                 extra_env=env) == [launch.replace("llama-v5p ", "llama-v5p-0 "),
                                    launch.replace("llama-v5p ", "llama-v5p-1 ")]


def test_relaunch_on_preemption_prints_one_recovery(stub_bin):
  out = dry_run(stub_bin, "relaunch_on_preemption.sh", "--dry-run", "pretrain",
                "--run_dir=gs://b/ckpt")
  assert out[0] == ("gcloud compute tpus tpu-vm describe llama-v5p --zone=us-east5-a "
                    "--project=proj --format='value(state)'")
  assert out[1].startswith("gcloud compute tpus tpu-vm delete llama-v5p")
  assert out[2].startswith("gcloud compute tpus tpu-vm create llama-v5p")
  assert out[3].startswith("tar -czf") and out[5].startswith(SSH)  # setup: copy, scp, install
  # The relaunch is the same command: the experiment resumes from --run_dir on its own.
  assert out[6:] == [LAUNCH.format(flags=" --run_dir=gs://b/ckpt")]
  queued = dry_run(stub_bin, "relaunch_on_preemption.sh", "--dry-run", "--queued", "pretrain")
  assert "queued-resources describe llama-v5p-qr" in queued[0]
  assert "queued-resources create llama-v5p-qr" in queued[2]


def test_slurm_submit_and_sbatch(stub_bin):
  assert dry_run(stub_bin, "slurm/submit.sh", "--dry-run", "pretrain", "--steps=10",
                 extra_env={"NODES": "4", "SBATCH_ARGS": "--partition=gpu --account=me"}) == [
      "mkdir -p logs",
      "sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu --account=me "
      "tpu_scripts/slurm/train.sbatch pretrain --steps=10"]
  assert dry_run(stub_bin, "slurm/train.sbatch", "--dry-run", "pretrain", "--steps=10",
                 extra_env={"SLURM_SUBMIT_DIR": REPO}) == [
      "srun --kill-on-bad-exit=1 --cpu-bind=none python experiments/pretrain.py --steps=10"]
  headers = [l for l in open(os.path.join(SCRIPTS, "slurm/train.sbatch")) if l.startswith("#SBATCH")]
  # One task per GPU, all GPUs visible to every task: llama_jax.parallel.distributed then pins SLURM_LOCALID.
  assert "#SBATCH --ntasks-per-node=8\n" in headers and "#SBATCH --gpus-per-node=8\n" in headers
  assert not any("--gpus-per-task" in h for h in headers)
