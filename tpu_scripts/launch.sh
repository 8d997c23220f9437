#!/usr/bin/env bash
# Starts experiments/<entry>.py on every worker at once, detached, logging to
# ~/$REMOTE_DIR/logs/$RUN_NAME.log. jax.distributed finds the other workers from the TPU env,
# and the experiment resumes from its --run_dir if a checkpoint is there. ssh runs no ~/.bashrc, so
# the variables below (and those named in FORWARD_ENV) that are set here are exported there.
set -euo pipefail
usage() {
  echo "usage: [TPU_NAME=.. ZONE=.. PROJECT=.. RUN_NAME=run FORWARD_ENV='NAME ..']" \
    "launch.sh [--dry-run] <entry>" \
    "[experiment flags...]   e.g. launch.sh pretrain --run_dir=gs://bucket/ckpt"
}
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} >= 1)) || die "missing <entry>"

entry="${ARGS[0]#experiments/}"
entry="${entry%.py}"
[[ "$entry" =~ ^[A-Za-z0-9_]+$ ]] || die "<entry> is a file name in experiments/, got ${ARGS[0]}"
log="logs/$(q "$RUN_NAME").log"
pid="logs/$(q "$RUN_NAME").pid"
cmd="python experiments/$entry.py"
if ((${#ARGS[@]} > 1)); then cmd+=" $(join_q "${ARGS[@]:1}")"; fi
exports=""
for name in LIBTPU_INIT_ARGS XLA_FLAGS TPU_STDERR_LOG_LEVEL TPU_MIN_LOG_LEVEL \
  LLAMA_JAX_COORDINATOR_PORT JAX_COORDINATOR_PORT ${FORWARD_ENV:-}; do
  [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "FORWARD_ENV: $name is not a variable name"
  if [[ -n "${!name+set}" ]]; then exports+="export $name=$(q "${!name}"); "; fi
done
# Only the trainer goes to the background (the braces keep `&` off the cd/activate chain), so
# $! is its pid (nohup execs python), the pid file lands in logs/, and with its output redirected
# and stdin closed ssh returns at once while the run keeps going.
tpu_ssh all "${exports}cd $(q "$REMOTE_DIR") && . .venv/bin/activate && mkdir -p logs && { nohup $cmd > $log 2>&1 < /dev/null & echo \$! > $pid; }"
