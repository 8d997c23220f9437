"""Stand-in for `sbatch`: runs the batch script at once, here, with the environment SLURM gives it.

Options come from the script's #SBATCH lines, overridden by the command line (as sbatch does). The
job gets SLURM_JOB_ID=4242, nodes gpu01..gpuNN, SLURM_NTASKS*, SLURM_CPUS_PER_TASK, SLURM_SUBMIT_DIR;
its output goes to the --output file (%x job name, %j job id), like a real job's.
"""
import os
import subprocess
import sys

JOB_ID = "4242"


def options(words):
  opts = {}
  for w in words:
    k, _, v = w[2:].partition("=")
    opts[k] = v
  return opts


def main(argv):
  i = 0
  while i < len(argv) and argv[i].startswith("-"):
    i += 1
  script, script_args = argv[i], argv[i + 1:]
  headers = [l.split()[1] for l in open(script) if l.startswith("#SBATCH ")]
  opts = {**options(headers), **options(argv[:i])}
  nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
  env = dict(os.environ, SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME=opts.get("job-name", "job"),
             SLURM_JOB_NODELIST=f"gpu[01-{nodes:02d}]" if nodes > 1 else "gpu01",
             SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes),
             SLURM_NTASKS=str(nodes * per_node), SLURM_NTASKS_PER_NODE=str(per_node),
             SLURM_SUBMIT_DIR=os.getcwd(), FAKE_GPUS_PER_NODE=opts.get("gpus-per-node", "0"))
  if opts.get("cpus-per-task"):
    env["SLURM_CPUS_PER_TASK"] = opts["cpus-per-task"]
  out = opts.get("output", "slurm-%j.out").replace("%x", env["SLURM_JOB_NAME"]).replace("%j", JOB_ID)
  with open(out, "w") as f:
    rc = subprocess.run(["bash", script, *script_args], env=env, stdout=f,
                        stderr=subprocess.STDOUT).returncode
  print(f"Submitted batch job {JOB_ID}")
  with open(out, "a") as f:
    f.write(f"\n[stand-in sbatch] job exit code {rc}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
