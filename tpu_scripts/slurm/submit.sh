#!/usr/bin/env bash
# Submits tpu_scripts/slurm/train.sbatch. NODES and GPUS_PER_NODE size the job (one task per GPU);
# SBATCH_ARGS adds anything else, e.g. "--partition=gpu --account=me".
set -euo pipefail
usage() {
  echo "usage: [NODES=2 GPUS_PER_NODE=8 SBATCH_ARGS=..] submit.sh [--dry-run] <entry>" \
    "[experiment flags...]"
}
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "$0")/../common.sh"
NO_GCLOUD=1
parse_args "$@"
((${#ARGS[@]} >= 1)) || die "missing <entry>"
: "${NODES:=2}" "${GPUS_PER_NODE:=8}" "${SBATCH_ARGS:=}"
read -r -a sbatch_args <<<"$SBATCH_ARGS"

cd "$REPO_ROOT"
run mkdir -p logs  # the job's --output directory must exist before it starts
run sbatch --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE" \
  "${sbatch_args[@]+"${sbatch_args[@]}"}" tpu_scripts/slurm/train.sbatch "${ARGS[@]}"
