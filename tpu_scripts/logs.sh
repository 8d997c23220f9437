#!/usr/bin/env bash
# Streams the training log of worker WORKER (default 0; `all` interleaves every worker).
set -euo pipefail
usage() { echo "usage: [TPU_NAME=.. ZONE=.. PROJECT=.. RUN_NAME=run WORKER=0|all] logs.sh [--dry-run]"; }
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unknown arguments: ${ARGS[*]}"

tpu_ssh "${WORKER:-0}" "tail -n 100 -F $(q "$REMOTE_DIR")/logs/$(q "$RUN_NAME").log"
