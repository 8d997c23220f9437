# shellcheck shell=bash
# Sourced by every tpu_scripts/*.sh: settings from env vars, --dry-run, and `run`.
# Hyperparameters never live here: scripts pass "$@" through to experiments/*.py.

: "${TPU_NAME:=llama-jax}"
: "${ZONE:=us-east5-a}"
: "${ACCELERATOR_TYPE:=v5p-32}"
: "${RUNTIME_VERSION:=v2-alpha-tpuv5}"   # the TPU VM image for v5p; v6e uses v2-alpha-tpuv6e
: "${QUEUED_RESOURCE:=${TPU_NAME}-qr}"
: "${REPO_URL:=}"                        # empty: copy this checkout instead of cloning
: "${BRANCH:=main}"
: "${REMOTE_DIR:=llama_jax}"             # relative to the home directory on each worker
: "${RUN_NAME:=run}"                     # names the log and pid files of a launch
: "${PYTHON_VERSION:=3.11}"              # the workers' venv (jax 0.10 needs >= 3.11; images have 3.10)
: "${DRY_RUN:=0}"

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPTS_DIR")"
export SCRIPTS_DIR REPO_ROOT
export TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION QUEUED_RESOURCE REPO_URL BRANCH \
  REMOTE_DIR RUN_NAME PYTHON_VERSION DRY_RUN

# Quote one word for a shell only when it needs it, so printed commands stay readable and exact.
# A `--flag=value` word keeps its `--flag=` outside the quotes: --command='...'.
q() {
  local prefix=""
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then
    printf '%s' "$1"
    return
  fi
  if [[ "$1" =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then prefix="${BASH_REMATCH[1]}"; fi
  local value="${1#"$prefix"}"
  printf "%s'%s'" "$prefix" "${value//\'/\'\\\'\'}"
}

# Joins words into one command line, each quoted by q.
join_q() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

# Prints the command under --dry-run, else echoes it to stderr and runs it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    join_q "$@"; echo
  else
    echo "+ $(join_q "$@")" >&2
    "$@"
  fi
}

# Splits the script's own options (--dry-run, -h/--help) from the pass-through ARGS.
# Everything after a literal `--` is passed through untouched.
parse_args() {
  ARGS=()
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; ARGS+=("$@"); break ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  # No project baked in: use gcloud's configured one, but never call gcloud in a dry run.
  if [[ -z "${PROJECT:-}" && "$DRY_RUN" != 1 ]] && command -v gcloud >/dev/null; then
    PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
  fi
  : "${PROJECT:=my-gcp-project}"
  export PROJECT DRY_RUN
}

# The jax version pinned in requirements.txt (jax[tpu] / jax[cuda12] must match it).
pinned_jax() { sed -n 's/^jax==\([^ #]*\).*/\1/p' "$REPO_ROOT/requirements.txt"; }

die() { echo "error: $*" >&2; echo >&2; usage >&2; exit 2; }

# gcloud compute tpus tpu-vm ssh to WORKER (a number or `all`) with one remote command.
tpu_ssh() {
  local worker="$1" cmd="$2"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker="$worker" --command="$cmd"
}
