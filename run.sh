#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then pretrain the default small Llama on the embedded
# corpus (Shakespeare + Python stdlib) on this machine's CPU. Extra flags go to experiments/pretrain.py.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f .venv/.llama_jax_ready ] || [ requirements.txt -nt .venv/.llama_jax_ready ] \
    || [ requirements-test.txt -nt .venv/.llama_jax_ready ]; then
  echo "== setting up .venv (pinned requirements; first time takes a few minutes)"
  bash tools/setup_venv.sh
  touch .venv/.llama_jax_ready
fi
exec .venv/bin/python experiments/pretrain.py "$@"
