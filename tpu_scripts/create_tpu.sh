#!/usr/bin/env bash
# Creates the TPU VM (or a queued resource for it). Settings: see common.sh.
set -euo pipefail
usage() {
  echo "usage: [TPU_NAME=.. ZONE=.. PROJECT=.. ACCELERATOR_TYPE=v5p-32 RUNTIME_VERSION=<from the type>]" \
    "create_tpu.sh [--dry-run] [--queued] [--spot] [extra gcloud flags...]"
}
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"

version="$(runtime_version)" || exit 2
queued=0 extra=()
for a in "${ARGS[@]+"${ARGS[@]}"}"; do
  case "$a" in
    --queued) queued=1 ;;
    *) extra+=("$a") ;;  # e.g. --spot, --reserved, --network=...
  esac
done

if ((queued)); then
  # Queued resources wait for capacity instead of failing when the zone is full.
  run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
    --zone="$ZONE" --project="$PROJECT" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$version" "${extra[@]+"${extra[@]}"}"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$version" \
    "${extra[@]+"${extra[@]}"}"
fi
