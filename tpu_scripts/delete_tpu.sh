#!/usr/bin/env bash
# Deletes the TPU VM, or with --queued its queued resource (and the VM with it).
set -euo pipefail
usage() { echo "usage: [TPU_NAME=.. ZONE=.. PROJECT=..] delete_tpu.sh [--dry-run] [--queued]"; }
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"

case "${ARGS[*]-}" in
  --queued)
    run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" --zone="$ZONE" \
      --project="$PROJECT" --force --quiet ;;
  "")
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet ;;
  *) die "unknown arguments: ${ARGS[*]}" ;;
esac
