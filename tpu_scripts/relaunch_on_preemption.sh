#!/usr/bin/env bash
# Watches the TPU; when it is preempted (or gone), recreates it with the create flags given here
# (the same as for create_tpu.sh: --queued, --spot, --reserved, --network=..., in --flag=value form),
# sets it up and relaunches the same command. The experiment resumes from the latest checkpoint in
# its --run_dir by itself. A failed recovery (a stockout, ssh not ready) is retried with exponential
# backoff; the watcher only stops on a queued resource in FAILED (recreating would fail the same
# way) or after MAX_RELAUNCHES relaunches. MAX_CHECKS > 0 ends it after that many checks (tests).
# Under --dry-run, prints the state query and one recovery cycle instead of looping.
set -euo pipefail
usage() {
  echo "usage: [TPU_NAME=.. ZONE=.. PROJECT=.. CHECK_EVERY_S=300 MAX_RELAUNCHES=20 BACKOFF_S=60" \
    "MAX_BACKOFF_S=1800] relaunch_on_preemption.sh [--dry-run] [--queued] [create flags...]" \
    "<entry> [experiment flags...]"
}
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
: "${CHECK_EVERY_S:=300}" "${MAX_RELAUNCHES:=20}" "${BACKOFF_S:=60}" "${MAX_BACKOFF_S:=1800}"
: "${MAX_CHECKS:=0}"
create_args=() queued=()
while ((${#ARGS[@]})) && [[ "${ARGS[0]}" == -* ]]; do
  if [[ "${ARGS[0]}" == --queued ]]; then queued=(--queued); fi
  create_args+=("${ARGS[0]}")
  ARGS=("${ARGS[@]:1}")
done
((${#ARGS[@]} >= 1)) || die "missing <entry>"
dry=()
if [[ "$DRY_RUN" == 1 ]]; then dry=(--dry-run); fi

if ((${#queued[@]})); then
  describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE"
    --project="$PROJECT" --format=value\(state.state\))
  # SUSPENDING/SUSPENDED (preempted), NOT_FOUND, DELETING: recover. FAILED: stop.
  healthy=" ACTIVE ACCEPTED PROVISIONING WAITING_FOR_RESOURCES CREATING UNKNOWN "
else
  describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
    --format=value\(state\))
  healthy=" READY CREATING STARTING RESTARTING REPAIRING UNKNOWN "
fi

log() { echo "$(date -u +%FT%TZ) $*" >&2; }

# The state, NOT_FOUND when the resource is gone, UNKNOWN when gcloud failed otherwise (a network
# blip must not delete a healthy TPU).
query_state() {
  local out
  if out="$("${describe[@]}" 2>&1)"; then
    echo "${out:-UNKNOWN}"
  elif [[ "$out" == *NOT_FOUND* ]]; then
    echo NOT_FOUND
  else
    log "describe failed: $out"
    echo UNKNOWN
  fi
}

failed() {
  log "error: queued resource $QUEUED_RESOURCE is FAILED: recreating it would fail the same way." \
    "See why: gcloud compute tpus queued-resources describe $QUEUED_RESOURCE --zone=$ZONE" \
    "--project=$PROJECT; fix the request (quota, type, zone), delete it and run this again."
  exit 3
}

# A queued resource may wait for capacity: launch only once it is ACTIVE.
wait_active() {
  local state
  while true; do
    state="$(query_state)"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED) failed ;;
      NOT_FOUND) log "$QUEUED_RESOURCE vanished while waiting"; return 1 ;;
    esac
    sleep "$CHECK_EVERY_S"
  done
}

# Each step's failure ends the attempt (set -e does not apply inside `if recover`).
recover() {
  "$SCRIPTS_DIR/delete_tpu.sh" "${dry[@]+"${dry[@]}"}" "${queued[@]+"${queued[@]}"}" || true
  "$SCRIPTS_DIR/create_tpu.sh" "${dry[@]+"${dry[@]}"}" "${create_args[@]+"${create_args[@]}"}" \
    || return 1
  if ((${#queued[@]})) && [[ "$DRY_RUN" != 1 ]]; then wait_active || return 1; fi
  "$SCRIPTS_DIR/setup_tpu.sh" "${dry[@]+"${dry[@]}"}" || return 1
  "$SCRIPTS_DIR/launch.sh" "${dry[@]+"${dry[@]}"}" -- "${ARGS[@]}" || return 1
}

if [[ "$DRY_RUN" == 1 ]]; then
  run "${describe[@]}"
  recover
  exit 0
fi

relaunches=0 failures=0 checks=0
while true; do
  checks=$((checks + 1))
  if ((MAX_CHECKS > 0 && checks > MAX_CHECKS)); then exit 0; fi
  state="$(query_state)"
  if [[ "$state" == FAILED && ${#queued[@]} -gt 0 ]]; then failed; fi
  if [[ "$healthy" != *" $state "* ]]; then
    ((relaunches < MAX_RELAUNCHES)) || { log "gave up after $relaunches relaunches"; exit 1; }
    log "$TPU_NAME is $state: relaunch $((relaunches + 1))"
    if recover; then
      relaunches=$((relaunches + 1)) failures=0
    else
      failures=$((failures + 1))
      wait_s=$((BACKOFF_S * 2 ** (failures > 10 ? 10 : failures - 1)))
      wait_s=$((wait_s > MAX_BACKOFF_S ? MAX_BACKOFF_S : wait_s))
      log "recovery failed ($failures in a row); retrying in $wait_s s"
      sleep "$wait_s"
      continue
    fi
  fi
  sleep "$CHECK_EVERY_S"
done
