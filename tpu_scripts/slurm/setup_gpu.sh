#!/usr/bin/env bash
# Creates .venv for GPU nodes (run it once on a node; the repo sits on a shared file system):
# Python 3.11 (uv, or python3.11), the runtime requirements.txt and jax[cuda12] at the pinned jax
# version, so jobs do not fall back to a CPU-only jaxlib. VENV=<dir> for another place.
set -euo pipefail
usage() { echo "usage: [VENV=.venv PYTHON_VERSION=3.11 CUDA_EXTRA=cuda12] setup_gpu.sh [--dry-run]"; }
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "$0")/../common.sh"
NO_GCLOUD=1
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unknown arguments: ${ARGS[*]}"
: "${VENV:=.venv}" "${CUDA_EXTRA:=cuda12}"

cd "$REPO_ROOT"
jax="jax[$CUDA_EXTRA]==$(pinned_jax)"
if command -v uv >/dev/null; then
  [[ -x "$VENV/bin/python" ]] || run uv venv --python "$PYTHON_VERSION" "$VENV"
  run uv pip install --python "$VENV/bin/python" -r requirements.txt "$jax"
  run uv pip install --python "$VENV/bin/python" --no-deps -e .
elif command -v "python$PYTHON_VERSION" >/dev/null; then
  [[ -x "$VENV/bin/python" ]] || run "python$PYTHON_VERSION" -m venv "$VENV"
  run "$VENV/bin/python" -m pip install -q -r requirements.txt "$jax"
  run "$VENV/bin/python" -m pip install -q --no-deps -e .
else
  die "neither uv nor python$PYTHON_VERSION found: install uv (https://docs.astral.sh/uv/)" \
    "or Python $PYTHON_VERSION"
fi
