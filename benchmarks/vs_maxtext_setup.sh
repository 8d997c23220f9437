#!/usr/bin/env bash
# A separate virtualenv with MaxText 0.2.5 and a CPU jax, for benchmarks/vs_maxtext.py. Never part of
# requirements.txt or CI.
#
#   bash benchmarks/vs_maxtext_setup.sh [VENV] [PYTHON3.12]
#   VENV defaults to ~/.cache/llama_jax/maxtext-venv; PYTHON3.12 to python3.12 on PATH (MaxText needs >= 3.12).
#
# The maxtext wheel declares no base dependencies, only extras (tpu, cuda12, ...) that pull TensorFlow,
# CUDA wheels, the Google Cloud clients and ~200 more packages. We install it with --no-deps and add, by
# hand, what `maxtext.trainers.pre_train.train` imports on CPU with DECOUPLE_GCLOUD=TRUE (which stubs the
# Google Cloud, goodput and TensorBoard-on-Vertex integrations): ~125 packages, ~1.4 GB, ~2.5 minutes.
set -euo pipefail

VENV="${1:-$HOME/.cache/llama_jax/maxtext-venv}"
PY="${2:-python3.12}"

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "vs_maxtext_setup.sh: $PY not found; MaxText 0.2.5 needs Python >= 3.12 (pass its path as the second" \
       "argument, e.g. ~/.pyenv/versions/3.12.1/bin/python3.12)." >&2
  exit 1
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 12))' || {
  echo "vs_maxtext_setup.sh: $PY is $("$PY" --version 2>&1); MaxText 0.2.5 needs Python >= 3.12." >&2
  exit 1
}

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --no-deps "maxtext==0.2.5"
# jax 0.12 wheels are CPU-only unless a CUDA/TPU plugin is installed; none is.
"$VENV/bin/pip" install -q "jax==0.12.0.1" "jaxlib==0.12.0.1" \
  flax optax orbax-checkpoint grain numpy pydantic omegaconf absl-py ml-collections tensorboardx \
  jaxtyping chex aqtp qwix drjax pathwaysutils jinja2 tokamax huggingface-hub transformers pillow \
  tiktoken sentencepiece sympy

DECOUPLE_GCLOUD=TRUE JAX_PLATFORMS=cpu "$VENV/bin/python" -c \
  'import jax, maxtext.trainers.pre_train.train; print("maxtext ok on", jax.devices()[0].platform, "jax", jax.__version__)'
echo "MaxText venv ready: $VENV ($(du -sh "$VENV" | cut -f1))"
