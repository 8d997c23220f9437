"""Stand-in for `srun` inside a job: starts every task of the step here, with SLURM's task env.

Behaves like Slurm 22.05-23.02: a step's CPUs per task are srun's --cpus-per-task or 1 (the job's
SLURM_CPUS_PER_TASK is not inherited), reported to each task as FAKE_STEP_CPUS. GPUs: each task sees
all GPUs of its node in CUDA_VISIBLE_DEVICES, or only its own when --gpus-per-task is given or
FAKE_GPU_BIND=task (a site default binding one GPU per task).
"""
import os
import re
import subprocess
import sys


def hosts(nodelist):
  m = re.fullmatch(r"(\w+?)\[(\d+)-(\d+)\]", nodelist)
  if not m:
    return [nodelist]
  width = len(m.group(2))
  return [f"{m.group(1)}{n:0{width}d}" for n in range(int(m.group(2)), int(m.group(3)) + 1)]


def main(argv):
  i, opts = 0, {}
  while i < len(argv) and argv[i].startswith("-"):
    k, _, v = argv[i][2:].partition("=")
    opts[k] = v
    i += 1
  cmd = argv[i:]
  nodes = hosts(os.environ["SLURM_JOB_NODELIST"])
  per_node = int(os.environ["SLURM_NTASKS_PER_NODE"])
  gpus = int(os.environ.get("FAKE_GPUS_PER_NODE", "0"))
  per_task_gpu = "gpus-per-task" in opts or os.environ.get("FAKE_GPU_BIND") == "task"
  cpus = opts.get("cpus-per-task", "1")
  procs = []
  for n, host in enumerate(nodes):
    for local in range(per_node):
      env = dict(os.environ, SLURM_STEP_ID="0", SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"],
                 SLURM_STEP_NUM_NODES=str(len(nodes)), SLURM_NTASKS=str(len(nodes) * per_node),
                 SLURM_PROCID=str(n * per_node + local), SLURM_LOCALID=str(local), SLURM_NODEID=str(n),
                 SLURMD_NODENAME=host, FAKE_STEP_CPUS=cpus,
                 CUDA_VISIBLE_DEVICES=str(local) if per_task_gpu else ",".join(map(str, range(gpus))))
      if "cpus-per-task" in opts:
        env["SLURM_CPUS_PER_TASK"] = cpus
      procs.append(subprocess.Popen(cmd, env=env))
  rcs = [p.wait() for p in procs]
  return next((rc for rc in rcs if rc), 0)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
