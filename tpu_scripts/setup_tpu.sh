#!/usr/bin/env bash
# Puts the code on every worker (git clone of REPO_URL, or a copy of this checkout) and installs it
# into a Python 3.11 venv with the runtime requirements.txt plus jax[tpu] at the pinned version.
# The TPU images (Ubuntu 22.04) ship Python 3.10 without venv; uv (installed into ~/.local/bin if
# missing) fetches a standalone Python 3.11 and installs the pins.
set -euo pipefail
usage() {
  echo "usage: [TPU_NAME=.. ZONE=.. PROJECT=.. REPO_URL=<git url, empty: copy this checkout>" \
    "BRANCH=main REMOTE_DIR=llama_jax PYTHON_VERSION=3.11] setup_tpu.sh [--dry-run]"
}
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
((${#ARGS[@]} == 0)) || die "unknown arguments: ${ARGS[*]}"

dir="$(q "$REMOTE_DIR")"
if [[ -n "$REPO_URL" ]]; then
  tpu_warmup
  fetch="if [ -d $dir/.git ]; then git -C $dir fetch origin && git -C $dir checkout $(q "$BRANCH")"
  fetch+=" && git -C $dir reset --hard origin/$(q "$BRANCH"); else git clone --branch"
  fetch+=" $(q "$BRANCH") $(q "$REPO_URL") $dir; fi"
else
  # Copy the working tree as it is (uncommitted edits included), without venvs or git history.
  tarball="${TMPDIR:-/tmp}/${TPU_NAME}-llama_jax.tar.gz"
  run tar -czf "$tarball" -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=__pycache__ .
  tpu_warmup
  tpu_scp "$tarball" llama_jax.tar.gz
  fetch="mkdir -p $dir && tar -xzf llama_jax.tar.gz -C $dir"
fi
# One resolve for both, so jax[tpu] brings the libtpu that matches the pinned jax.
jax="jax[tpu]==$(pinned_jax)"
install="export PATH=\"\$HOME/.local/bin:\$PATH\"; command -v uv >/dev/null"
install+=" || curl -LsSf https://astral.sh/uv/install.sh | sh; cd $dir"
install+=" && { [ -x .venv/bin/python ] || uv venv --python $(q "$PYTHON_VERSION") .venv; }"
install+=" && uv pip install --python .venv/bin/python -r requirements.txt $(q "$jax")"
install+=" && uv pip install --python .venv/bin/python --no-deps -e ."
tpu_ssh all "set -e; $fetch; $install"
