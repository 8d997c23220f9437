#!/usr/bin/env bash
# Multislice: NUM_SLICES TPU slices in one queued resource (`--node-count`), nodes named
# $TPU_NAME-0 .. $TPU_NAME-(N-1). setup/launch/stop/logs reach every node at once through
# `gcloud compute tpus queued-resources ssh --node=all --worker=all`; jax reads MEGASCALE_* on each
# worker, so the launch is the single-slice one.
set -euo pipefail
usage() {
  echo "usage: [TPU_NAME=.. NUM_SLICES=2 ACCELERATOR_TYPE=..] multislice.sh [--dry-run]" \
    "create [gcloud flags...] | setup | launch <entry> [experiment flags...] | logs | stop | delete"
}
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} >= 1)) || die "missing command"
: "${NUM_SLICES:=2}"
dry=()
if [[ "$DRY_RUN" == 1 ]]; then dry=(--dry-run); fi
export SSH_QR=1  # common.sh's tpu_ssh/tpu_scp: the queued resource, every node

case "${ARGS[0]}" in
  create)
    version="$(runtime_version)" || exit 2
    run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-count="$NUM_SLICES" \
      --node-prefix="$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" \
      "${ARGS[@]:1}" ;;
  setup) "$SCRIPTS_DIR/setup_tpu.sh" "${dry[@]+"${dry[@]}"}" ;;
  launch) "$SCRIPTS_DIR/launch.sh" "${dry[@]+"${dry[@]}"}" -- "${ARGS[@]:1}" ;;
  logs) SSH_NODE="${NODE:-0}" "$SCRIPTS_DIR/logs.sh" "${dry[@]+"${dry[@]}"}" ;;
  stop) "$SCRIPTS_DIR/stop.sh" "${dry[@]+"${dry[@]}"}" ;;
  delete)
    run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" --zone="$ZONE" \
      --project="$PROJECT" --force --quiet ;;
  *) die "unknown command: ${ARGS[0]}" ;;
esac
