#!/usr/bin/env bash
# Watches the TPU; when it is preempted (or gone), recreates it, sets it up and relaunches the same
# command. The experiment resumes from the latest checkpoint in its --run_dir by itself.
# Under --dry-run, prints the state query and one recovery cycle instead of looping.
set -euo pipefail
usage() {
  echo "usage: [TPU_NAME=.. ZONE=.. PROJECT=.. CHECK_EVERY_S=300 MAX_RELAUNCHES=20]" \
    "relaunch_on_preemption.sh [--dry-run] [--queued] <entry> [experiment flags...]"
}
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
: "${CHECK_EVERY_S:=300}" "${MAX_RELAUNCHES:=20}"
queued=()
if [[ "${ARGS[0]-}" == --queued ]]; then queued=(--queued); ARGS=("${ARGS[@]:1}"); fi
((${#ARGS[@]} >= 1)) || die "missing <entry>"
dry=()
if [[ "$DRY_RUN" == 1 ]]; then dry=(--dry-run); fi

if ((${#queued[@]})); then
  describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE"
    --project="$PROJECT" --format=value\(state.state\))
  healthy=" ACTIVE ACCEPTED PROVISIONING WAITING_FOR_RESOURCES CREATING "
else
  describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
    --format=value\(state\))
  healthy=" READY CREATING STARTING RESTARTING REPAIRING "
fi

recover() {
  "$SCRIPTS_DIR/delete_tpu.sh" "${dry[@]+"${dry[@]}"}" "${queued[@]+"${queued[@]}"}" || true
  "$SCRIPTS_DIR/create_tpu.sh" "${dry[@]+"${dry[@]}"}" "${queued[@]+"${queued[@]}"}"
  if ((${#queued[@]})) && [[ "$DRY_RUN" != 1 ]]; then
    # A queued resource may wait for capacity: launch only once it is ACTIVE.
    until [[ "$("${describe[@]}" 2>/dev/null || true)" == ACTIVE ]]; do sleep 60; done
  fi
  "$SCRIPTS_DIR/setup_tpu.sh" "${dry[@]+"${dry[@]}"}"
  "$SCRIPTS_DIR/launch.sh" "${dry[@]+"${dry[@]}"}" -- "${ARGS[@]}"
}

if [[ "$DRY_RUN" == 1 ]]; then
  run "${describe[@]}"
  recover
  exit 0
fi

relaunches=0
while true; do
  state="$("${describe[@]}" 2>/dev/null || echo NOT_FOUND)"
  if [[ "$healthy" != *" $state "* ]]; then
    ((relaunches < MAX_RELAUNCHES)) || { echo "gave up after $relaunches relaunches" >&2; exit 1; }
    relaunches=$((relaunches + 1))
    echo "$(date -u +%FT%TZ) $TPU_NAME is ${state:-UNKNOWN}: relaunch $relaunches" >&2
    recover
  fi
  sleep "$CHECK_EVERY_S"
done
