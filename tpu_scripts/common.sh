# shellcheck shell=bash
# Sourced by every tpu_scripts/*.sh: settings from env vars, --dry-run, and `run`.
# Hyperparameters never live here: scripts pass "$@" through to experiments/*.py.

: "${TPU_NAME:=llama-jax}"
: "${ZONE:=us-east5-a}"
: "${ACCELERATOR_TYPE:=v5p-32}"
: "${RUNTIME_VERSION:=}"                 # empty: chosen from ACCELERATOR_TYPE (runtime_version)
: "${QUEUED_RESOURCE:=${TPU_NAME}-qr}"
: "${REPO_URL:=}"                        # empty: copy this checkout instead of cloning
: "${BRANCH:=main}"
: "${REMOTE_DIR:=llama_jax}"             # relative to the home directory on each worker
: "${RUN_NAME:=run}"                     # names the log and pid files of a launch
: "${PYTHON_VERSION:=3.11}"              # the workers' venv (jax 0.10 needs >= 3.11; images have 3.10)
: "${SSH_FLAGS:=}"                       # more flags for every gcloud ssh/scp, e.g. --internal-ip
: "${SSH_RETRIES:=6}"                    # first ssh after create: keys take a while to propagate
: "${RETRY_S:=10}"                       # ... waiting RETRY_S, 2*RETRY_S, ... seconds between tries
: "${DRY_RUN:=0}"

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPTS_DIR")"
export SCRIPTS_DIR REPO_ROOT
export TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION QUEUED_RESOURCE REPO_URL BRANCH \
  REMOTE_DIR RUN_NAME PYTHON_VERSION SSH_FLAGS SSH_RETRIES RETRY_S DRY_RUN
read -r -a SSH_FLAG_WORDS <<<"$SSH_FLAGS"

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
  export DRY_RUN
  if [[ "${NO_GCLOUD:-0}" == 1 ]]; then return; fi  # slurm/: no Google Cloud project involved
  # No project baked in: PROJECT, else gcloud's configured one; a dry run calls no tool.
  if [[ -z "${PROJECT:-}" && "$DRY_RUN" != 1 ]] && command -v gcloud >/dev/null; then
    PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
  fi
  if [[ -z "${PROJECT:-}" ]]; then
    if [[ "$DRY_RUN" != 1 ]]; then
      die "no Google Cloud project: set PROJECT=<project id> or run gcloud config set project <id>"
    fi
    PROJECT='<PROJECT>'
    echo "warning: PROJECT is not set (a real run stops here)" >&2
  fi
  export PROJECT DRY_RUN
}

die() { echo "error: $*" >&2; echo >&2; usage >&2; exit 2; }

# The TPU VM image for ACCELERATOR_TYPE (Cloud TPU docs, "TPU software versions"). RUNTIME_VERSION
# set by hand wins. TPU7x and later are not created with `gcloud compute tpus` (Compute Engine/GKE).
runtime_version() {
  if [[ -n "$RUNTIME_VERSION" ]]; then printf '%s' "$RUNTIME_VERSION"; return; fi
  case "$ACCELERATOR_TYPE" in
    v6e-*) printf v2-alpha-tpuv6e ;;
    v5p-*) printf v2-alpha-tpuv5 ;;
    v5litepod-*) printf v2-alpha-tpuv5-lite ;;
    v4-*) printf tpu-ubuntu2204-base ;;
    *) die "ACCELERATOR_TYPE=$ACCELERATOR_TYPE has no known runtime version; known: v6e-<n>" \
         "(v2-alpha-tpuv6e), v5p-<n> (v2-alpha-tpuv5), v5litepod-<n> (v2-alpha-tpuv5-lite)," \
         "v4-<n> (tpu-ubuntu2204-base); or set RUNTIME_VERSION. TPU7x and later: Compute Engine/GKE" ;;
  esac
}

# The jax version pinned in requirements.txt (jax[tpu] / jax[cuda12] must match it).
pinned_jax() { sed -n 's/^jax==\([^ #]*\).*/\1/p' "$REPO_ROOT/requirements.txt"; }

# Remote commands go to one TPU VM, or with SSH_QR=1 (multislice.sh) to every node of the queued
# resource at once (`queued-resources ssh --node=all`, as Google's multislice docs do).
tpu_target() {
  if [[ "${SSH_QR:-0}" == 1 ]]; then
    TARGET=(queued-resources "$QUEUED_RESOURCE" "--node=${SSH_NODE:-all}")
  else
    TARGET=(tpu-vm "$TPU_NAME")
  fi
}

# ssh to WORKER (a number or `all`) with one remote command.
tpu_ssh() {
  local worker="$1" cmd="$2"
  tpu_target
  run gcloud compute tpus "${TARGET[0]}" ssh "${TARGET[1]}" "${TARGET[@]:2}" --zone="$ZONE" \
    --project="$PROJECT" --worker="$worker" "${SSH_FLAG_WORDS[@]+"${SSH_FLAG_WORDS[@]}"}" \
    --command="$cmd"
}

# Copies local file SRC to ~/DEST on every worker.
tpu_scp() {
  tpu_target
  run gcloud compute tpus "${TARGET[0]}" scp "$1" "${TARGET[1]}:$2" "${TARGET[@]:2}" \
    --zone="$ZONE" --project="$PROJECT" --worker=all "${SSH_FLAG_WORDS[@]+"${SSH_FLAG_WORDS[@]}"}"
}

# Waits until ssh reaches every worker: right after create, keys are still propagating.
tpu_warmup() {
  local i
  for ((i = 1; i <= SSH_RETRIES; i++)); do
    if tpu_ssh all true >/dev/null; then return 0; fi
    echo "ssh not ready yet (try $i of $SSH_RETRIES); retrying in $((RETRY_S * i)) s" >&2
    sleep "$((RETRY_S * i))"
  done
  echo "error: no ssh to every worker after $SSH_RETRIES tries; behind a firewall or without" \
    "an external IP try SSH_FLAGS=--internal-ip or SSH_FLAGS=--tunnel-through-iap" >&2
  return 1
}
