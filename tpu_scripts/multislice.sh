#!/usr/bin/env bash
# Multislice: NUM_SLICES TPU slices in one queued resource (`--node-count`), nodes named
# $TPU_NAME-0 .. $TPU_NAME-(N-1). jax reads MEGASCALE_* on each worker, so the same launch works.
set -euo pipefail
usage() {
  echo "usage: [TPU_NAME=.. NUM_SLICES=2 ACCELERATOR_TYPE=..] multislice.sh [--dry-run]" \
    "create [gcloud flags...] | setup | launch <entry> [experiment flags...] | stop | delete"
}
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} >= 1)) || die "missing command"
: "${NUM_SLICES:=2}"
dry=()
if [[ "$DRY_RUN" == 1 ]]; then dry=(--dry-run); fi

# Runs another tpu_scripts/*.sh once per slice, with TPU_NAME set to that slice's node.
each_slice() {
  local script="$1" i
  shift
  for ((i = 0; i < NUM_SLICES; i++)); do
    TPU_NAME="$TPU_NAME-$i" "$SCRIPTS_DIR/$script" "${dry[@]+"${dry[@]}"}" "$@"
  done
}

case "${ARGS[0]}" in
  create)
    run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-count="$NUM_SLICES" \
      --node-prefix="$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
      "${ARGS[@]:1}" ;;
  setup) each_slice setup_tpu.sh ;;
  # launch.sh returns as soon as its slice has started, so all slices start within seconds.
  launch) each_slice launch.sh -- "${ARGS[@]:1}" ;;
  stop) each_slice stop.sh ;;
  delete)
    run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" --zone="$ZONE" \
      --project="$PROJECT" --force --quiet ;;
  *) die "unknown command: ${ARGS[0]}" ;;
esac
