#!/usr/bin/env bash
# Stops the run started by launch.sh (by its recorded pid) on every worker; the TPU VM stays.
set -euo pipefail
usage() { echo "usage: [TPU_NAME=.. ZONE=.. PROJECT=.. RUN_NAME=run] stop.sh [--dry-run]"; }
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unknown arguments: ${ARGS[*]}"

pid="$(q "$REMOTE_DIR")/logs/$(q "$RUN_NAME").pid"
tpu_ssh all "if [ -f $pid ]; then kill \$(cat $pid) 2>/dev/null || true; rm -f $pid; fi"
