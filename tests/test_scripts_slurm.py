"""tpu_scripts/slurm/ run against stand-ins for sbatch and srun (tests/stand_ins/): submit.sh ->
sbatch -> train.sbatch -> srun -> one task per GPU, each running what pretrain.py runs first, down to
the arguments jax.distributed.initialize receives."""

import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "stand_ins"))
import harness  # noqa: E402
from harness import run, tasks  # noqa: E402

JOB_PORT = 4242 % 4096 + 61440  # jax's SlurmCluster port for job 4242


def job_log(repo):
  (log,) = os.listdir(repo / "logs")
  return open(repo / "logs" / log).read()


def submit(tmp_path, *args, **env_extra):
  repo = harness.slurm_repo(tmp_path)
  env = harness.slurm_env(tmp_path, **env_extra)
  run(repo, "slurm/submit.sh", *args, env=dict(env, NODES="2", GPUS_PER_NODE="8"), timeout=40)
  return repo


def test_two_nodes_eight_gpus_down_to_jax_distributed_initialize(tmp_path):
  repo = submit(tmp_path, "fake", "--steps=3")
  got = tasks(repo)
  assert sorted(got, key=int) == [str(i) for i in range(16)], job_log(repo)
  for pid, t in got.items():
    (kw,) = t["initialize"]
    assert kw["coordinator_address"] == f"gpu01:{JOB_PORT}"
    assert kw["num_processes"] == 16 and kw["process_id"] == int(pid)
    # Every task sees its node's 8 GPUs and drives the one numbered SLURM_LOCALID.
    assert kw["local_device_ids"] == [int(pid) % 8] == [int(t["local_id"])]
    assert kw["cluster_detection_method"] == "deactivate"
    assert t["argv"] == ["--steps=3"]


def test_srun_gets_the_cpus_per_task(tmp_path):
  # Slurm 22.05-23.02: srun does not inherit the job's --cpus-per-task; without it each task gets 1.
  repo = submit(tmp_path, "fake")
  assert {t["cpus"] for t in tasks(repo).values()} == {"8"}, job_log(repo)


def test_one_gpu_bound_per_task_uses_the_visible_one(tmp_path):
  # A site that binds one GPU per task: CUDA_VISIBLE_DEVICES has one entry, the task's device 0.
  repo = submit(tmp_path, "fake", FAKE_GPU_BIND="task")
  got = tasks(repo)
  assert len(got) == 16, job_log(repo)
  for t in got.values():
    assert t["initialize"][0]["local_device_ids"] is None


def test_plain_python_in_an_salloc_shell_is_one_process(tmp_path):
  # salloc's shell has the job's variables but no step: jax (SlurmCluster) needs SLURM_STEP_NODELIST
  # and srun's SLURM_LOCALID; without them this is one process, not a wait for 15 absent peers.
  repo = harness.slurm_repo(tmp_path)
  env = dict(harness.slurm_env(tmp_path), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[01-02]",
             SLURM_NNODES="2", SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8", SLURM_PROCID="0",
             SLURM_SUBMIT_DIR=str(repo))
  subprocess.run([sys.executable, "experiments/fake.py"], cwd=repo, env=env, check=True, timeout=30)
  assert tasks(repo)["0"]["initialize"] == []


def test_a_cpu_only_jax_stops_the_job_with_the_fix(tmp_path):
  repo = harness.slurm_repo(tmp_path)
  env = harness.slurm_env(tmp_path, cuda_plugin=False)
  run(repo, "slurm/submit.sh", "fake", env=dict(env, NODES="2", GPUS_PER_NODE="8"), timeout=40)
  log = job_log(repo)
  assert "job exit code 0" not in log and not tasks(repo)
  assert "jax_cuda12_plugin" in log and "tpu_scripts/slurm/setup_gpu.sh" in log


def test_setup_gpu_installs_cuda_jax_at_the_pinned_version(tmp_path):
  repo = harness.slurm_repo(tmp_path)
  env = harness.slurm_env(tmp_path)
  run(repo, "slurm/setup_gpu.sh", env=env, timeout=30)
  pins = [l.split("#")[0].strip() for l in open(repo / "requirements.txt") if l.split("#")[0].strip()]
  installed = open(repo / ".venv" / "installed.txt").read().split("\n")
  jax_pin = next(p for p in pins if p.startswith("jax=="))
  assert set(pins) <= set(installed)
  assert jax_pin.replace("jax==", "jax[cuda12]==") in installed
  assert not [p for p in installed if p.split("=")[0] in ("torch", "transformers", "pytest")]
  # The job then runs in that venv (Python >= 3.11) and finds its 16 tasks.
  run(repo, "slurm/submit.sh", "fake", env=dict(env, NODES="2", GPUS_PER_NODE="8"), timeout=40)
  got = tasks(repo)
  assert len(got) == 16 and all(t["python"] >= [3, 11] for t in got.values())
